// The job scheduler: owns every adapter job, decides which adapters are on the stages and which
// micro-batches run, and when each job steps, evaluates and checkpoints. It speaks to the stages
// only through the `Pipeline` interface (actors/pipeline.ts), so the same scheduler drives the
// in-thread single-device trainer (actors/local.ts), the worker-thread pipeline (ActorPipeline,
// actors/runtime.ts, which supervises the stage workers: heartbeats, restarts, replay) and the
// fake pipeline of its tests. The public API calls it `Supervisor` (actors/index.ts).
//
// JobScheduler.start (start.ts openRun, layout.ts) opens the pipeline first. Then one
// micro-batch, from submit to checkpoint:
//  1. submit   scheduler.ts JobScheduler.submit validates the adapter config (lib/config.ts) and
//              makes a Job (job.ts); JobScheduler.load runs hooks.prepare (prepare.ts prepareJob:
//              its data loader of packed micro-batches, its starting state).
//  2. place    placement.ts Placement.place → placeWaiting: the job's adapter goes on every stage
//              (putOnStages → pipeline.addAdapter) when the memory ledger (memory.ts
//              MemoryLedger) has room, else lower-priority jobs park at a step boundary (park).
//  3. admit    admission.ts Admission.admit: runnable jobs by priority, then round-robin; up to
//              adaptersPerMessage of them (lib/schedule/packing.ts) share one message if it fits
//              maxTokens and the ledger (MemoryLedger.fits); Admission.launch packs them
//              (assemble.ts assemble, microSerial) and holds their bytes (MemoryLedger.hold).
//  4. train    pipeline.train(data): forward, loss and backward through every stage
//              (ActorPipeline.train in actors/runtime.ts, or LocalPipeline.train in actors/local.ts).
//  5. losses   admission.ts Admission.completed adds each segment's row losses to its job (a NaN
//              goes to rollback.ts Rollback.nonFinite); the message's bytes come back
//              (MemoryLedger.release). The job's last micro-batch of the step starts its step.
//  6. step     step.ts Steps.optimizerStep: learning rate (lib/lora/schedule.ts), the gradient
//              norm and clipping, pipeline.step (AdamW on every stage), the `step` event, and
//              Steps.evaluate on schedule.
//  7. save     step.ts Steps.optimizerStep, on save_every: hooks.checkpoint (prepare.ts
//              outputHooks → lib/io/checkpoint.ts) and the rollback point (job.ts setRollbackPoint);
//              after the last step Steps.finish writes the adapter and takes it off the stages.
// JobScheduler.loop runs steps 2 and 3 on every wake(): each completion, step and state change.
import { parseAdapterConfig, type AdapterConfig, type AdapterConfigInput } from '../../lib/config.js';
import type { FaultSpec } from '../../lib/faults.js';
import type { AdapterState } from '../../lib/lora/state.js';
import type { Pipeline } from '../pipeline.js';
import { StageFailure } from '../recovery.js';
import { Admission } from './admission.js';
import type { SchedulerContext, SchedulerOptions } from './context.js';
import { Job, type JobOwner } from './job.js';
import type { SchedulerHooks } from './job-types.js';
import { MemoryLedger } from './memory.js';
import { Placement } from './placement.js';
import { Rollback } from './rollback.js';
import { openRun, type StartOptions } from './start.js';
import { Steps } from './step.js';

export class JobScheduler implements JobOwner, SchedulerContext {
  readonly jobs = new Map<number, Job>();
  /** nan:adapter=NAME,step=K faults: poison that adapter's loss at that step (testing). */
  nanFaults: FaultSpec[] = [];
  /** The run's id (JobScheduler.start: StartOptions.runId, else a new one). */
  runId = '';

  // The roles, each in its own file; they share this object's state below (as a SchedulerContext).
  /** @internal Bytes per stage: free at rest, held by micro-batches in flight, by adapters. */
  readonly ledger = new MemoryLedger();
  /** Which adapters are on the stages. */
  private readonly placement = new Placement(this);
  /** Which micro-batches enter the pipeline. */
  private readonly admission: Admission;
  /** Optimizer steps, evaluation, checkpoints, finishing. */
  private readonly steps = new Steps(this);
  /** NaN handling. */
  private readonly rollback = new Rollback(this);

  /** @internal Micro-batch messages in flight, by message id. */
  readonly inflight = new Map<number, Promise<void>>();
  /** @internal Steps, baselines and rollbacks in flight. */
  readonly stepping = new Set<Promise<void>>();
  /** @internal Evaluation messages in flight and waiting for room (Steps.evaluate). */
  readonly evaluations = { inflight: new Set<Promise<unknown>>(), waiting: 0 };
  /** @internal Counts wake() calls: a placement pass runs only when something happened since the last one began. */
  wakes = 0;
  /** @internal No more admitting or placing (stop(), or the run failed). */
  stopping = false;
  private nextJobId = 1;
  private nextMb = 1;
  private wakeResolve: (() => void) | undefined;
  private readonly loopDone: Promise<void>;
  private fatal: Error | undefined;
  private aborting: Promise<void> | undefined;

  /** Opens the pipeline for these options (start.ts) and a scheduler on it. */
  static async start(o: StartOptions): Promise<JobScheduler> {
    // a pause: fault fires at a step event, so only once the scheduler below exists
    const run = await openRun(o, () => {
      for (const j of sched.jobs.values()) void j.pause();
    });
    const sched = new JobScheduler(run.pipeline, run.hooks, run.options);
    sched.nanFaults = run.nanFaults;
    sched.runId = run.runId;
    return sched;
  }

