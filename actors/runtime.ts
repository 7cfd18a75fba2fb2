// The actor runtime: spawns one stage actor (worker thread) per device, wires the shared
// slab and the channels between neighbouring stages, starts each micro-batch on stage 0,
// applies optimizer steps, watches heartbeats, and recovers from faults. Forward and Backward
// go from stage to stage over a MessageChannel between the two workers (this thread only
// starts a micro-batch and hears when it is done), so a busy supervisor never delays a hop.
//
// Recovery model (exact, nothing lost, nothing applied twice): after every optimizer step of
// an adapter the runtime keeps a host snapshot of its state (params + AdamW moments), and it
// logs the micro-batches of each adapter's current, unfinished step. When a stage dies,
// hangs, runs out of memory or receives corrupted data, the runtime (1) replaces the stage
// actor when it is gone, (2) restores every adapter on every stage to its snapshot with zero
// gradients, and (3) replays the logged micro-batches in their original order, each reduced to
// the adapters whose step it belongs to. Rows of different adapters are independent in every
// kernel and accumulation happens in the same order, so the result is bitwise the same as a
// run without the fault.
import type { BaseFormat } from '../lib/model/weights.js';
import { MessageChannel, Worker, type MessagePort } from 'node:worker_threads';
import type { LoraSpec } from '../lib/lora/adapter.js';
import { allocBytes, StageAdapter } from '../lib/lora/adapter.js';
import { joinSlices } from '../lib/lora/state.js';
import type { LlamaConfig } from '../lib/model/config.js';
import type { StagePlan } from '../lib/model/stage.js';
import { activationBytes, scratchBytes, workBytes } from '../lib/model/stage.js';
import { ErrorCode, fromWire } from '../lib/errors.js';
import { holdsHead } from '../lib/model/batch.js';
import { metaLayout, Slab, SlotAllocator, slotBytesFor, SlotKind } from './shm.js';
import { clockMs } from './protocol.js';
import { assignCores, pinningEnabled } from '../lib/schedule/cores.js';
import { native } from '../lib/native.js';
import type { ControlMsg, ForwardMsg, FromStage, InitMsg, LinkMsg, Pipeline, ToStage } from './protocol.js';
import type { AdapterState, StepParams } from '../lib/lora/state.js';
import type { FaultSpec } from '../lib/faults.js';
import type { MicroBatchData } from '../lib/model/batch.js';
import type { ScheduleRecord } from '../lib/schedule/record.js';

export interface ActorPipelineOptions {
  modelDir: string;
  config: LlamaConfig;
  plans: StagePlan[];
  devices: string[];
  threads: number[];
  budgets: number[];
  /** Largest micro-batch in tokens (sizes the shared slots). */
  maxTokens: number;
  /** Micro-batch messages in flight at most (sizes the slab). */
  inflight: number;
  /** Activation recomputation on every stage (StageOptions.recompute). */
  recompute?: boolean;
  /** The frozen base's compute dtype and quantization on every stage. */
  base?: BaseFormat;
  faults?: FaultSpec[];
  heartbeatMs?: number;
  /** A stage silent for this long (and at least 3× its slowest observed message) is declared hung. */
  hangTimeoutMs?: number;
  /** Failures of one stage tolerated before the run stops. */
  maxStageFailures?: number;
  /** Called on every detected fault and recovery. */
  onFault?: (ev: FaultEvent) => void;
  /**
   * Starts a stage somewhere else than in a worker thread of this process (a stage host of the
   * cluster: actors/transport/remote.ts); `restart` is true after the first start.
   */
  stageEndpoint?: (init: InitMsg, restart: boolean) => StageWorker;
}

/** What the runtime needs of a stage's endpoint: a Worker has it, and so has a remote stage. */
export type StageWorker = Pick<Worker, 'postMessage' | 'on' | 'once' | 'terminate' | 'threadId'>;

/** The run cannot go on: one stage failed more often than allowed. */
export class StageFailure extends Error {
  override name = 'StageFailure';
  constructor(
    readonly stage: number,
    message: string,
  ) {
    super(message);
  }
}

export interface FaultEvent {
  stage: number;
  fault: 'crash' | 'hang' | 'error' | 'corrupt' | 'oom';
  detail: string;
  detectedMs: number;
  /** Time from the stage's last sign of life (message or heartbeat) to detection. */
  silentMs?: number;
  recoveredMs?: number;
  replayed?: number;
  /** The failure limit was passed: no recovery, the run stops. */
  fatal?: boolean;
  /** Out of memory: the supervisor's new limit of micro-batch messages in flight. */
  admission?: number;
}

