// The supervisor: owns every adapter job's state machine and data, forms BatchLoRA
// micro-batches, admits them by memory, routes them through the pipeline, collects losses,
// decides optimizer steps (with gradient clipping across stages), evaluates, checkpoints and
// streams events. It speaks to the stages only through the `Pipeline` interface, so the same
// scheduler drives the in-thread single-device trainer and the worker-thread pipeline.
import { availableParallelism } from 'node:os';
import { parseAdapterConfig, type AdapterConfig, type AdapterConfigInput } from '../lib/config.js';
import type { LlamaConfig } from '../lib/model/config.js';
import { StageProgram, type StagePlan } from '../lib/model/stage.js';
import { linearQuantization, loadStageWeights, type BaseFormat } from '../lib/model/weights.js';
import type { QuantizeMode } from '../lib/io/bnb.js';
import { openModelDir } from '../lib/io/hf-model.js';
import { native } from '../lib/native.js';
import { defaultCpuBudget, openDevice, parseBytes, parseDeviceSpec } from '../lib/tensor.js';
import { balanceSplit, explicitSplit, type SplitProfile } from '../lib/schedule/split.js';
import { adaptersPerMessage, microBatchesInFlight } from '../lib/schedule/packing.js';
import { admissionOrder, inFlightLimit, progress } from '../lib/schedule/fairness.js';
import { parseFault } from '../lib/faults.js';
import { LocalPipeline } from './local.js';
import { ActorPipeline, StageFailure, type FaultEvent, type StageWorker } from './runtime.js';
import { Cluster, type ClusterOptions } from './transport/remote.js';
import type { ClusterDevice } from './transport/registry.js';
import { outputHooks, prepareJob, promptSampler } from './jobs.js';
import { newRunId } from '../lib/io/output.js';
import type { MicroBatchSource, PreparedJob, SourceMicroBatch, SupervisorHooks } from './job-types.js';
import type { LoraSpec } from '../lib/lora/adapter.js';
import { lrAt } from '../lib/lora/schedule.js';
import type { JobEvent, JobState, Pipeline } from './protocol.js';
import type { AdapterState } from '../lib/lora/state.js';
import type { FaultSpec } from '../lib/faults.js';
import type { MicroBatchData } from '../lib/model/batch.js';
import type { Segment } from '../lib/model/stage.js';

export interface SchedulerOptions {
  /** BatchLoRA: several adapters per micro-batch message. */
  batchlora: boolean;
  /** Micro-batch messages in flight in the pipeline. */
  inflight: number;
  /** Micro-batches of one adapter's step in flight (default: lib/schedule/packing.ts microBatchesInFlight). */
  inflightPerAdapter?: number;
  /** Most adapters per message (default: lib/schedule/packing.ts adaptersPerMessage). */
  adaptersPerMicroBatch?: number;
}

/** A pull-based queue behind job.events(). */
class EventQueue<T> {
  private items: T[] = [];
  private waiters: Array<(r: IteratorResult<T>) => void> = [];
  private closed = false;
  push(v: T) {
    const w = this.waiters.shift();
    if (w) w({ value: v, done: false });
    else this.items.push(v);
  }
  close() {
    this.closed = true;
    for (const w of this.waiters.splice(0)) w({ value: undefined as never, done: true });
  }
  async *iterate(): AsyncGenerator<T> {
    for (;;) {
      if (this.items.length) {
        yield this.items.shift()!;
        continue;
      }
      if (this.closed) return;
      const r = await new Promise<IteratorResult<T>>((res) => this.waiters.push(res));
      if (r.done) return;
      yield r.value;
    }
  }
}

export class Job {
  state: JobState = 'queued';
  step = 0;
  totalSteps = 0;
  spec!: LoraSpec;
  source!: MicroBatchSource;
  evalSource?: () => MicroBatchSource;
  /** Micro-batch messages of this job in flight. */
  inflight = 0;
  admittedInStep = 0;
  doneInStep = 0;
  microCount = 0;
  stepping = false;
  stepLoss = 0;
  stepTargets = 0;
  tokens = 0;
  lastLoss = NaN;
  lastEval?: { loss: number; perplexity: number };
  /** The held-out loss before the first step (eval configured, a run from step 0). */
  baselineEval?: { loss: number; perplexity: number };
  /** Loaded and waiting for room on the stages (placed by the supervisor, by priority). */
  prepared?: PreparedJob;
  /** Preempted: its state in host memory while it is off the stages (see Supervisor.placeWaiting). */
  parked?: { state: AdapterState; source: unknown };
  /** A higher-priority job needs this job's memory: it parks at its next step boundary. */
  parkRequested = false;
  /** on_nan: rollback: the learning rate is lrScale × the configured one, lowered at each rollback. */
  lrScale = 1;
  rollbacks = 0;
  /** Where a rollback returns to: the state, data position and counters of the last checkpoint (or the start). */
  rollbackPoint?: { state: AdapterState; source: unknown; step: number; tokens: number };
  /** Between a NaN and the restored checkpoint: nothing of this job is admitted. */
  rollingBack = false;
  error?: string;
  outputPath?: string;
  startedAt = 0;
  finishedAt = 0;
  private peeked: SourceMicroBatch | null | undefined;
  private readonly queue = new EventQueue<JobEvent>();
  readonly done: Promise<void>;
  private resolveDone!: () => void;

  constructor(
    readonly id: number,
    readonly config: AdapterConfig,
    private readonly sup: Supervisor,
  ) {
    this.done = new Promise((r) => (this.resolveDone = r));
  }

  get name(): string {
    return this.config.name;
  }
  get priority(): number {
    return this.config.priority;
  }

  events(): AsyncGenerator<JobEvent> {
    return this.queue.iterate();
  }

  async pause(): Promise<void> {
    if (this.state === 'running') this.setState('paused');
    await this.sup.quiesce(this);
  }

  async resume(): Promise<void> {
    if (this.state === 'paused') this.setState('running');
    this.sup.wake();
  }

  async cancel(): Promise<void> {
    if (this.terminal()) return;
    this.setState('cancelled');
    await this.sup.quiesce(this);
    await this.sup.retire(this);
  }

  /** @internal Ends the event stream without changing the state (the supervisor closed). */
  endEvents(): void {
    this.queue.close();
  }

  terminal(): boolean {
    return this.state === 'done' || this.state === 'failed' || this.state === 'cancelled';
  }

  /** @internal */
  emit(ev: JobEvent) {
    this.queue.push(ev);
    this.sup.hooks.onEvent?.(ev);
  }

  /** @internal */
  setState(s: JobState) {
    this.state = s;
    this.emit({ type: 'state', adapter: this.name, state: s, time: Date.now() });
    if (this.terminal()) {
      this.finishedAt = Date.now();
      this.queue.close();
      this.resolveDone();
    }
  }

  private stateBeforePeek: unknown;
  private stepStartState: unknown;