  constructor(
    readonly pipeline: Pipeline,
    readonly hooks: SchedulerHooks,
    readonly options: SchedulerOptions,
  ) {
    this.admission = new Admission(this);
    pipeline.onOutOfMemory = () => this.admission.shrink();
    this.loopDone = this.loop();
  }

  /** The most micro-batch messages that were in flight at once (diagnostics). */
  get peakInflight(): number {
    return this.admission.peakInflight;
  }

  /** Micro-batch messages admitted into the pipeline at most (options.inflight, less after an out-of-memory). */
  get admissionLimit(): number {
    return this.admission.limit;
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

  /** Takes a finished/failed/cancelled job's adapter off the stages (a parked job's state is dropped). */
  retire(job: Job): Promise<void> {
    return this.placement.retire(job);
  }

  /** Exports every live adapter's state (checkpoint on exit). */
  async exportAll(): Promise<Array<{ job: Job; state: AdapterState }>> {
    const out: Array<{ job: Job; state: AdapterState }> = [];
    for (const j of this.jobs.values()) {
      if (!j.live()) continue;
      if (j.parked) {
        out.push({ job: j, state: j.parked.state });
        continue;
      }
      await this.quiesce(j);
      out.push({ job: j, state: await this.pipeline.exportAdapter(j.id) });
    }
    return out;
  }

  // ---- shared by the roles (SchedulerContext, context.ts)

  /** @internal The id of the next micro-batch message (training or evaluation). */
  nextMessageId(): number {
    return this.nextMb++;
  }

  /** @internal Nothing in flight: no micro-batch, step or rollback (the ledger can measure). */
  idle(): boolean {
    return this.inflight.size === 0 && this.stepping.size === 0;
  }

  /** @internal Holds `work` as a step in flight: stop(), quiesce() and exportAll() wait for it; `after` runs when it ends. */
  hold(work: Promise<void>, after?: () => void): void {
    const p = work.finally(() => {
      after?.();
      this.stepping.delete(p);
      this.wake();
    });
    this.stepping.add(p);
  }

  /** @internal Runs fn with the job held as stepping (canAdmit false; stop(), quiesce() and exportAll() wait for it). */
  track(job: Job, fn: () => Promise<void>): void {
    job.stepping = true;
    this.hold(
      fn().catch((e) => {
        if (!this.pipelineFailed(e)) this.failJob(job, (e as Error).message);
      }),
      () => (job.stepping = false),
    );
  }

  /** @internal */
  failJob(job: Job, message: string) {
    if (job.terminal()) return;
    job.error = message;
    job.emit({ type: 'error', adapter: job.name, message, time: Date.now() });
    job.setState('failed');
    void this.retire(job);
  }

  /** @internal True when `e` means the pipeline failed for good; then every unfinished adapter is saved and stopped (once). */
  pipelineFailed(e: unknown): boolean {
    if (!(e instanceof StageFailure)) return false;
    this.aborting ??= this.abort(e);
    return true;
  }

  /** @internal */
  exclusive<T>(fn: () => Promise<T>): Promise<T> {
    return this.placement.exclusive(fn);
  }
  /** @internal */
  takeOff(job: Job): Promise<void> {
    return this.placement.takeOff(job);
  }
  /** @internal */
  optimizerStep(job: Job, stepTargetTokens: number): Promise<void> {
    return this.steps.optimizerStep(job, stepTargetTokens);
  }
  /** @internal */
  baseline(job: Job, initial: AdapterState): Promise<void> {
    return this.steps.baseline(job, initial);
  }
  /** @internal */
  finish(job: Job): Promise<void> {
    return this.steps.finish(job);
  }
  /** @internal */
  nonFinite(job: Job, why: string): void {
    this.rollback.nonFinite(job, why);
  }
  /** @internal */
  injectNaN(job: Job): void {
    this.rollback.injectNaN(job);
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

  /** Saves each unfinished adapter's last consistent state (its last optimizer step) as a checkpoint, then fails it. */
  private async abort(e: StageFailure): Promise<void> {
    this.fatal = e;
    this.stopping = true;
    this.wake();
    const open = [...this.jobs.values()].filter((j) => j.live());
    for (const job of open) {
      if (!this.hooks.checkpoint) continue;
      try {
        // a parked job's adapter is off the stages: its state at its last step is in host memory
        const state = job.parked ? job.parked.state : await this.pipeline.exportAdapter(job.id);
        const path = await this.hooks.checkpoint(job, state);
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

  private async loop(): Promise<void> {
    for (;;) {
      if (this.stopping && this.idle() && !this.placement.pass) return;
      if (!this.stopping) {
        try {
          this.placement.place();
          this.admission.admit();
        } catch (e) {
          this.fatal = e as Error;
          this.stopping = true;
          for (const j of this.jobs.values()) this.failJob(j, (e as Error).message);
        }
      }
      const wake = new Promise<void>((r) => (this.wakeResolve = r));
      const pass = this.placement.pass;
      const pending = [...this.inflight.values(), ...this.stepping, ...(pass ? [pass] : [])];
      await Promise.race([wake, ...pending.map((p) => p.catch(() => {}))]);
    }
  }
}

/** Opens the pipeline and a scheduler on it (JobScheduler.start). */
export function startScheduler(o: StartOptions): Promise<JobScheduler> {
  return JobScheduler.start(o);
}