interface InFlight {
  data: MicroBatchData;
  train: boolean;
  resolve: (losses: Float32Array) => void;
  reject: (e: Error) => void;
  meta: number;
  /** acts[s] = slot holding stage s's output (hidden states), S-1 of them; taken at launch, as the stages pass the micro-batch on by themselves */
  acts: number[];
  grad: number;
  /** The final hidden states the last stage hands its head share (-1: no share) */
  head: number;
}

interface RecoveryFault {
  stage: number;
  fault: FaultEvent['fault'];
  detail: string;
  detected: number;
  silentMs: number;
  /** Raised while a recovery was replaying. */
  duringRecovery?: boolean;
  admission?: number;
}

interface Pending {
  resolve: (v: unknown) => void;
  reject: (e: Error) => void;
  timer: NodeJS.Timeout;
  stage: number;
  what: string;
}

class StageHandle {
  worker!: StageWorker;
  started = false;
  lastBeat = performance.now();
  slowestMs = 0;
  ready!: Promise<void>;
  alive = false;
  failures = 0;
  /** The injected faults this stage's actor runs with, and which of them have fired (set by the stage). */
  faults: FaultSpec[] = [];
  faultFlags = new Int32Array(new SharedArrayBuffer(4));
  constructor(readonly index: number) {}
}

const STAGE_URL = new URL('./stage.js', import.meta.url);

/**
 * The first row of a micro-batch's head share: rows from there on hold about `share` of its
 * targeted rows (the head runs on targeted rows only, so that is the share of its cost).
 */
export function shareStart(targets: Int32Array, share: number): number {
  let T = 0;
  for (let i = 0; i < targets.length; i++) if (targets[i]! >= 0) T++;
  const want = Math.round(share * T);
  let r = targets.length;
  for (let k = 0; k < want;) if (targets[--r]! >= 0) k++;
  return r;
}

export class ActorPipeline implements Pipeline {
  readonly config: LlamaConfig;
  readonly plans: StagePlan[];
  readonly devices: string[];
  readonly maxTokens: number;
  private readonly stages: StageHandle[];
  private readonly slab: Slab;
  private readonly slots: SlotAllocator;
  private readonly flights = new Map<number, InFlight>();
  private readonly pending = new Map<number, Pending>();
  private nextReq = 1;
  private readonly records: ScheduleRecord[] = [];
  private readonly specs = new Map<number, LoraSpec>();
  /** Each adapter's state after its last step, as the stages sent their slices (joined when read: snapshot()). */
  private readonly snapshots = new Map<number, AdapterState | AdapterState[]>();
  /** Optimizer version of each adapter: stages defer a Forward until they reach it. */
  private readonly versions = new Map<number, number>();
  /** Per adapter: the micro-batches of its current, unfinished step, in issue order. */
  private readonly stepLog = new Map<number, MicroBatchData[]>();
  private readonly issueOrder: MicroBatchData[] = [];
  private recovering: Promise<void> | undefined;
  private epoch = 0;
  private closed = false;
  private fatal: Error | undefined;
  private watchdog: NodeJS.Timeout;
  private readonly faults: FaultSpec[];
  /** Time origin of the schedule records (clockMs()): shared by every stage, restarted ones too. */
  private readonly epochMs = clockMs();
  /** Each local CPU stage's cores (lib/schedule/cores.ts), or undefined: not pinned. */
  private readonly cores: number[][] | undefined;
  onOutOfMemory?: (stage: number) => number | undefined;

  private constructor(readonly opts: ActorPipelineOptions) {
    this.config = opts.config;
    this.plans = opts.plans;
    this.devices = opts.devices;
    this.maxTokens = opts.maxTokens;
    const S = opts.plans.length;
    const slotBytes = slotBytesFor(opts.maxTokens, opts.config.hiddenSize);
    // per message in flight: a meta slot, S-1 hidden slots, a gradient slot, the head share's slot
    const count = Math.max(4, opts.inflight * (S + 2) + 2);
    this.slab = Slab.create(count, slotBytes);
    this.slots = new SlotAllocator(this.slab);
    this.faults = opts.faults ?? [];
    this.stages = opts.plans.map((_, i) => new StageHandle(i));
    this.cores =
      opts.stageEndpoint || !pinningEnabled()
        ? undefined
        : assignCores(opts.devices, opts.threads, native().info().cpu.allowedCores);
    this.watchdog = setInterval(() => this.checkHeartbeats(), Math.max(50, (opts.heartbeatMs ?? 200) / 2));
    this.watchdog.unref();
  }