  /** @internal */
  peek(): SourceMicroBatch | null {
    if (this.peeked === undefined) {
      this.stateBeforePeek = this.source.state();
      if (this.admittedInStep === 0) this.stepStartState = this.stateBeforePeek;
      this.peeked = this.source.next();
    }
    return this.peeked;
  }

  /**
   * The data position where the current step starts (for checkpoints): a checkpoint holds the
   * weights after `step` optimizer steps, so a resume redoes a step that was only partly done.
   */
  sourceState(): unknown {
    if (this.admittedInStep > 0) return this.stepStartState;
    return this.peeked === undefined ? this.source.state() : this.stateBeforePeek;
  }

  /** @internal */
  take(): SourceMicroBatch {
    const mb = this.peek()!;
    this.peeked = undefined;
    return mb;
  }

  /** @internal Puts the data loader back to a saved position (unparking). */
  restoreSource(state: unknown): void {
    this.source.restore(state);
    this.peeked = undefined;
  }

  /** @internal Nothing of this job in flight and no step half done: it can leave the stages. */
  atStepBoundary(): boolean {
    return this.inflight === 0 && !this.stepping && !this.rollingBack && this.admittedInStep === 0;
  }

  /** @internal Waiting for room on the stages: loaded, or parked. */
  waiting(): boolean {
    return (this.state === 'loading' && this.prepared !== undefined) || this.state === 'parked';
  }

  /** @internal */
  canAdmit(limit: number): boolean {
    if (this.state !== 'running' || this.stepping || this.rollingBack || this.inflight >= limit) return false;
    if (this.parkRequested && this.admittedInStep === 0) return false; // park at this step boundary
    if (this.step >= this.totalSteps) return false;
    if (this.admittedInStep > 0 && this.admittedInStep >= this.microCount) return false; // wait for the step
    return this.peek() !== null;
  }
}

export class Supervisor {
  readonly jobs = new Map<number, Job>();
  private nextJobId = 1;
  private nextMb = 1;
  private rr = 0;
  private readonly inflight = new Map<number, Promise<void>>();
  private readonly stepping = new Set<Promise<void>>();
  private wakeResolve: (() => void) | undefined;
  /** Counts wake() calls: a placement pass runs only when something happened since the last one began. */
  private wakes = 0;
  private placedAt = -1;
  private stopping = false;
  private loopDone: Promise<void>;
  // Memory accounting, per stage (bytes). `restFree` is what is free when no micro-batch is in
  // flight: the budget less the base weights, the scratch and the adapters on the stage. It is
  // measured at rest and kept exact between measurements by adding and taking each adapter's
  // bytes as it leaves or joins. In-flight micro-batches hold `reserved` (what they keep between
  // their calls on a stage) plus the largest of their `transient` bytes (what a call holds while
  // it runs: a stage runs one call at a time); `promised` is held back for the waiting job that
  // placement serves next, so micro-batches cannot take it.
  private restFree: number[] | undefined;
  private reserved: number[] = [];
  private readonly transient = new Map<number, number[]>();
  private promised: number[] = [];
  /** Adapter bytes per stage of each job whose adapter is on the stages. */
  private readonly resident = new Map<number, number[]>();
  /** Placing, parking and removing adapters run one at a time (they change the accounting). */
  private residency: Promise<unknown> = Promise.resolve();
  private placement: Promise<void> | undefined;
  private fatal: Error | undefined;
  /** nan:adapter=NAME,step=K faults: poison that adapter's loss at that step (testing). */
  nanFaults: FaultSpec[] = [];
  /** The run's id (Supervisor.start: StartOptions.runId, else a new one). */
  runId = '';

  static start(o: StartOptions): Promise<Supervisor> {
    return startSupervisor(o);
  }

  constructor(
    readonly pipeline: Pipeline,
    readonly hooks: SupervisorHooks,
    readonly options: SchedulerOptions,
  ) {
    this.admission = options.inflight;
    pipeline.onOutOfMemory = () => this.shrinkAdmission();
    this.loopDone = this.loop();
  }

  /** The most micro-batch messages that were in flight at once (diagnostics). */
  get peakInflight(): number {
    return this.peakInflightCount;
  }
  private peakInflightCount = 0;

  /** Micro-batch messages admitted into the pipeline at most (options.inflight, less after an out-of-memory). */
  get admissionLimit(): number {
    return this.admission;
  }
  private admission: number;

  /**
   * A stage ran out of memory although admission said the micro-batches fit: the accounting was
   * wrong, so admit half as many from now on (at least one). The failed micro-batch itself is
   * replayed by the pipeline; a stage that keeps failing at one in flight stops the run.
   */
  private shrinkAdmission(): number {
    this.admission = Math.max(1, Math.floor(this.admission / 2));
    return this.admission;
  }

  /**
   * Starts training one adapter. The config has the fields of one entry of a training config's
   * `adapters` (validated here, defaults filled in; a bad field is an Error naming it).
   */
  submit(input: AdapterConfigInput | AdapterConfig): Job {
    const name =
      input && typeof input === 'object' && typeof (input as { name?: unknown }).name === 'string'
        ? `submit('${(input as { name: string }).name}')`
        : 'submit()';
    const config = parseAdapterConfig(input, name);
    if ([...this.jobs.values()].some((j) => j.name === config.name && !j.terminal())) {
      throw new Error(`an adapter named '${config.name}' is already running`);
    }
    if ([...this.jobs.values()].some((j) => j.name === config.name && j.state === 'done')) {
      throw new Error(
        `an adapter named '${config.name}' already finished in this supervisor${this.hooks.finish ? ' (its results are in the output)' : ''}: submit it under another name`,
      );
    }
    this.hooks.claim?.(config);
    const job = new Job(this.nextJobId++, config, this);
    this.jobs.set(job.id, job);
    job.emit({ type: 'state', adapter: job.name, state: 'queued', time: Date.now() });
    void this.load(job);
    return job;
  }

  wake(): void {
    this.wakes++;
    const w = this.wakeResolve;
    this.wakeResolve = undefined;
    w?.();
  }

  /** Waits until none of the job's micro-batches or steps (or its rollback, unless asked not to) are in flight. */
  async quiesce(job: Job, rollbackToo = true): Promise<void> {
    while (job.inflight > 0 || job.stepping || (rollbackToo && job.rollingBack)) {
      await Promise.race([...this.inflight.values(), ...this.stepping]).catch(() => {});
    }
  }

  /** Stops admitting, waits for in-flight work, ends the loop. Jobs still running stay unfinished. */
  async stop(): Promise<void> {
    this.stopping = true;
    this.wake();
    await this.loopDone;
  }

  /** Resolves once stop() has drained the pipeline. */
  stopped(): Promise<void> {
    return this.loopDone;
  }

  /**
   * Stops, then ends every stage actor (no thread, promise or slot left behind). Jobs left
   * unfinished keep their state, but their event streams end, so a `for await` over
   * job.events() returns instead of waiting forever.
   */
  async close(): Promise<void> {
    await this.stop();
    await this.pipeline.close();
    await this.hooks.close?.();
    for (const j of this.jobs.values()) if (!j.terminal()) j.endEvents();
  }

