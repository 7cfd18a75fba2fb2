// Recovery from a stage's failure: exact, nothing lost, nothing applied twice. After every
// optimizer step of an adapter the pipeline keeps a host snapshot of its state (params + AdamW
// moments), and it logs the micro-batches of each adapter's current, unfinished step (Ledger).
// When a stage dies, hangs, runs out of memory or receives corrupted data, recovery (1) replaces
// the stage actor when it is gone, (2) restores every adapter on every stage to its snapshot with
// zero gradients, and (3) replays the logged micro-batches in their original order, each reduced
// to the adapters whose step it belongs to. Rows of different adapters are independent in every
// kernel and accumulation happens in the same order, so the result is bitwise the same as a run
// without the fault. A fault during a recovery drops that attempt and starts over with it; a
// stage that fails more often than ActorPipelineOptions.maxStageFailures ends the run.
//
// "epoch" here is a recovery attempt: every micro-batch message carries the epoch it was sent in,
// and a stage discards messages of an older one.
import type { LoraSpec } from '../lib/lora/adapter.js';
import { joinSlices, type AdapterState } from '../lib/lora/state.js';
import type { MicroBatchData } from '../lib/model/batch.js';
import { ErrorCode, MloraError } from '../lib/errors.js';
import type { InFlight, Router } from './router.js';
import type { StageWorkers } from './stage-workers.js';

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
  /** Out of memory: the scheduler's new limit of micro-batch messages in flight. */
  admission?: number;
}

/** What recovery is started with (part of ActorPipelineOptions). */
export interface RecoveryOptions {
  devices: string[];
  /** Failures of one stage tolerated before the run stops. */
  maxStageFailures?: number;
  /** Called on every detected fault and recovery. */
  onFault?: (ev: FaultEvent) => void;
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

/** What a recovery restores and replays: each adapter's spec, snapshot and version, and the micro-batches of its unfinished step. */
export class Ledger {
  readonly specs = new Map<number, LoraSpec>();
  /** Each adapter's state after its last step, as the stages sent their slices (joined when read: snapshot()). */
  private readonly snapshots = new Map<number, AdapterState | AdapterState[]>();
  /** Optimizer version of each adapter: stages defer a Forward until they reach it. */
  readonly versions = new Map<number, number>();
  /** Per adapter: the micro-batches of its current, unfinished step, in issue order. */
  readonly stepLog = new Map<number, MicroBatchData[]>();
  /** Per adapter: micro-batches of its next step, sent before its step under way was applied (trainAfterStep). */
  private readonly nextLog = new Map<number, MicroBatchData[]>();
  readonly issueOrder: MicroBatchData[] = [];

  /**
   * An adapter's snapshot as one full state. A step stores the stages' slices as they came:
   * views of the side of each stage's snapshot buffer that the step wrote (actors/shm.ts,
   * StageSnapshot), which no stage writes again before the adapter's next step has replaced
   * them here (joining them on every step cost the supervisor's thread a copy and its garbage
   * of the whole state, per adapter and step); recovery and exports are rare, they join.
   */
  snapshot(id: number): AdapterState | undefined {
    const s = this.snapshots.get(id);
    if (!Array.isArray(s)) return s;
    const joined = joinSlices(s);
    this.snapshots.set(id, joined);
    return joined;
  }

  version(id: number): number {
    return this.versions.get(id) ?? 0;
  }

  /** A training micro-batch goes out: logged with the step of each of its adapters (`ahead`: with the step after the one under way). */
  issued(mb: MicroBatchData, ahead = false): void {
    this.issueOrder.push(mb);
    const log = ahead ? this.nextLog : this.stepLog;
    for (const seg of mb.segments) {
      if (!log.has(seg.adapter)) log.set(seg.adapter, []);
      log.get(seg.adapter)!.push(mb);
    }
  }

  /** The adapter's micro-batches sent ahead of its step under way. */
  ahead(id: number): MicroBatchData[] {
    return this.nextLog.get(id) ?? [];
  }