  static async start(opts: ActorPipelineOptions): Promise<ActorPipeline> {
    const p = new ActorPipeline(opts);
    try {
      await Promise.all(
        p.stages.map((s) =>
          p.spawn(
            s,
            p.faults.filter((f) => f.stage === undefined || f.stage === s.index),
          ),
        ),
      );
      await Promise.all(p.stages.slice(1).map((s) => p.link(s.index - 1)));
    } catch (e) {
      await p.close();
      throw e;
    }
    return p;
  }

  private spawn(h: StageHandle, faults: FaultSpec[]): Promise<void> {
    const o = this.opts;
    h.faults = faults;
    h.faultFlags = new Int32Array(new SharedArrayBuffer(4 * Math.max(1, faults.length)));
    const init: InitMsg = {
      type: 'init',
      id: 0,
      stage: h.index,
      plan: this.plans[h.index]!,
      modelDir: o.modelDir,
      device: o.devices[h.index]!,
      threads: o.threads[h.index]!,
      budget: o.budgets[h.index]!,
      slab: this.slab.sab,
      slotCount: this.slab.count,
      slotBytes: this.slab.slotBytes,
      faults,
      faultFlags: h.faultFlags.buffer as SharedArrayBuffer,
      heartbeatMs: o.heartbeatMs ?? 200,
      epochMs: this.epochMs,
      stages: this.plans.length,
      minEpoch: this.epoch,
      ...(o.recompute ? { recompute: true } : {}),
      ...(o.base ? { base: o.base } : {}),
      ...(this.cores?.[h.index]?.length ? { cores: this.cores[h.index] } : {}),
    };
    const w = o.stageEndpoint ? o.stageEndpoint(init, h.started) : new Worker(STAGE_URL, { workerData: init });
    h.started = true;
    h.worker = w;
    h.lastBeat = performance.now();
    h.ready = new Promise<void>((resolve, reject) => {
      const onMsg = (m: FromStage) => {
        if (m.type === 'ready') {
          h.alive = true;
          resolve();
        } else if (m.type === 'error' && !h.alive) {
          reject(fromWire(m.error));
        }
      };
      w.on('message', onMsg);
      w.once('exit', (code) => {
        if (!h.alive)
          reject(new Error(`stage ${h.index} (${o.devices[h.index]}) exited with code ${code} while starting`));
      });
    });
    w.on('message', (m: FromStage) => this.onMessage(h, m));
    w.on('error', (e) => this.onStageDeath(h, 'crash', `uncaught error: ${e.message}`));
    w.on('exit', (code) => {
      if (h.worker === w && h.alive && !this.closed) this.onStageDeath(h, 'crash', `worker exited with code ${code}`);
    });
    return h.ready;
  }

  /**
   * A fresh channel between stages i and i+1 (at start, and after either was restarted):
   * Forward and Backward then go from worker to worker without waking this thread.
   */
  private async link(i: number): Promise<void> {
    const { port1, port2 } = new MessageChannel();
    await Promise.all([
      this.request(i, { type: 'link', side: 'next', port: port1 }, 10_000, [port1]),
      this.request(i + 1, { type: 'link', side: 'prev', port: port2 }, 10_000, [port2]),
    ]);
  }

  // ---- messages from stages

  private onMessage(h: StageHandle, m: FromStage): void {
    h.lastBeat = performance.now();
    switch (m.type) {
      case 'heartbeat':
        return;
      case 'record':
        this.records.push(m.rec);
        h.slowestMs = Math.max(h.slowestMs, m.rec.end - m.rec.start);
        return;
      case 'reply': {
        const p = this.pending.get(m.id);
        if (!p) return;
        this.pending.delete(m.id);
        clearTimeout(p.timer);
        if (m.error) p.reject(fromWire(m.error, `stage ${p.stage}: ${p.what}: `));
        else p.resolve(m.value);
        return;
      }
      case 'done': {
        const f = m.epoch === this.epoch ? this.flights.get(m.mb) : undefined;
        if (f) this.complete(f);
        return;
      }
      case 'error': {
        if (m.epoch !== this.epoch) return;
        const code = m.error.code;
        const kind = code === ErrorCode.Corrupt ? 'corrupt' : code === ErrorCode.OutOfMemory ? 'oom' : 'error';
        // a replay that fails is answered at once: the recovery attempt waiting for it ends now
        const f = m.mb !== undefined ? this.flights.get(m.mb) : undefined;
        if (f && this.recovering) {
          this.release(f);
          f.reject(fromWire(m.error, `stage ${h.index}: `));
        }
        void this.recover(h.index, kind, m.error.message, false);
        return;
      }
    }
  }