  /** Resolves when every submitted job has ended (or the run failed). */
  async drain(): Promise<void> {
    for (;;) {
      const open = [...this.jobs.values()].filter((j) => !j.terminal());
      if (!open.length || this.fatal) break;
      await Promise.race(open.map((j) => j.done));
    }
    if (this.aborting) await this.aborting;
    if (this.fatal) throw this.fatal;
  }

  // ---- internals

  /** Loads a job's data and initial state; placement then puts it on the stages when there is room. */
  private async load(job: Job): Promise<void> {
    job.setState('loading');
    try {
      const p = await this.hooks.prepare(job.config);
      job.spec = p.spec;
      job.source = p.source;
      job.evalSource = p.evalSource;
      job.totalSteps = p.source.totalSteps;
      job.step = p.startStep ?? 0;
      job.tokens = p.startTokens ?? 0; // a resumed run counts on from the checkpoint, as the uninterrupted one does
      job.lrScale = p.lrScale ?? 1;
      job.rollbacks = p.rollbacks ?? 0;
      if (job.state === 'loading') job.prepared = p; // not if cancelled meanwhile
    } catch (e) {
      if (!this.pipelineFailed(e)) this.failJob(job, (e as Error).message);
    }
    this.wake();
  }

  /** Runs fn after every earlier residency change has finished. */
  private exclusive<T>(fn: () => Promise<T>): Promise<T> {
    const r = this.residency.then(fn);
    this.residency = r.catch(() => {});
    return r;
  }

  /** Reads what is free on each stage; only exact when nothing is in flight. */
  private async measure(): Promise<void> {
    const mem = await this.pipeline.memory();
    this.restFree = mem.map((m) => m.budget - m.used);
    if (this.reserved.length !== mem.length) this.reserved = mem.map(() => 0);
    this.promised = mem.map(() => 0);
  }

  /** Bytes the micro-batches in flight hold at most on stage s (their own, and one call's transient bytes). */
  private inUse(s: number): number {
    return this.reserved[s]! + this.peakTransient(s);
  }

  /** The largest transient bytes of the micro-batches in flight on stage s (one call runs at a time). */
  private peakTransient(s: number): number {
    let peak = 0;
    for (const t of this.transient.values()) peak = Math.max(peak, t[s]!);
    return peak;
  }

  /** Whether a micro-batch that keeps `held` and runs with `transient` more bytes fits on stage s. */
  private fits(s: number, held: number, transient: number): boolean {
    return (
      this.reserved[s]! + held + Math.max(this.peakTransient(s), transient) <= this.restFree![s]! - this.promised[s]!
    );
  }

  /**
   * Starts a placement pass unless one is running or nothing happened since the last one began
   * (the loop calls this on every turn; without that check a job that waits for room made the
   * loop start pass after pass, a microtask spin that starved the stages' messages).
   */
  private place(): void {
    if (
      this.placement ||
      this.stopping ||
      this.placedAt === this.wakes ||
      ![...this.jobs.values()].some((j) => j.waiting())
    )
      return;
    this.placedAt = this.wakes;
    this.placement = this.exclusive(() => this.placeWaiting())
      .then(
        (changed) => {
          if (changed) this.wake();
        },
        (e: Error) => {
          for (const j of this.jobs.values()) if (j.waiting()) this.failJob(j, `placing adapters failed: ${e.message}`);
        },
      )
      .finally(() => (this.placement = undefined));
  }

  /**
   * The mLoRA task scheduler. Puts waiting jobs (loaded or parked) on the stages, highest
   * priority first, equal priorities first come first served (a job that must wait holds up
   * those behind it). A job that does not fit asks running jobs of lower priority (lowest
   * first, newest first) to park at their next step boundary: their LoRA weights, AdamW
   * moments and data position go to host memory and their adapter leaves every stage; they
   * come back, unchanged, when there is room. Returns whether anything changed.
   */
  private async placeWaiting(): Promise<boolean> {
    if (!this.restFree || (this.inflight.size === 0 && this.stepping.size === 0)) await this.measure();
    const S = this.pipeline.plans.length;
    let changed = false;
    for (;;) {
      for (const j of this.jobs.values()) j.parkRequested = false;
      this.promised = new Array<number>(S).fill(0);
      const waiting = [...this.jobs.values()]
        .filter((j) => j.waiting())
        .sort((a, b) => b.priority - a.priority || a.id - b.id);
      for (const job of waiting) {
        const need = this.pipeline.adapterBytes(job.spec);
        const held = this.residentBytes();
        const never = need.findIndex((b, s) => b > this.restFree![s]! + held[s]!);
        if (never >= 0) {
          this.failJob(
            job,
            `adapter '${job.name}' needs ${need[never]} bytes on ${this.pipeline.devices[never]}, ` +
              `only ${this.restFree![never]! + held[never]!} are there besides the model: give the device more memory or lower lora.r`,
          );
          continue;
        }
        if (need.every((b, s) => b <= this.restFree![s]! - this.inUse(s))) {
          await this.putOnStages(job, need);
          changed = true;
          continue;
        }
        if (need.every((b, s) => b <= this.restFree![s]!)) {
          this.promised = need; // fits once the micro-batches in flight are done
          break;
        }
        const room = this.restFree!.slice();
        const lower = [...this.jobs.values()]
          .filter((j) => this.resident.has(j.id) && j.state === 'running' && j.priority < job.priority)
          .sort((a, b) => a.priority - b.priority || b.id - a.id);
        const victims: Job[] = [];
        for (const v of lower) {
          if (need.every((b, s) => b <= room[s]!)) break;
          victims.push(v);
          this.resident.get(v.id)!.forEach((b, s) => (room[s]! += b));
        }
        if (need.every((b, s) => b <= room[s]!)) for (const v of victims) v.parkRequested = true;
        break;
      }
      const ready = [...this.jobs.values()].filter(
        (j) => j.parkRequested && j.state === 'running' && j.atStepBoundary(),
      );
      if (!ready.length) return changed;
      for (const j of ready) await this.park(j);
      changed = true;
    }
  }

  private residentBytes(): number[] {
    const sum = new Array<number>(this.pipeline.plans.length).fill(0);
    for (const b of this.resident.values()) b.forEach((x, s) => (sum[s]! += x));
    return sum;
  }