  /** True when `mb` was sent ahead of its adapter's step under way (it runs after that step, not in a replay of it). */
  isAhead(mb: MicroBatchData): boolean {
    return mb.segments.some((s) => this.nextLog.get(s.adapter)?.includes(mb));
  }

  /** An adapter joins (known before the stages have it: a recovery during the call puts it on every stage). */
  added(id: number, spec: LoraSpec, state: AdapterState): void {
    this.specs.set(id, spec);
    this.versions.set(id, state.version);
    this.snapshots.set(id, {
      params: state.params.slice(),
      m: state.m.slice(),
      v: state.v.slice(),
      version: state.version,
    });
    this.stepLog.set(id, []);
    this.nextLog.delete(id);
  }

  forget(id: number): void {
    this.specs.delete(id);
    this.snapshots.delete(id);
    this.stepLog.delete(id);
    this.nextLog.delete(id);
    this.versions.delete(id);
  }

  /** An adapter's step is applied on every stage: its new state (the stages' slices, in stage order) is the snapshot, its log starts over. */
  stepped(id: number, slices: AdapterState[], inFlight: MicroBatchData[]): void {
    this.versions.set(id, this.version(id) + 1);
    this.snapshots.set(id, slices);
    // what was sent ahead of this step is the new step's start
    this.stepLog.set(id, this.nextLog.get(id) ?? []);
    this.nextLog.delete(id);
    const live = new Set<MicroBatchData>(inFlight);
    for (const l of this.stepLog.values()) for (const m of l) live.add(m);
    for (let i = this.issueOrder.length - 1; i >= 0; i--)
      if (!live.has(this.issueOrder[i]!)) this.issueOrder.splice(i, 1);
  }
}

export class Recovery {
  /** The recovery attempt the stages are at (ForwardMsg.epoch). */
  epoch = 0;
  /** Set once the run cannot go on (a StageFailure): every later call fails with it. */
  fatal: Error | undefined;
  /** The recovery under way. */
  recovering: Promise<void> | undefined;
  /** Faults that arrived during a recovery: the attempt is dropped and recovery starts over with them. */
  private again: RecoveryFault[] = [];
  private attempt = 0;
  private abortAttempt: ((e: Error) => void) | undefined;

  constructor(
    private readonly opts: RecoveryOptions,
    private readonly workers: StageWorkers,
    private readonly router: Router,
    private readonly ledger: Ledger,
    /** The scheduler's answer to an out-of-memory: its new admission limit (Pipeline.onOutOfMemory). */
    private readonly onOutOfMemory: (stage: number) => number | undefined,
  ) {}

  private get stages() {
    return this.workers.stages;
  }