  private post(stage: number, m: ToStage, transfer?: MessagePort[]): void {
    this.stages[stage]!.worker.postMessage(m, transfer);
  }

  private request<T>(
    stage: number,
    m: Omit<ControlMsg, 'id'> | Omit<import('./protocol.js').StepMsg, 'id'> | Omit<LinkMsg, 'id'>,
    timeoutMs = 120_000,
    transfer?: MessagePort[],
  ): Promise<T> {
    const id = this.nextReq++;
    return new Promise<T>((resolve, reject) => {
      const timer = setTimeout(() => {
        this.pending.delete(id);
        reject(new Error(`stage ${stage}: '${m.type}' got no reply within ${timeoutMs} ms`));
      }, timeoutMs);
      this.pending.set(id, { resolve: resolve as (v: unknown) => void, reject, timer, stage, what: m.type });
      this.post(stage, { ...m, id } as ToStage, transfer);
    });
  }

  private all<T>(m: Omit<ControlMsg, 'id'> | Omit<import('./protocol.js').StepMsg, 'id'>): Promise<T[]> {
    return Promise.all(this.stages.map((s) => this.request<T>(s.index, m)));
  }

  // ---- the micro-batch route

  /** Stage 0's Forward; every slot the micro-batch will use is taken now (the stages pass it on themselves). */
  private forwardMsg(f: InFlight): ForwardMsg {
    const S = this.stages.length;
    const d = f.data;
    const versions: Record<number, number> = {};
    for (const seg of d.segments) versions[seg.adapter] = this.versions.get(seg.adapter) ?? 0;
    for (let s = 0; s < S - 1; s++) f.acts[s] = this.slots.take(d.id);
    if (S > 1 && f.train) f.grad = this.slots.take(d.id);
    const share = f.train && S > 1 ? (this.plans[S - 2]!.headShare ?? 0) : 0;
    if (share > 0) f.head = this.slots.take(d.id);
    const N = d.tokens.length;
    return {
      type: 'forward',
      epoch: this.epoch,
      mb: d.id,
      numTokens: N,
      nseq: d.cuSeqlens.length - 1,
      segments: d.segments,
      versions,
      metaSlot: f.meta,
      inSlot: -1,
      outSlot: S > 1 ? f.acts[0]! : f.grad,
      hidden: f.acts.slice(0, S - 1),
      gradSlot: f.grad,
      train: f.train,
      headRow: share > 0 ? shareStart(d.targets, share) : N,
      headSlot: f.head,
    };
  }

  private launch(
    data: MicroBatchData,
    train: boolean,
    resolve: (l: Float32Array) => void,
    reject: (e: Error) => void,
  ): void {
    const N = data.tokens.length;
    const L = metaLayout(N, data.cuSeqlens.length - 1);
    if (L.bytes > this.slab.dataBytes || N * this.config.hiddenSize * 4 > this.slab.dataBytes) {
      reject(
        new Error(
          `micro-batch ${data.id} has ${N} tokens, more than the ${this.opts.maxTokens} the shared slots were sized for`,
        ),
      );
      return;
    }
    const meta = this.slots.take(data.id);
    this.slab.i32(meta, L.tokens, N).set(data.tokens);
    this.slab.i32(meta, L.positions, N).set(data.positions);
    this.slab.i32(meta, L.targets, N).set(data.targets);
    this.slab.f32(meta, L.weights, N).set(data.weights);
    this.slab.i32(meta, L.cuSeqlens, data.cuSeqlens.length).set(data.cuSeqlens);
    this.slab.seal(meta, data.id, SlotKind.META, L.bytes, 0);
    const f: InFlight = { data, train, resolve, reject, meta, acts: this.stages.map(() => -1), grad: -1, head: -1 };
    this.flights.set(data.id, f);
    this.post(0, this.forwardMsg(f));
  }