  /** Adds a waiting job's adapter to every stage (fresh, resumed from a checkpoint, or unparked). */
  private async putOnStages(job: Job, bytes: number[]): Promise<void> {
    const parked = job.parked;
    await this.pipeline.addAdapter(job.id, job.spec, parked ? parked.state : job.prepared!.initial);
    this.resident.set(job.id, bytes);
    bytes.forEach((b, s) => (this.restFree![s]! -= b));
    if (parked) {
      job.restoreSource(parked.source);
      job.parked = undefined;
      job.setState('running');
      return;
    }
    const initial = job.prepared!.initial;
    if (job.config.on_nan.action === 'rollback') job.rollbackPoint = rollbackPoint(job, initial);
    job.prepared = undefined;
    job.startedAt = Date.now();
    if (job.step >= job.totalSteps) await this.finish(job);
    else {
      job.setState('running');
      // tracked like a step (nothing of the job is admitted meanwhile), not awaited: it must not hold up placement
      if (job.step === 0 && job.config.eval) this.track(job, () => this.baseline(job, initial));
    }
  }

  /** Runs fn with the job held as stepping (canAdmit false; stop(), quiesce() and exportAll() wait for it). */
  private track(job: Job, fn: () => Promise<void>): void {
    job.stepping = true;
    const p = fn()
      .catch((e) => {
        if (!this.pipelineFailed(e)) this.failJob(job, (e as Error).message);
      })
      .finally(() => {
        job.stepping = false;
        this.stepping.delete(p);
        this.wake();
      });
    this.stepping.add(p);
  }

  /** Before the first step: the held-out loss (step 0) and the prompts' completions, for the before -> after comparison. */
  private async baseline(job: Job, initial: AdapterState): Promise<void> {
    if (job.evalSource) job.baselineEval = await this.evaluate(job);
    await this.samples(job, initial, 'before');
  }

  private async samples(job: Job, state: AdapterState, when: 'before' | 'after'): Promise<void> {
    if (!this.hooks.sample || !job.config.eval?.prompts.length) return;
    let got: Array<{ prompt: string; text: string }>;
    try {
      got = await this.hooks.sample(job, state);
    } catch (e) {
      // the samples are for people to read: without them the adapter still trains (or is still done)
      job.emit({
        type: 'error',
        adapter: job.name,
        message: `could not sample eval.prompts ${when} training: ${(e as Error).message}`,
        time: Date.now(),
      });
      return;
    }
    for (const s of got) job.emit({ type: 'sample', adapter: job.name, step: job.step, when, ...s, time: Date.now() });
  }

  /** Moves a job at a step boundary off the stages into host memory. */
  private async park(job: Job): Promise<void> {
    const state = await this.pipeline.exportAdapter(job.id);
    const source = job.sourceState();
    await this.takeOff(job);
    job.parked = { state, source };
    job.parkRequested = false;
    job.setState('parked');
  }

  /** Removes a job's adapter from every stage and gives its bytes back. */
  private async takeOff(job: Job): Promise<void> {
    const bytes = this.resident.get(job.id);
    if (!bytes) return;
    this.resident.delete(job.id);
    await this.pipeline.removeAdapter(job.id);
    bytes.forEach((b, s) => (this.restFree![s]! += b));
  }

  private aborting: Promise<void> | undefined;

  /** True when `e` means the pipeline failed for good; then every unfinished adapter is saved and stopped (once). */
  private pipelineFailed(e: unknown): boolean {
    if (!(e instanceof StageFailure)) return false;
    this.aborting ??= this.abort(e);
    return true;
  }

  /** Saves each unfinished adapter's last consistent state (its last optimizer step) as a checkpoint, then fails it. */
  private async abort(e: StageFailure): Promise<void> {
    this.fatal = e;
    this.stopping = true;
    this.wake();
    const open = [...this.jobs.values()].filter((j) => !j.terminal() && j.state !== 'queued' && j.state !== 'loading');
    for (const job of open) {
      if (!this.hooks.checkpoint) continue;
      try {
        const path = await this.hooks.checkpoint(job, await this.pipeline.exportAdapter(job.id));
        job.emit({ type: 'checkpoint', adapter: job.name, step: job.step, path, time: Date.now() });
      } catch (err) {
        job.emit({
          type: 'error',
          adapter: job.name,
          message: `could not save a checkpoint: ${(err as Error).message}`,
          time: Date.now(),
        });
      }
    }
    for (const j of this.jobs.values())
      this.failJob(j, `run stopped: ${e.message}${this.hooks.checkpoint ? ' (last state saved)' : ''}`);
  }

  /** A NaN/Inf loss or gradient norm: the adapter rolls back (on_nan: rollback, while allowed) or stops; the others go on. */
  private nonFinite(job: Job, why: string): void {
    const o = job.config.on_nan;
    if (o.action !== 'rollback' || !job.rollbackPoint) {
      this.failJob(job, `${why}: adapter stopped (the other adapters go on)`);
      return;
    }
    if (job.rollbacks >= o.max_rollbacks) {
      this.failJob(
        job,
        `${why} after ${job.rollbacks} rollback(s) (on_nan.max_rollbacks ${o.max_rollbacks}): adapter stopped (the other adapters go on)`,
      );
      return;
    }
    if (job.rollingBack) return;
    job.rollingBack = true;
    // not awaited: this may run inside the job's own optimizer step, which the rollback waits
    // for; tracked with the steps, so stop() and exportAll() wait for it to end
    const p = this.rollback(job, why).finally(() => {
      this.stepping.delete(p);
      this.wake();
    });
    this.stepping.add(p);
  }

  /** Puts a job back to its rollback point with a lower learning rate, once nothing of it is in flight. */
  private async rollback(job: Job, why: string): Promise<void> {
    try {
      await this.quiesce(job, false);
      if (job.terminal()) return;
      const point = job.rollbackPoint!;
      const from = job.step + 1;
      // one residency change among the others (placement, parking, retiring): the adapter's
      // weights and the job's step and data position change together
      await this.exclusive(async () => {
        if (job.terminal() || !this.resident.has(job.id)) return; // cancelled meanwhile
        // the same bytes leave and come back: the memory accounting does not change
        await this.pipeline.removeAdapter(job.id);
        await this.pipeline.addAdapter(job.id, job.spec, cloneState(point.state));
        job.restoreSource(point.source);
        job.step = point.step;
        job.tokens = point.tokens;
        job.stepLoss = 0;
        job.stepTargets = 0;
        job.admittedInStep = 0;
        job.doneInStep = 0;
        job.rollbacks++;
        job.lrScale *= job.config.on_nan.lr_factor;
        job.emit({
          type: 'rollback',
          adapter: job.name,
          fromStep: from,
          toStep: point.step,
          lrScale: job.lrScale,
          rollbacks: job.rollbacks,
          reason: why,
          time: Date.now(),
        });
      });
    } catch (e) {
      if (!this.pipelineFailed(e)) this.failJob(job, `${why}; the rollback failed: ${(e as Error).message}`);
    } finally {
      job.rollingBack = false;
    }
  }

  private failJob(job: Job, message: string) {
    if (job.terminal()) return;
    job.error = message;
    job.emit({ type: 'error', adapter: job.name, message, time: Date.now() });
    job.setState('failed');
    void this.retire(job);
  }

