// The actor pipeline: one stage actor per device, supervised by this thread. It is the
// Pipeline (actors/pipeline.ts) the scheduler drives when stages run in worker threads (or on
// other hosts). Its parts, one file each:
// - actors/stage-workers.ts: spawns and wires the stage workers, asks them things (ordered
//   requests and comlink calls: actors/rpc.ts says which is which), watches their heartbeats;
// - actors/router.ts: the micro-batch route (slots taken at launch, stage 0's Forward, 'done');
// - actors/recovery.ts: snapshots, the micro-batch log, and recovery by restart, restore, replay;
// - actors/stage.ts: the stage actor itself (its mailbox and the stage program).
// This file holds what joins them: the Pipeline calls, the messages the stages send this
// thread, and the per-stage byte estimates the scheduler admits work by.
import type { LoraSpec } from '../lib/lora/adapter.js';
import { allocBytes, StageAdapter } from '../lib/lora/adapter.js';
import { joinSlices } from '../lib/lora/state.js';
import type { LlamaConfig } from '../lib/model/config.js';
import type { StagePlan } from '../lib/model/stage.js';
import { activationBytes, scratchBytes, workBytes } from '../lib/model/stage.js';
import { ErrorCode, fromWire } from '../lib/errors.js';
import { holdsHead } from '../lib/model/batch.js';
import { Slab, slotBytesFor, snapshotViews } from './shm.js';
import { clockMs } from './clock.js';
import type { StageErrorMsg, StepReply } from './protocol.js';
import type { Pipeline } from './pipeline.js';
import type { AdapterState, StepParams } from '../lib/lora/state.js';
import type { FaultSpec } from '../lib/faults.js';
import type { MicroBatchData, SegmentSpec } from '../lib/model/batch.js';
import type { ScheduleRecord } from '../lib/schedule/record.js';
import { Router } from './router.js';
import type { StageStats } from './rpc.js';
import { Ledger, Recovery, type RecoveryOptions } from './recovery.js';
import { StageWorkers, type StageHandle, type StageWorker, type StageWorkerOptions } from './stage-workers.js';

export { StageFailure, type FaultEvent } from './recovery.js';
export type { StageWorker } from './stage-workers.js';
export { shareStart } from './router.js';

export interface ActorPipelineOptions extends StageWorkerOptions, RecoveryOptions {
  config: LlamaConfig;
  /** Largest micro-batch in tokens (sizes the shared slots). */
  maxTokens: number;
  /** Micro-batch messages in flight at most (sizes the slab). */
  inflight: number;
  faults?: FaultSpec[];
}