  private freeSlot(acts: number[], i: number): void {
    if (acts[i]! >= 0) {
      this.slots.release(acts[i]!);
      acts[i] = -1;
    }
  }

  private complete(f: InFlight): void {
    const N = f.data.tokens.length;
    const L = metaLayout(N, f.data.cuSeqlens.length - 1);
    const losses = this.slab.f32(f.meta, L.losses, N).slice();
    this.release(f);
    f.resolve(losses);
  }

  private release(f: InFlight): void {
    this.flights.delete(f.data.id);
    for (let i = 0; i < f.acts.length; i++) this.freeSlot(f.acts, i);
    if (f.grad >= 0) this.slots.release(f.grad);
    f.grad = -1;
    if (f.head >= 0) this.slots.release(f.head);
    f.head = -1;
    this.slots.release(f.meta);
  }

  // ---- Pipeline interface

  async train(mb: MicroBatchData): Promise<Float32Array> {
    if (this.fatal) throw this.fatal;
    if (this.recovering) await this.recovering;
    this.issueOrder.push(mb);
    for (const seg of mb.segments) {
      if (!this.stepLog.has(seg.adapter)) this.stepLog.set(seg.adapter, []);
      this.stepLog.get(seg.adapter)!.push(mb);
    }
    return new Promise((resolve, reject) => this.launch(mb, true, resolve, reject));
  }

  async evaluate(mb: MicroBatchData): Promise<Float32Array> {
    if (this.fatal) throw this.fatal;
    if (this.recovering) await this.recovering;
    return new Promise((resolve, reject) => this.launch(mb, false, resolve, reject));
  }

  async addAdapter(id: number, spec: LoraSpec, state: AdapterState): Promise<void> {
    if (this.fatal) throw this.fatal;
    if (this.recovering) await this.recovering.catch(() => {});
    // known before the stages have it: a recovery during the call puts it on every stage
    this.specs.set(id, spec);
    this.versions.set(id, state.version);
    this.snapshots.set(id, {
      params: state.params.slice(),
      m: state.m.slice(),
      v: state.v.slice(),
      version: state.version,
    });
    this.stepLog.set(id, []);
    const epoch = this.epoch;
    try {
      await this.all({ type: 'addAdapter', adapter: id, spec, state });
    } catch (e) {
      if (this.epoch !== epoch && !this.fatal) return void (await this.recovering); // the recovery added it
      this.forget(id);
      await this.all({ type: 'removeAdapter', adapter: id }).catch(() => {});
      throw e;
    }
  }

  async removeAdapter(id: number): Promise<void> {
    this.forget(id);
    await this.retrying(() => this.all({ type: 'removeAdapter', adapter: id }));
  }

  private forget(id: number): void {
    this.specs.delete(id);
    this.snapshots.delete(id);
    this.stepLog.delete(id);
    this.versions.delete(id);
  }

  async exportAdapter(id: number): Promise<AdapterState> {
    // after a fatal stage failure, the adapter's last consistent state is its snapshot (the last optimizer step)
    const snap = this.snapshot(id);
    if (this.fatal && snap) return snap;
    return this.retrying(() => this.exportParts(id));
  }

  /**
   * The snapshot of an adapter as one full state. A step stores the stages' slices as they came
   * (joining them on every step cost the supervisor's thread a copy and its garbage of the
   * whole state, per adapter and step); recovery and exports are rare, they join.
   */
  private snapshot(id: number): AdapterState | undefined {
    const s = this.snapshots.get(id);
    if (!Array.isArray(s)) return s;
    const joined = joinSlices(s);
    this.snapshots.set(id, joined);
    return joined;
  }

  private async exportParts(id: number): Promise<AdapterState> {
    return joinSlices(await this.all<AdapterState>({ type: 'exportAdapter', adapter: id }));
  }

  async gradSumsq(id: number): Promise<number> {
    return this.retrying(async () =>
      (await this.all<number>({ type: 'gradSumsq', adapter: id })).reduce((a, b) => a + b, 0),
    );
  }

  /** Runs a control call again after a recovery that interrupted it (the calls are idempotent). */
  private async retrying<T>(fn: () => Promise<T>): Promise<T> {
    for (;;) {
      if (this.fatal) throw this.fatal;
      if (this.recovering) await this.recovering.catch(() => {});
      if (this.fatal) throw this.fatal;
      const epoch = this.epoch;
      try {
        return await fn();
      } catch (e) {
        if (!this.recovering && this.epoch === epoch) throw e;
      }
    }
  }