  /** Takes a finished/failed/cancelled job's adapter off the stages (a parked job's state is dropped). */
  async retire(job: Job): Promise<void> {
    await this.quiesce(job);
    job.parked = undefined;
    job.prepared = undefined;
    try {
      await this.exclusive(() => this.takeOff(job));
    } catch {
      /* already gone */
    }
    this.wake();
  }

  private async loop(): Promise<void> {
    for (;;) {
      if (this.stopping && this.inflight.size === 0 && this.stepping.size === 0 && !this.placement) return;
      if (!this.stopping) {
        try {
          this.place();
          this.admit();
        } catch (e) {
          this.fatal = e as Error;
          this.stopping = true;
          for (const j of this.jobs.values()) this.failJob(j, (e as Error).message);
        }
      }
      const wake = new Promise<void>((r) => (this.wakeResolve = r));
      const pending = [...this.inflight.values(), ...this.stepping, ...(this.placement ? [this.placement] : [])];
      await Promise.race([wake, ...pending.map((p) => p.catch(() => {}))]);
    }
  }

  private runnable(): Job[] {
    const limit = microBatchesInFlight(
      this.running(),
      this.pipeline.plans.length,
      this.admission,
      this.options.inflightPerAdapter,
    );
    // the adapter furthest behind first, with its whole step in flight (lib/schedule/fairness.ts)
    const prog = (j: Job) => progress(j.step, j.admittedInStep, j.microCount, j.totalSteps);
    const running = [...this.jobs.values()].filter((j) => j.state === 'running');
    const lead = Math.max(0, ...running.map(prog));
    const fixed = this.options.inflightPerAdapter !== undefined || this.pipeline.plans.length <= 1;
    const all = running.filter((j) => j.canAdmit(fixed ? limit : inFlightLimit(prog(j), lead, limit, j.microCount)));
    return admissionOrder(all, (j) => ({ id: j.id, priority: j.priority, progress: prog(j) }), this.rr);
  }

  private running(): number {
    let n = 0;
    for (const j of this.jobs.values()) if (j.state === 'running') n++;
    return n;
  }

  private admit(): void {
    const S = this.pipeline.plans.length;
    while (this.inflight.size < this.admission) {
      // One device: an optimizer step runs on the same device as the next message anyway, so
      // wait for it; the adapter that is stepping then joins that message instead of being
      // left for a message of its own (which would split BatchLoRA into ever smaller batches).
      if (this.options.batchlora && S === 1 && this.stepping.size > 0) return;
      const ready = this.runnable();
      if (!ready.length) return;
      const per = this.options.batchlora
        ? adaptersPerMessage(this.running(), S, this.options.adaptersPerMicroBatch)
        : 1;
      const chosen: Job[] = [];
      let tokens = 0;
      for (const j of ready) {
        if (chosen.length >= per) break;
        const n = j.peek()!.numTokens;
        if (n > this.pipeline.maxTokens) {
          this.failJob(
            j,
            `a micro-batch of ${n} tokens is larger than the pipeline's max_tokens (${this.pipeline.maxTokens}, the maxTokens start option): lower micro_batch_size or seq_len`,
          );
          continue;
        }
        if (chosen.length && tokens + n > this.pipeline.maxTokens) continue;
        chosen.push(j);
        tokens += n;
      }
      if (!chosen.length) continue;
      this.rr = chosen[chosen.length - 1]!.id + 1;
      const parts = chosen.map((j) => ({ job: j, mb: j.peek()! }));
      const numTokens = parts.reduce((s, p) => s + p.mb.numTokens, 0);
      const numSeqs = parts.reduce((s, p) => s + p.mb.cuSeqlens.length - 1, 0);
      const segs = parts.map((p) => ({ rows: p.mb.numTokens, spec: p.job.spec }));
      const need = this.pipeline.activationBytes(numTokens, segs, numSeqs);
      const transient = this.pipeline.transientBytes?.(numTokens, segs, numSeqs) ?? need.map(() => 0);
      const held = need.map((b, s) => b - transient[s]!);
      const short = need.findIndex((_, s) => !this.fits(s, held[s]!, transient[s]!));
      if (short >= 0) {
        if (this.inflight.size === 0 && !this.promised.some((b) => b > 0)) {
          for (const p of parts) {
            this.failJob(
              p.job,
              `a micro-batch of ${numTokens} tokens needs ${need[short]} bytes of activations on ${this.pipeline.devices[short]}, ` +
                `only ${this.restFree![short]! - this.promised[short]!} are free: lower micro_batch_size or seq_len, or give the device more memory`,
            );
          }
          continue;
        }
        return; // wait for memory to come back
      }
      for (const p of parts) p.job.take();
      this.launch(parts, numTokens, held, transient);
    }
  }

  private launch(
    parts: Array<{ job: Job; mb: SourceMicroBatch }>,
    numTokens: number,
    reserve: number[],
    transient: number[],
  ): void {
    const data = assemble(
      this.nextMb++,
      parts.map((p) => ({ adapter: p.job.id, serial: microSerial(p.mb), mb: p.mb })),
      numTokens,
    );
    for (const p of parts) {
      // at the step's first micro-batch: its others may be in flight with it, and one fault is one attempt of the step
      const f =
        p.job.admittedInStep === 0
          ? this.nanFaults.find((x) => x.adapter === p.job.name && x.step === p.job.step + 1)
          : undefined;
      if (f) {
        this.nanFaults.splice(this.nanFaults.indexOf(f), 1);
        void this.pipeline.poison(p.job.id);
        p.job.emit({
          type: 'fault',
          adapter: p.job.name,
          fault: 'nan',
          detail: `injected NaN weights before step ${p.job.step + 1}`,
          time: Date.now(),
        });
      }
      p.job.inflight++;
      p.job.admittedInStep++;
      p.job.microCount = p.mb.microCount;
    }
    reserve.forEach((b, s) => (this.reserved[s]! += b));
    this.transient.set(data.id, transient);
    const done = this.pipeline
      .train(data)
      .then(
        (losses) => this.completed(parts, data, losses),
        (e: Error) => {
          if (this.pipelineFailed(e)) return;
          for (const p of parts) this.failJob(p.job, `micro-batch ${data.id} failed: ${e.message}`);
        },
      )
      .finally(() => {
        reserve.forEach((b, s) => (this.reserved[s]! -= b));
        this.transient.delete(data.id);
        for (const p of parts) p.job.inflight--;
        this.inflight.delete(data.id);
        this.wake();
      });
    this.inflight.set(data.id, done);
    this.peakInflightCount = Math.max(this.peakInflightCount, this.inflight.size);
  }