  /** Runs a control call again after a recovery that interrupted it (the calls are idempotent). */
  async retrying<T>(fn: () => Promise<T>): Promise<T> {
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

  recover(stage: number, fault: FaultEvent['fault'], detail: string, restart: boolean): Promise<void> {
    const detected = performance.now();
    const silentMs = detected - this.stages[stage]!.lastBeat;
    if (restart) this.stages[stage]!.alive = false;
    // the memory accounting was wrong: fewer micro-batches in flight from now on (the failed one is replayed)
    const admission = fault === 'oom' ? this.onOutOfMemory(stage) : undefined;
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

  /** The fault report's fields every event of fault `q` has. */
  private event(q: RecoveryFault): FaultEvent {
    return { stage: q.stage, fault: q.fault, detail: q.detail, detectedMs: q.detected, silentMs: q.silentMs };
  }

  private async recoverLoop(first: RecoveryFault): Promise<void> {
    // micro-batches whose callers wait: resolved by their replay
    const waiting = this.router.releaseAll();
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
            `stage ${q.stage} (${this.opts.devices[q.stage]}) ${why}; last: ${q.fault}: ${q.detail}`,
          );
          this.opts.onFault?.({ ...this.event(q), fatal: true });
        }
      }
      // questions in flight fail (their callers retry after the recovery); replays of a dropped attempt end
      const restart = this.stages.some((s) => !s.alive);
      this.workers.failPending(
        (stage) => restart || !!this.fatal || queue.some((q) => q.stage === stage),
        (stage, what) => this.fatal ?? new MloraError(ErrorCode.Unavailable, `stage ${stage} failed during '${what}'`),
      );
      this.router.releaseAll();
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
    // micro-batches sent ahead of a step that the recovery interrupted (or that had not been
    // answered): they go out again, waiting on every stage for that step, which runs again after
    // the recovery (ActorPipeline.step retries); a later recovery finds them in flight again
    for (const [data, w] of waiters) {
      if (!w.train || !this.ledger.isAhead(data)) continue;
      waiters.delete(data);
      this.router.launch(data, true, this.epoch, (a) => this.ledger.version(a) + 1).then(w.resolve, w.reject);
    }
    const now = performance.now();
    for (const q of handled) {
      this.opts.onFault?.({
        ...this.event(q),
        recoveredMs: now - q.detected,
        replayed,
        ...(q.admission !== undefined ? { admission: q.admission } : {}),
      });
    }
  }

  private launch(data: MicroBatchData, train: boolean): Promise<Float32Array> {
    return this.router.launch(data, train, this.epoch, (a) => this.ledger.version(a));
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
      // the injected faults that fired (the one that killed it among them) are gone; the new actor
      // runs with the rest, behind a new control port (StageWorkers.spawn wraps it afresh)
      await this.workers.spawn(
        h,
        h.faults.filter((_, k) => Atomics.load(h.faultFlags, k) === 0),
        this.epoch,
      );
      live();
    }
    // the channels to a new actor are new (its neighbours close their old ends)
    const relink = new Set<number>();
    for (const i of dead) for (const b of [i - 1, i]) if (b >= 0 && b < this.stages.length - 1) relink.add(b);
    await Promise.all([...relink].map((b) => this.workers.link(b)));
    live();
    // every other stage forgets the dropped attempt (and finishes what it is running first)
    await Promise.all(
      this.stages
        .filter((s) => !dead.has(s.index))
        .map((s) => this.workers.request(s.index, { type: 'drop', epoch: this.epoch })),
    );
    live();
    for (const [id, spec] of this.ledger.specs) {
      const snap = this.ledger.snapshot(id)!;
      await Promise.all(
        this.stages.map(async (s) => {
          if (!dead.has(s.index)) await this.workers.call(s.index, 'removeAdapter', [id]);
          await this.workers.call(s.index, 'addAdapter', [id, spec, snap]);
        }),
      );
      live();
      this.ledger.versions.set(id, snap.version);
    }
    // replay, in the original order, every micro-batch of every adapter's unfinished step
    let replayed = 0;
    const results = new Map<MicroBatchData, Float32Array>();
    for (const data of this.ledger.issueOrder) {
      if (this.ledger.isAhead(data)) continue; // after the recovery (recoverLoop), behind the step it waits for
      const segments = data.segments.filter((s) => this.ledger.stepLog.get(s.adapter)?.includes(data));
      const w = waiters.get(data);
      if (!segments.length && !w) continue;
      const replay: MicroBatchData = { ...data, segments: segments.length ? segments : data.segments };
      const losses = await this.launch(replay, true);
      live();
      replayed++;
      if (w) results.set(data, losses);
    }
    // evaluations in flight run again (forward only; no state)
    for (const [data, w] of waiters) {
      if (w.train || results.has(data)) continue;
      if (this.ledger.isAhead(data)) continue;
      results.set(data, await this.launch(data, false));
      live();
    }
    for (const [data, losses] of results) {
      waiters.get(data)!.resolve(losses);
      waiters.delete(data);
    }
    return replayed;
  }
}