  async step(id: number, p: StepParams, measure = false): Promise<{ sumsq?: number }> {
    // Each stage replies with its new slice: that is the snapshot recovery restores. A stage that
    // dies during the step: recovery restores the last snapshot and replays the step's
    // micro-batches, and the step runs again.
    type Part = { sumsq?: number; state: { params: Float32Array; m: Float32Array; v: Float32Array; version: number } };
    const parts = await this.retrying(async () => {
      const epoch = this.epoch;
      const r = await this.all<Part>({ type: 'step', adapter: id, params: p, measure } as never);
      // a recovery began while the stages stepped (a fault elsewhere): it restores the snapshot
      // from before this step and replays the step's micro-batches, so the step runs again after it
      if (this.epoch !== epoch || this.recovering) throw new Error(`step of adapter ${id} overtaken by a recovery`);
      return r;
    });
    this.versions.set(id, (this.versions.get(id) ?? 0) + 1);
    this.snapshots.set(
      id,
      parts.map((x) => x.state),
    );
    this.stepLog.set(id, []);
    this.trimIssueOrder();
    return measure ? { sumsq: parts.reduce((s, x) => s + (x.sumsq ?? 0), 0) } : {};
  }

  async poison(id: number): Promise<void> {
    await this.request(0, { type: 'poison', adapter: id });
  }

  async memory() {
    const r = await this.retrying(() =>
      this.all<{ device: string; budget: number; used: number; peak: number }>({ type: 'memory' }),
    );
    return r.map((m) => ({ device: m.device, budget: m.budget, used: m.used, peak: m.peak }));
  }

  activationBytes(numTokens: number, segments: Array<{ rows: number; spec: LoraSpec }>): number[] {
    // the saved block, the scratch while a call runs, and the last stage's losses; the tokens,
    // targets, weights and hidden states are views of shared slots (borrowed, not counted)
    const rc = !!this.opts.recompute;
    return this.plans.map(
      (plan) =>
        activationBytes(this.config, plan, numTokens, segments, rc) +
        scratchBytes(this.config, plan, numTokens) +
        workBytes(this.config, numTokens, segments, rc) +
        (holdsHead(plan) ? allocBytes(4 * numTokens) : 0),
    );
  }

  transientBytes(numTokens: number, segments: Array<{ rows: number; spec: LoraSpec }>): number[] {
    // a stage actor handles one message at a time and frees its scratch when the call ends; the
    // last stage's forward+backward is one call, so its saved block goes with it (unless it
    // shares the head: then it keeps the block until the share comes back)
    const all = this.activationBytes(numTokens, segments);
    const work = workBytes(this.config, numTokens, segments, !!this.opts.recompute);
    const shared = this.plans.some((p) => p.headShare);
    return this.plans.map((plan, s) =>
      plan.last && !shared
        ? all[s]!
        : scratchBytes(this.config, plan, numTokens) + work + (holdsHead(plan) ? allocBytes(4 * numTokens) : 0),
    );
  }

  adapterBytes(spec: LoraSpec): number[] {
    return this.plans.map((p) => StageAdapter.bytes(this.config, spec, p.lo, p.hi));
  }

  schedule(): ScheduleRecord[] {
    return this.records.slice();
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    clearInterval(this.watchdog);
    await Promise.all(
      this.stages.map(async (s) => {
        if (!s.worker) return;
        const w = s.worker;
        const exited = new Promise<boolean>((r) => (w.threadId < 0 ? r(true) : w.once('exit', () => r(true))));
        if (s.alive) {
          try {
            // the stage frees its device and closes its port: its thread then ends by itself (exit code 0)
            await this.request(s.index, { type: 'shutdown' }, 10_000);
            let timer: NodeJS.Timeout | undefined;
            const gone = await Promise.race([
              exited,
              new Promise<boolean>((r) => (timer = setTimeout(() => r(false), 2_000))),
            ]);
            clearTimeout(timer);
            if (gone) return;
          } catch {
            /* terminate below */
          }
        }
        await w.terminate();
      }),
    );
    for (const p of this.pending.values()) clearTimeout(p.timer);
    this.pending.clear();
    for (const f of this.flights.values()) f.reject(new Error('the pipeline was closed'));
    this.flights.clear();
  }

  /** Slots in use right now (a clean shutdown leaves none). */
  slotsInUse(): number {
    return this.slots.inUse();
  }

  // ---- faults

  private lastCheck = performance.now();