  private completed(
    parts: Array<{ job: Job; mb: SourceMicroBatch }>,
    data: MicroBatchData,
    losses: Float32Array,
  ): void {
    data.segments.forEach((seg, i) => {
      const job = parts[i]!.job;
      if (job.terminal() || job.rollingBack) return;
      let sum = 0;
      for (let r = seg.rowStart; r < seg.rowEnd; r++) sum += losses[r]!;
      if (!Number.isFinite(sum)) {
        this.nonFinite(job, `loss became ${sum} at step ${job.step + 1}`);
        return;
      }
      job.stepLoss += sum;
      job.stepTargets += parts[i]!.mb.numTargetTokens;
      job.tokens += parts[i]!.mb.numTokens;
      job.doneInStep++;
      if (parts[i]!.mb.lastOfStep || job.doneInStep >= job.microCount) {
        const p = this.optimizerStep(job, parts[i]!.mb.stepTargetTokens).finally(() => {
          this.stepping.delete(p);
          this.wake();
        });
        this.stepping.add(p);
      }
    });
  }

  private async optimizerStep(job: Job, stepTargetTokens: number): Promise<void> {
    job.stepping = true;
    try {
      const c = job.config;
      const lr = lrAt(c.optimizer.lr * job.lrScale, c.schedule, job.step, job.totalSteps);
      const params = (gradScale: number) => ({
        lr,
        beta1: c.optimizer.betas[0],
        beta2: c.optimizer.betas[1],
        eps: c.optimizer.eps,
        weightDecay: c.optimizer.weight_decay,
        step: job.step + 1,
        gradScale,
      });
      let gradNorm: number;
      if (c.max_grad_norm !== undefined) {
        // clipping needs the global norm over every stage before the step
        gradNorm = Math.sqrt(await this.pipeline.gradSumsq(job.id));
        if (!Number.isFinite(gradNorm)) {
          this.nonFinite(job, `gradient norm became ${gradNorm} at step ${job.step + 1}`);
          return;
        }
        await this.pipeline.step(job.id, params(Math.min(1, c.max_grad_norm / (gradNorm + 1e-6))));
      } else {
        // no clipping: the norm (for the metrics) comes back with the step, in one round trip
        gradNorm = Math.sqrt((await this.pipeline.step(job.id, params(1), true)).sumsq ?? NaN);
        if (!Number.isFinite(gradNorm)) {
          this.nonFinite(job, `gradient norm became ${gradNorm} at step ${job.step + 1}`);
          return;
        }
      }
      // cancelled (or failed) while the step ran: it must not go on to finish() and turn 'done'
      if (job.terminal()) return;
      job.step++;
      const loss = job.stepLoss / Math.max(1, stepTargetTokens);
      job.lastLoss = loss;
      job.emit({
        type: 'step',
        adapter: job.name,
        step: job.step,
        totalSteps: job.totalSteps,
        loss,
        lr,
        tokens: job.tokens,
        gradNorm,
        time: Date.now(),
      });
      job.stepLoss = 0;
      job.stepTargets = 0;
      job.admittedInStep = 0;
      job.doneInStep = 0;
      const last = job.step >= job.totalSteps || job.peek() === null;
      if (job.evalSource && c.eval && (job.step % c.eval.every === 0 || last)) await this.evaluate(job);
      const saving = c.save_every !== undefined && job.step % c.save_every === 0 && !last;
      const rollsBack = c.on_nan.action === 'rollback';
      // one export serves the checkpoint and the rollback point (which follows the checkpoints, also when nothing is written)
      const state =
        saving && (this.hooks.checkpoint || rollsBack) ? await this.pipeline.exportAdapter(job.id) : undefined;
      if (state && rollsBack) job.rollbackPoint = rollbackPoint(job, state);
      if (this.hooks.checkpoint && state) {
        let path: string;
        try {
          path = await this.hooks.checkpoint(job, state);
        } catch (e) {
          // a full disk or an unwritable output: the previous checkpoint stays valid (a save is written aside, then swapped in)
          throw new Error(
            `could not write the checkpoint at step ${job.step}: ${(e as Error).message}; training of '${job.name}' stopped, its newest complete checkpoint is kept (free space or fix the output, then --resume)`,
          );
        }
        job.emit({ type: 'checkpoint', adapter: job.name, step: job.step, path, time: Date.now() });
      }
      if (last) await this.finish(job);
    } catch (e) {
      if (!this.pipelineFailed(e)) this.failJob(job, (e as Error).message);
    } finally {
      job.stepping = false;
    }
  }

  /** Held-out loss over the job's eval data. */
  async evaluate(job: Job): Promise<{ loss: number; perplexity: number; tokens: number }> {
    const src = job.evalSource!();
    let sum = 0;
    let count = 0;
    for (let mb = src.next(); mb; mb = src.next()) {
      const data = assemble(this.nextMb++, [{ adapter: job.id, serial: 0, mb }], mb.numTokens, true);
      const losses = await this.pipeline.evaluate(data);
      for (let i = 0; i < losses.length; i++) sum += losses[i]!;
      count += mb.numTargetTokens;
    }
    const loss = sum / Math.max(1, count);
    const r = { loss, perplexity: Math.exp(loss), tokens: count };
    job.lastEval = r;
    job.emit({
      type: 'eval',
      adapter: job.name,
      step: job.step,
      loss,
      perplexity: r.perplexity,
      tokens: count,
      time: Date.now(),
    });
    return r;
  }

  private async finish(job: Job): Promise<void> {
    const state = await this.pipeline.exportAdapter(job.id);
    await this.samples(job, state, 'after');
    if (this.hooks.finish) job.outputPath = await this.hooks.finish(job, state);
    job.emit({
      type: 'done',
      adapter: job.name,
      steps: job.step,
      loss: job.lastLoss,
      path: job.outputPath,
      time: Date.now(),
    });
    job.setState('done');
    await this.takeOff(job);
  }

  /** Exports every live adapter's state (checkpoint on exit). */
  async exportAll(): Promise<Array<{ job: Job; state: AdapterState }>> {
    const out: Array<{ job: Job; state: AdapterState }> = [];
    for (const j of this.jobs.values()) {
      if (j.terminal() || j.state === 'queued' || j.state === 'loading') continue;
      if (j.parked) {
        out.push({ job: j, state: j.parked.state });
        continue;
      }
      await this.quiesce(j);
      out.push({ job: j, state: await this.pipeline.exportAdapter(j.id) });
    }
    return out;
  }
}

function cloneState(s: AdapterState): AdapterState {
  return { params: s.params.slice(), m: s.m.slice(), v: s.v.slice(), version: s.version };
}

/** A copy of the job's state now (at a step boundary) to roll back to. */
function rollbackPoint(job: Job, state: AdapterState): NonNullable<Job['rollbackPoint']> {
  return { state: cloneState(state), source: structuredClone(job.sourceState()), step: job.step, tokens: job.tokens };
}

/**
 * The serial that seeds a micro-batch's dropout masks: a pure function of its place in the
 * adapter's data (step, index in the step), not a counter of this process, so a run resumed
 * from a checkpoint (or a replay) draws exactly the masks the uninterrupted run draws.
 */