export class ActorPipeline implements Pipeline {
  readonly config: LlamaConfig;
  readonly plans: StagePlan[];
  readonly devices: string[];
  readonly maxTokens: number;
  private readonly workers: StageWorkers;
  private readonly router: Router;
  private readonly ledger = new Ledger();
  private readonly recovery: Recovery;
  private readonly records: ScheduleRecord[] = [];
  private closed = false;
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
    const slab = Slab.create(count, slotBytes);
    this.workers = new StageWorkers(opts, slab, clockMs(), {
      done: (_h, m) => {
        if (m.epoch === this.recovery.epoch) this.router.done(m.mb);
      },
      error: (h, m) => this.onStageError(h, m),
      record: (rec) => this.records.push(rec),
      death: (h, kind, detail) => {
        if (this.closed || !h.alive || this.recovery.fatal) return;
        void this.recovery.recover(h.index, kind, detail, true);
      },
      watching: () => !this.closed && !this.recovery.fatal,
    });
    this.router = new Router(slab, opts.plans, opts.config.hiddenSize, opts.maxTokens, (m) => this.workers.post(0, m));
    this.recovery = new Recovery(opts, this.workers, this.router, this.ledger, (s) => this.onOutOfMemory?.(s));
  }

  static async start(opts: ActorPipelineOptions): Promise<ActorPipeline> {
    const p = new ActorPipeline(opts);
    const faults = opts.faults ?? [];
    try {
      await Promise.all(
        p.workers.stages.map((s) =>
          p.workers.spawn(
            s,
            faults.filter((f) => f.stage === undefined || f.stage === s.index),
            0,
          ),
        ),
      );
      await Promise.all(p.workers.stages.slice(1).map((s) => p.workers.link(s.index - 1)));
    } catch (e) {
      await p.close();
      throw e;
    }
    return p;
  }

  /** A stage's micro-batch (or the stage itself) failed: a recovery replays what was lost. */
  private onStageError(h: StageHandle, m: StageErrorMsg): void {
    if (m.epoch !== this.recovery.epoch) return;
    const code = m.error.code;
    const kind = code === ErrorCode.Corrupt ? 'corrupt' : code === ErrorCode.OutOfMemory ? 'oom' : 'error';
    // a replay that fails is answered at once: the recovery attempt waiting for it ends now
    if (m.mb !== undefined && this.recovery.recovering) this.router.fail(m.mb, fromWire(m.error, `stage ${h.index}: `));
    void this.recovery.recover(h.index, kind, m.error.message, false);
  }

  private launch(mb: MicroBatchData, train: boolean, ahead = 0): Promise<Float32Array> {
    return this.router.launch(mb, train, this.recovery.epoch, (a) => this.ledger.version(a) + ahead);
  }

  // ---- Pipeline interface

  async train(mb: MicroBatchData): Promise<Float32Array> {
    if (this.recovery.fatal) throw this.recovery.fatal;
    if (this.recovery.recovering) await this.recovery.recovering;
    this.ledger.issued(mb);
    return this.launch(mb, true);
  }

  async trainAfterStep(mb: MicroBatchData): Promise<Float32Array> {
    if (mb.segments.length !== 1)
      throw new Error(`trainAfterStep: micro-batch ${mb.id} has ${mb.segments.length} adapters, one at most`);
    if (this.recovery.fatal) throw this.recovery.fatal;
    if (this.recovery.recovering) await this.recovery.recovering;
    this.ledger.issued(mb, true);
    // the step under way is not in the ledger's version yet (step() counts it when every stage answered)
    return this.launch(mb, true, 1);
  }

  async evaluate(mb: MicroBatchData): Promise<Float32Array> {
    if (this.recovery.fatal) throw this.recovery.fatal;
    if (this.recovery.recovering) await this.recovery.recovering;
    return this.launch(mb, false);
  }

  async addAdapter(id: number, spec: LoraSpec, state: AdapterState): Promise<void> {
    const r = this.recovery;
    if (r.fatal) throw r.fatal;
    if (r.recovering) await r.recovering.catch(() => {});
    this.ledger.added(id, spec, state);
    const epoch = r.epoch;
    try {
      await this.workers.callAll('addAdapter', [id, spec, state]);
    } catch (e) {
      if (r.epoch !== epoch && !r.fatal) return void (await r.recovering); // the recovery added it
      this.ledger.forget(id);
      await this.workers.callAll('removeAdapter', [id]).catch(() => {});
      throw e;
    }
  }

  async removeAdapter(id: number): Promise<void> {
    this.ledger.forget(id);
    await this.recovery.retrying(() => this.workers.callAll('removeAdapter', [id]));
  }

  async exportAdapter(id: number): Promise<AdapterState> {
    // after a fatal stage failure, the adapter's last consistent state is its snapshot (the last optimizer step)
    const snap = this.ledger.snapshot(id);
    if (this.recovery.fatal && snap) return snap;
    return this.recovery.retrying(async () => joinSlices(await this.workers.callAll('exportAdapter', [id])));
  }

  async gradSumsq(id: number): Promise<number> {
    return this.beforeStep(id, () =>
      this.recovery.retrying(async () => (await this.workers.callAll('gradSumsq', [id])).reduce((a, b) => a + b, 0)),
    );
  }

  /** Runs a part of an adapter's step; if it fails, what was sent ahead of the step (trainAfterStep) fails too: it would wait forever. */
  private async beforeStep<T>(id: number, fn: () => Promise<T>): Promise<T> {
    try {
      return await fn();
    } catch (e) {
      for (const mb of this.ledger.ahead(id)) this.router.fail(mb.id, e as Error);
      throw e;
    }
  }

  async step(id: number, p: StepParams, measure = false): Promise<{ sumsq?: number }> {
    // On the ordered path (actors/rpc.ts). Each stage replies with its new slice: that is the
    // snapshot recovery restores. A stage that dies during the step: recovery restores the last
    // snapshot and replays the step's micro-batches, and the step runs again.
    const r = this.recovery;
    const parts = await this.beforeStep(id, () =>
      r.retrying(async () => {
        const epoch = r.epoch;
        const x = await this.workers.all<StepReply>({ type: 'step', adapter: id, params: p, measure });
        // a recovery began while the stages stepped (a fault elsewhere): it restores the snapshot
        // from before this step and replays the step's micro-batches, so the step runs again after it
        if (r.epoch !== epoch || r.recovering) throw new Error(`step of adapter ${id} overtaken by a recovery`);
        return x;
      }),
    );
    this.ledger.stepped(
      id,
      parts.map((x) => snapshotViews(x.snapshot)),
      this.router.inFlight(),
    );
    return measure ? { sumsq: parts.reduce((s, x) => s + (x.sumsq ?? 0), 0) } : {};
  }

  async poison(id: number): Promise<void> {
    // ordered (actors/rpc.ts): it must reach stage 0 before the Forward the scheduler posts next
    await this.workers.request(0, { type: 'poison', adapter: id });
  }

  /** Where each stage's time went since the last call with reset (StageStats; benchmarks). */
  stats(reset = false): Promise<StageStats[]> {
    return this.workers.callAll('stats', [reset]);
  }

  async memory() {
    const r = await this.recovery.retrying(() => this.workers.callAll('memory', []));
    return r.map((m) => ({ device: m.device, budget: m.budget, used: m.used, peak: m.peak }));
  }

  activationBytes(numTokens: number, segments: SegmentSpec[]): number[] {
    // the saved block, and what a call holds while it runs; the tokens, targets, weights and
    // hidden states are views of shared slots (borrowed, not counted)
    const rc = !!this.opts.recompute;
    return this.plans.map(
      (plan) => activationBytes(this.config, plan, numTokens, segments, rc) + this.callBytes(plan, numTokens, segments),
    );
  }

  transientBytes(numTokens: number, segments: SegmentSpec[]): number[] {
    // a stage actor handles one message at a time and frees its scratch when the call ends; the
    // last stage's forward+backward is one call, so its saved block goes with it (unless it
    // shares the head: then it keeps the block until the share comes back)
    const shared = this.plans.some((p) => p.headShare);
    const all = this.activationBytes(numTokens, segments);
    return this.plans.map((plan, s) => (plan.last && !shared ? all[s]! : this.callBytes(plan, numTokens, segments)));
  }

  /** What one call of a stage holds only while it runs: scratch, recompute's work block, the head's losses. */
  private callBytes(plan: StagePlan, numTokens: number, segments: SegmentSpec[]): number {
    return (
      scratchBytes(this.config, plan, numTokens) +
      workBytes(this.config, numTokens, segments, !!this.opts.recompute) +
      (holdsHead(plan) ? allocBytes(4 * numTokens) : 0)
    );
  }

  adapterBytes(spec: LoraSpec): number[] {
    return this.plans.map((p) => StageAdapter.bytes(this.config, spec, p.lo, p.hi, p));
  }

  schedule(): ScheduleRecord[] {
    return this.records.slice();
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    await this.workers.close();
    this.router.rejectAll(new Error('the pipeline was closed'));
  }

  /** Slots in use right now (a clean shutdown leaves none). */
  slotsInUse(): number {
    return this.router.slots.inUse();
  }

  /** Questions to stages and micro-batches in flight right now (a clean shutdown leaves none). */
  inFlight(): { requests: number; microBatches: number } {
    return { requests: this.workers.pendingCount(), microBatches: this.router.inFlight().length };
  }

  /** The stages' endpoints (worker threads, or remote stages). */
  stageEndpoints(): StageWorker[] {
    return this.workers.stages.map((s) => s.worker);
  }
}