  private checkHeartbeats(): void {
    if (this.closed || this.fatal) return;
    const now = performance.now();
    // This thread itself was held up (synchronous work such as a checkpoint's fsync, a long GC,
    // a loaded machine): the stages' heartbeats of that time may be waiting unread behind this
    // timer, so a stage is judged at the next check, after they are read, never now.
    const stalled = now - this.lastCheck > 2 * Math.max(50, (this.opts.heartbeatMs ?? 200) / 2) + 100;
    this.lastCheck = now;
    if (stalled) return;
    const base = this.opts.hangTimeoutMs ?? 10_000;
    for (const s of this.stages) {
      if (!s.alive) continue;
      // deadlines scale with the measured step time, so a slow but healthy stage is never killed
      const deadline = Math.max(base, 3 * s.slowestMs);
      if (now - s.lastBeat > deadline) {
        this.onStageDeath(
          s,
          'hang',
          `no heartbeat for ${Math.round(now - s.lastBeat)} ms (deadline ${Math.round(deadline)} ms)`,
        );
      }
    }
  }

  private onStageDeath(h: StageHandle, kind: 'crash' | 'hang', detail: string): void {
    if (this.closed || !h.alive || this.fatal) return;
    void this.recover(h.index, kind, detail, true);
  }

  private trimIssueOrder(): void {
    const live = new Set<MicroBatchData>();
    for (const l of this.stepLog.values()) for (const m of l) live.add(m);
    for (const f of this.flights.values()) live.add(f.data);
    for (let i = this.issueOrder.length - 1; i >= 0; i--)
      if (!live.has(this.issueOrder[i]!)) this.issueOrder.splice(i, 1);
  }

  /** Faults that arrived during a recovery: the attempt is dropped and recovery starts over with them. */
  private again: RecoveryFault[] = [];
  private attempt = 0;
  private abortAttempt: ((e: Error) => void) | undefined;

  private recover(stage: number, fault: FaultEvent['fault'], detail: string, restart: boolean): Promise<void> {
    const detected = performance.now();
    const silentMs = detected - this.stages[stage]!.lastBeat;
    if (restart) this.stages[stage]!.alive = false;
    // the memory accounting was wrong: fewer micro-batches in flight from now on (the failed one is replayed)
    const admission = fault === 'oom' ? this.onOutOfMemory?.(stage) : undefined;
    const q: RecoveryFault = {
      stage,
      fault,
      detail,
      detected,
      silentMs,
      ...(admission !== undefined ? { admission } : {}),
    };
    if (this.recovering) {
      this.again.push({ ...q, duringRecovery: true });
      this.abortAttempt?.(new Error(`stage ${stage}: ${fault} during recovery`));
      return this.recovering;
    }
    this.recovering = this.recoverLoop(q).finally(() => {
      this.recovering = undefined;
      this.abortAttempt = undefined;
    });
    this.recovering.catch(() => {});
    return this.recovering;
  }