export function microSerial(mb: Pick<SourceMicroBatch, 'step' | 'microIndex'>): number {
  if (mb.microIndex >= 2 ** 20)
    throw new Error(`micro-batch index ${mb.microIndex} is too large (at most 2^20 micro-batches per step)`);
  return mb.step * 2 ** 20 + mb.microIndex;
}

/**
 * Concatenates adapters' micro-batches into one BatchLoRA micro-batch: rows of adapter i form
 * segment i; targets are the labels shifted by one within each sequence (HF causal-LM);
 * each target row weighs 1/(target tokens of its adapter's step).
 */
export function assemble(
  id: number,
  parts: Array<{ adapter: number; serial: number; mb: SourceMicroBatch }>,
  numTokens: number,
  evalMode = false,
): MicroBatchData {
  const tokens = new Int32Array(numTokens);
  const positions = new Int32Array(numTokens);
  const targets = new Int32Array(numTokens).fill(-100);
  const weights = new Float32Array(numTokens);
  const nseq = parts.reduce((s, p) => s + p.mb.cuSeqlens.length - 1, 0);
  const cu = new Int32Array(nseq + 1);
  const segments: Segment[] = [];
  let row = 0;
  let q = 0;
  for (const p of parts) {
    const m = p.mb;
    tokens.set(m.inputIds, row);
    positions.set(m.positions, row);
    const w = evalMode ? 1 : 1 / Math.max(1, m.stepTargetTokens);
    for (let s = 0; s + 1 < m.cuSeqlens.length; s++) {
      const b = m.cuSeqlens[s]!,
        e = m.cuSeqlens[s + 1]!;
      cu[q++] = row + b;
      for (let i = b; i + 1 < e; i++) {
        const t = m.labels[i + 1]!;
        if (t !== -100) {
          targets[row + i] = t;
          weights[row + i] = w;
        }
      }
    }
    segments.push({ adapter: p.adapter, rowStart: row, rowEnd: row + m.numTokens, serial: p.serial });
    row += m.numTokens;
  }
  cu[q] = row;
  return { id, segments, tokens, positions, cuSeqlens: cu, targets, weights };
}

// ---- starting a supervisor with its pipeline (the programmatic API)

export interface StartOptions {
  /** Hugging Face model directory. */
  model: string;
  /** cpu:N / cuda:N per stage, or 'auto' (every GPU; else CPU stages sharing the cores). */
  devices?: string[] | 'auto' | 'cluster';
  /** CPU threads per device (default: the machine's cores shared evenly). */
  threads?: number;
  /** Byte budget per device (e.g. "4GiB"); default: a share of 80% of RAM, or the GPU's free memory. */
  memory?: string | number;
  /** Layers per stage, or 'auto' (cost model). */
  split?: 'auto' | number[];
  /** What the data looks like, for the 'auto' split's cost model (sequence length, fraction of rows with a target). */
  splitProfile?: SplitProfile;
  batchlora?: boolean;
  /** Activation recomputation on every stage: less memory per micro-batch, one more layer forward per layer backward. */
  recompute?: boolean;
  /** f32 (default) or bf16: bf16 base weights and GEMM operands, f32 accumulation; LoRA, gradients, AdamW and the loss stay f32. */
  computeDtype?: 'f32' | 'bf16';
  /** Quantize the base's decoder linears at load (QLoRA style): nf4, nf4-dq (double quantization) or int8. */
  quantize?: QuantizeMode;
  inflight?: number;
  inflightPerAdapter?: number;
  adaptersPerMicroBatch?: number;
  /** Most tokens in one micro-batch message (sizes the shared slots). Default 4096. */
  maxTokens?: number;
  /** Where finished adapters and checkpoints go (none: nothing written). */
  output?: string;
  /** Continue each submitted adapter from its newest complete checkpoint under `output`. */
  resume?: boolean;
  /**
   * Train submitted adapters that already have results under `output` again from the start;
   * their earlier results move to <output>/.overwritten-<runId>/ until the new ones are
   * written. Without resume or overwrite, submit() refuses such an adapter.
   */
  overwrite?: boolean;
  /** This run's id (default: a new one, lib/io/output.ts newRunId). */
  runId?: string;
  /** Fault injection specs (lib/faults.ts grammar), for testing recovery. */
  faults?: Array<string | FaultSpec>;
  /** Run the stages in this thread instead of worker threads (tests, single device). */
  inProcess?: boolean;
  onEvent?: (ev: JobEvent) => void;
  onFault?: (ev: FaultEvent) => void;
  heartbeatMs?: number;
  hangTimeoutMs?: number;
  /** Failures of one stage tolerated before the run stops (default 3). */
  maxStageFailures?: number;
  /** Tokenizer pool threads for large datasets. */
  dataThreads?: number;
  /**
   * Run the stages on the cluster's stage hosts (`mlora stage serve`): a nats:// URL with
   * credentials, or the options. `devices` then names registered devices (host/cpu:0) or is
   * 'cluster' (every free registered device).
   */
  cluster?: string | ClusterOptions;
}

export interface ResolvedLayout {
  devices: string[];
  threads: number[];
  budgets: number[];
  plans: StagePlan[];
}

/** Devices, threads, budgets and the layer split for a model (what --dry-run prints). */
export function resolveLayout(
  config: LlamaConfig,
  o: Pick<StartOptions, 'devices' | 'threads' | 'memory' | 'split' | 'splitProfile'>,
): ResolvedLayout {
  const cores = availableParallelism();
  let devices: string[];
  if (!o.devices || o.devices === 'auto') {
    const n = native().info().cuda.devices;
    if (n > 0) devices = Array.from({ length: Math.min(n, config.numLayers) }, (_, i) => `cuda:${i}`);
    else devices = Array.from({ length: Math.max(1, Math.min(cores, config.numLayers, 8)) }, (_, i) => `cpu:${i}`);
  } else if (o.devices === 'cluster')
    throw new Error("devices: 'cluster' needs a cluster to run on (--cluster nats://...)");
  else devices = o.devices;
  if (!devices.length) throw new Error('no devices given');
  const seen = new Set<string>();
  for (const d of devices) {
    parseDeviceSpec(d);
    if (seen.has(d)) throw new Error(`device ${d} is listed twice`);
    seen.add(d);
  }
  const cpuCount = devices.filter((d) => d.startsWith('cpu')).length;
  const threads = devices.map((d) =>
    d.startsWith('cpu') ? (o.threads ?? Math.max(1, Math.floor(cores / Math.max(1, cpuCount)))) : 1,
  );
  const budgets = devices.map((d) =>
    o.memory !== undefined ? parseBytes(o.memory) : d.startsWith('cpu') ? defaultCpuBudget(cpuCount) : 0,
  );
  const plans =
    !o.split || o.split === 'auto'
      ? balanceSplit(config, threads, o.splitProfile).plans
      : explicitSplit(config, o.split);
  if (plans.length !== devices.length)
    throw new Error(`pipeline.split has ${plans.length} stages for ${devices.length} devices`);
  return { devices, threads, budgets, plans };
}

/**
 * The layout on registered cluster devices: each device's budget and threads are what its host
 * registered (--memory / --threads still override), the split balances the threads.
 */
export function clusterLayout(
  config: LlamaConfig,
  devices: ClusterDevice[],
  o: Pick<StartOptions, 'threads' | 'memory' | 'split' | 'splitProfile'>,
): ResolvedLayout {
  if (!devices.length) throw new Error('no devices given');
  const ids = devices.map((d) => d.id);
  const dup = ids.find((d, i) => ids.indexOf(d) !== i);
  if (dup) throw new Error(`device ${dup} is listed twice`);
  const threads = devices.map((d) => o.threads ?? d.threads);
  const budgets = devices.map((d) => (o.memory !== undefined ? parseBytes(o.memory) : d.memory));
  const plans =
    !o.split || o.split === 'auto'
      ? balanceSplit(config, threads, o.splitProfile).plans
      : explicitSplit(config, o.split);
  if (plans.length !== devices.length)
    throw new Error(`pipeline.split has ${plans.length} stages for ${devices.length} devices`);
  return { devices: ids, threads, budgets, plans };
}

/** Connects to the cluster and places the stages on its registered devices (what --dry-run prints with --cluster). */
export async function resolveClusterLayout(
  config: LlamaConfig,
  o: Pick<StartOptions, 'cluster' | 'devices' | 'threads' | 'memory' | 'split' | 'splitProfile'>,
) {
  const cluster = await Cluster.connect(typeof o.cluster === 'string' ? { url: o.cluster } : o.cluster!);
  try {
    const devs = await cluster.resolve(
      !o.devices || o.devices === 'auto' || o.devices === 'cluster' ? 'cluster' : o.devices,
    );
    const layout = clusterLayout(config, devs, o);
    cluster.placement.push(...devs.slice(0, layout.plans.length));
    return { cluster, layout };
  } catch (e) {
    await cluster.close();
    throw e;
  }
}

/** Faults the supervisor injects itself (the others go to the stages). */
const SUPERVISOR_FAULTS: Array<FaultSpec['kind']> = ['nan', 'kill', 'pause'];

export async function startSupervisor(o: StartOptions): Promise<Supervisor> {
  if (o.resume && o.overwrite)
    throw new Error(
      'resume and overwrite exclude each other: go on from the checkpoints, or train again from the start',
    );
  const dir = openModelDir(o.model);
  const config = dir.config;
  const placed = o.cluster ? await resolveClusterLayout(config, o) : undefined;
  const layout = placed?.layout ?? resolveLayout(config, o);
  const faults = (o.faults ?? []).map((f) => (typeof f === 'string' ? parseFault(f) : f));
  const S = layout.plans.length;
  const inflight = o.inflight ?? Math.max(1, 2 * S);
  // a head share is a stage actor's round trip; in this thread the last stage runs the whole head
  if (o.inProcess) layout.plans = layout.plans.map(({ headShare: _, ...p }) => p);
  const base: BaseFormat = {
    ...(o.computeDtype ? { computeDtype: o.computeDtype } : {}),
    ...(o.quantize ? { quantize: o.quantize } : {}),
  };
  linearQuantization(dir, o.quantize); // a conflict with a pre-quantized checkpoint fails here, before any stage starts
  let pipeline: Pipeline;
  if (o.inProcess) {
    const stages: StageProgram[] = [];
    try {
      for (let s = 0; s < S; s++) {
        const device = openDevice(layout.devices[s]!, {
          threads: layout.threads[s]!,
          ...(layout.budgets[s] ? { budget: layout.budgets[s] } : {}),
        });
        stages.push(
          new StageProgram(
            device,
            config,
            layout.plans[s]!,
            await loadStageWeights(device, dir, layout.plans[s]!, base),
            { recompute: !!o.recompute, ...(o.computeDtype ? { computeDtype: o.computeDtype } : {}) },
          ),
        );
      }
    } catch (e) {
      for (const st of stages) st.free();
      throw e;
    }
    pipeline = new LocalPipeline(config, stages);
  } else {
    const cluster = placed?.cluster;
    pipeline = await ActorPipeline.start({
      ...(cluster
        ? { stageEndpoint: (init, restart) => cluster.endpoint(init, restart) as unknown as StageWorker }
        : {}),
      modelDir: o.model,
      config,
      plans: layout.plans,
      devices: layout.devices,
      threads: layout.threads,
      budgets: layout.budgets,
      maxTokens: o.maxTokens ?? 4096,
      inflight,
      faults: faults.filter((f) => !SUPERVISOR_FAULTS.includes(f.kind)),
      ...(o.recompute ? { recompute: true } : {}),
      base,
      ...(o.heartbeatMs ? { heartbeatMs: o.heartbeatMs } : {}),
      ...(o.hangTimeoutMs ? { hangTimeoutMs: o.hangTimeoutMs } : {}),
      ...(o.maxStageFailures !== undefined ? { maxStageFailures: o.maxStageFailures } : {}),
      ...(o.onFault ? { onFault: o.onFault } : {}),
    }).catch(async (e) => {
      await cluster?.close();
      throw e;
    });
    if (cluster) {
      const close = pipeline.close.bind(pipeline);
      pipeline.close = async () => {
        await close();
        await cluster.close();
      };
    }
  }
  const runId = o.runId ?? newRunId();
  const env = {
    modelDir: o.model,
    model: config,
    ...(o.output ? { output: o.output } : {}),
    resume: !!o.resume,
    overwrite: !!o.overwrite,
    runId,
    ...(o.dataThreads ? { dataThreads: o.dataThreads } : {}),
  };
  const at = (kind: FaultSpec['kind'], ev: JobEvent) =>
    faults.some((f) => f.kind === kind && f.adapter === ev.adapter && f.step === (ev as { step?: number }).step);
  const onEvent = !faults.some((f) => f.kind === 'kill' || f.kind === 'pause')
    ? o.onEvent
    : (ev: JobEvent) => {
        o.onEvent?.(ev);
        if (ev.type === 'checkpoint' && at('kill', ev)) process.kill(process.pid, 'SIGKILL');
        if (ev.type === 'step' && at('pause', ev)) for (const j of sup.jobs.values()) void j.pause();
      };
  const hooks: SupervisorHooks = {
    prepare: (c) => prepareJob(env, c),
    ...outputHooks(env),
    ...promptSampler(env),
    ...(onEvent ? { onEvent } : {}),
  };
  const sup = new Supervisor(pipeline, hooks, {
    batchlora: o.batchlora ?? true,
    inflight,
    ...(o.inflightPerAdapter ? { inflightPerAdapter: o.inflightPerAdapter } : {}),
    ...(o.adaptersPerMicroBatch ? { adaptersPerMicroBatch: o.adaptersPerMicroBatch } : {}),
  });
  sup.nanFaults = faults.filter((f) => f.kind === 'nan');
  sup.runId = runId;
  return sup;
}