  private async recoverLoop(first: RecoveryFault): Promise<void> {
    // micro-batches whose callers wait: resolved by their replay
    const waiting = [...this.flights.values()];
    for (const f of waiting) this.release(f);
    const waiters = new Map(waiting.map((f) => [f.data, f]));
    const handled: RecoveryFault[] = [];
    let queue = [first];
    let replayed = 0;
    for (;;) {
      for (const q of queue) {
        const h = this.stages[q.stage]!;
        h.failures++;
        handled.push(q);
        const limit = this.opts.maxStageFailures ?? 3;
        // a fault that keeps coming back (an out-of-memory while replaying included) ends the run
        // cleanly once the stage has failed more often than the limit allows
        const why = h.failures > limit ? `failed ${h.failures} times (limit ${limit})` : undefined;
        if (why && !this.fatal) {
          this.fatal = new StageFailure(
            q.stage,
            `stage ${q.stage} (${this.devices[q.stage]}) ${why}; last: ${q.fault}: ${q.detail}`,
          );
          this.opts.onFault?.({
            stage: q.stage,
            fault: q.fault,
            detail: q.detail,
            detectedMs: q.detected,
            silentMs: q.silentMs,
            fatal: true,
          });
        }
      }
      // pending control requests fail (their callers retry after the recovery); replays of a dropped attempt end
      const restart = this.stages.some((s) => !s.alive);
      for (const [id, p] of this.pending) {
        if (restart || this.fatal || queue.some((q) => q.stage === p.stage)) {
          clearTimeout(p.timer);
          this.pending.delete(id);
          p.reject(this.fatal ?? new Error(`stage ${p.stage} failed during '${p.what}'`));
        }
      }
      for (const f of [...this.flights.values()]) this.release(f);
      if (this.fatal) {
        for (const w of waiters.values()) w.reject(this.fatal);
        throw this.fatal;
      }
      this.epoch++;
      const gen = ++this.attempt;
      const aborted = new Promise<never>((_, reject) => (this.abortAttempt = reject));
      aborted.catch(() => {});
      try {
        replayed += await Promise.race([this.recoveryAttempt(gen, waiters), aborted]);
        if (!this.again.length) break;
      } catch (e) {
        if (!this.again.length) {
          // the recovery itself failed without a new fault (a stage that cannot start): count it against that stage
          const s = this.stages.find((x) => !x.alive)?.index ?? first.stage;
          this.stages[s]!.alive = false;
          this.again.push({
            stage: s,
            fault: 'error',
            detail: `recovery failed: ${(e as Error).message}`,
            detected: performance.now(),
            silentMs: 0,
          });
        }
      }
      ++this.attempt; // a dropped attempt stops at its next step
      queue = this.again.splice(0);
    }
    const now = performance.now();
    for (const q of handled) {
      this.opts.onFault?.({
        stage: q.stage,
        fault: q.fault,
        detail: q.detail,
        detectedMs: q.detected,
        silentMs: q.silentMs,
        recoveredMs: now - q.detected,
        replayed,
        ...(q.admission !== undefined ? { admission: q.admission } : {}),
      });
    }
  }

  /** One try at restoring every stage and replaying; returns the micro-batches replayed. */
  private async recoveryAttempt(gen: number, waiters: Map<MicroBatchData, InFlight>): Promise<number> {
    const live = () => {
      if (gen !== this.attempt) throw new Error('recovery attempt superseded');
    };
    const dead = new Set(this.stages.filter((s) => !s.alive).map((s) => s.index));
    for (const i of dead) {
      const h = this.stages[i]!;
      await h.worker.terminate().catch(() => {});
      live();
      // the injected faults that fired (the one that killed it among them) are gone; the new actor runs with the rest
      await this.spawn(
        h,
        h.faults.filter((_, k) => Atomics.load(h.faultFlags, k) === 0),
      );
      live();
    }
    // the channels to a new actor are new (its neighbours close their old ends)
    const relink = new Set<number>();
    for (const i of dead) for (const b of [i - 1, i]) if (b >= 0 && b < this.stages.length - 1) relink.add(b);
    await Promise.all([...relink].map((b) => this.link(b)));
    live();
    // every other stage forgets the dropped attempt (and finishes what it is running first)
    await Promise.all(
      this.stages
        .filter((s) => !dead.has(s.index))
        .map((s) => this.request(s.index, { type: 'drop', epoch: this.epoch })),
    );
    live();
    for (const [id, spec] of this.specs) {
      const snap = this.snapshot(id)!;
      await Promise.all(
        this.stages.map(async (s) => {
          if (!dead.has(s.index)) await this.request(s.index, { type: 'removeAdapter', adapter: id });
          await this.request(s.index, { type: 'addAdapter', adapter: id, spec, state: snap });
        }),
      );
      live();
      this.versions.set(id, snap.version);
    }
    // replay, in the original order, every micro-batch of every adapter's unfinished step
    let replayed = 0;
    const results = new Map<MicroBatchData, Float32Array>();
    for (const data of this.issueOrder) {
      const segments = data.segments.filter((s) => this.stepLog.get(s.adapter)?.includes(data));
      const w = waiters.get(data);
      if (!segments.length && !w) continue;
      const replay: MicroBatchData = { ...data, segments: segments.length ? segments : data.segments };
      const losses = await new Promise<Float32Array>((resolve, reject) => this.launch(replay, true, resolve, reject));
      live();
      replayed++;
      if (w) results.set(data, losses);
    }
    // evaluations in flight run again (forward only; no state)
    for (const [data, w] of waiters) {
      if (w.train || results.has(data)) continue;
      results.set(
        data,
        await new Promise<Float32Array>((resolve, reject) => this.launch(data, false, resolve, reject)),
      );
      live();
    }
    for (const [data, losses] of results) {
      waiters.get(data)!.resolve(losses);
      waiters.delete(data);
    }
    return replayed;
  }
}
