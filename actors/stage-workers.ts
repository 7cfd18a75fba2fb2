// The pipeline's stage workers: one actor per stage (a worker thread running actors/stage.ts,
// or a stage on another host through ActorPipelineOptions.stageEndpoint), started, wired to its
// neighbours, asked things, watched. Two ways to ask a stage (actors/rpc.ts says which request
// takes which): request() posts an ordered request with an integer id into its mailbox and
// matches the ReplyMsg; call() is a comlink call on its control port. Both are tracked in one
// table, so a stage that dies or hangs fails every question put to it with a coded error
// (lib/errors.ts) and never leaves a caller waiting: recovery fails them (failPending), a
// timeout is the backstop, and a restarted stage gets a new control port and a new proxy.
import { MessageChannel, Worker, type MessagePort } from 'node:worker_threads';
import type { Remote } from 'comlink';
import type { FaultSpec } from '../lib/faults.js';
import { ErrorCode, fromWire, MloraError, toWire } from '../lib/errors.js';
import type { ScheduleRecord } from '../lib/schedule/record.js';
import type { DoneMsg, FromStage, InitMsg, StageErrorMsg, StageRequest, ToStage } from './protocol.js';
import { stageApi, type StageApi } from './rpc.js';
import type { Slab } from './shm.js';
import type { BaseFormat } from '../lib/model/weights.js';
import type { StagePlan } from '../lib/model/batch.js';
import { assignCores, pinningEnabled } from '../lib/schedule/cores.js';
import { native } from '../lib/native.js';

/** What the stage workers are started with (part of ActorPipelineOptions). */
export interface StageWorkerOptions {
  modelDir: string;
  plans: StagePlan[];
  devices: string[];
  threads: number[];
  budgets: number[];
  /** Activation recomputation on every stage (StageOptions.recompute). */
  recompute?: boolean;
  /** The frozen base's compute dtype and quantization on every stage. */
  base?: BaseFormat;
  heartbeatMs?: number;
  /** A stage silent for this long (and at least 3× its slowest observed message) is declared hung. */
  hangTimeoutMs?: number;
  /**
   * Starts a stage somewhere else than in a worker thread of this process (a stage host of the
   * cluster: actors/transport/remote.ts); `restart` is true after the first start.
   */
  stageEndpoint?: (init: InitMsg, restart: boolean) => StageWorker;
}

/** What the runtime needs of a stage's endpoint: a Worker has it, and so has a remote stage. */
export type StageWorker = Pick<Worker, 'postMessage' | 'on' | 'once' | 'terminate' | 'threadId'>;

export class StageHandle {
  worker!: StageWorker;
  /** The pipeline's end of the stage's control port, and comlink's proxy of the stage's API on it. */
  control: MessagePort | undefined;
  api!: Remote<StageApi>;
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

/** What the workers tell the pipeline. */
export interface StageEvents {
  done(h: StageHandle, m: DoneMsg): void;
  error(h: StageHandle, m: StageErrorMsg): void;
  record(rec: ScheduleRecord): void;
  /** The stage's thread ended, or it went silent past its deadline. */
  death(h: StageHandle, kind: 'crash' | 'hang', detail: string): void;
  /** False while nobody should judge heartbeats (closed, or the run has stopped). */
  watching(): boolean;
}

interface Pending {
  resolve: (v: unknown) => void;
  reject: (e: Error) => void;
  timer: NodeJS.Timeout;
  stage: number;
  what: string;
}

/** A request as the caller writes it: request() gives it its id. */
type Unsent<T> = T extends unknown ? Omit<T, 'id'> : never;

const STAGE_URL = new URL('./stage.js', import.meta.url);

export class StageWorkers {
  readonly stages: StageHandle[];
  private readonly pending = new Map<number, Pending>();
  private nextReq = 1;
  private readonly watchdog: NodeJS.Timeout;
  private lastCheck = performance.now();
  /** Each local CPU stage's cores (lib/schedule/cores.ts), or undefined: not pinned. */
  private readonly cores: number[][] | undefined;

  constructor(
    private readonly opts: StageWorkerOptions,
    private readonly slab: Slab,
    /** Time origin of the schedule records (clockMs()): shared by every stage, restarted ones too. */
    private readonly originMs: number,
    private readonly events: StageEvents,
  ) {
    this.stages = opts.plans.map((_, i) => new StageHandle(i));
    this.cores =
      opts.stageEndpoint || !pinningEnabled()
        ? undefined
        : assignCores(opts.devices, opts.threads, native().info().cpu.allowedCores);
    this.watchdog = setInterval(() => this.checkHeartbeats(), this.checkEveryMs());
    this.watchdog.unref();
  }

  private checkEveryMs(): number {
    return Math.max(50, (this.opts.heartbeatMs ?? 200) / 2);
  }

  /** Starts stage `h`'s actor (again, after a failure) with `faults`, at recovery epoch `minEpoch`. */
  spawn(h: StageHandle, faults: FaultSpec[], minEpoch: number): Promise<void> {
    const o = this.opts;
    h.faults = faults;
    h.faultFlags = new Int32Array(new SharedArrayBuffer(4 * Math.max(1, faults.length)));
    // a fresh control port: the old one's calls were failed by the recovery that replaces the stage
    h.control?.close();
    const { port1, port2 } = new MessageChannel();
    h.control = port1;
    h.api = stageApi(port1);
    port1.unref(); // the stage's thread (or remote link) keeps the process alive, not this port
    const init: InitMsg = {
      type: 'init',
      id: 0,
      stage: h.index,
      plan: o.plans[h.index]!,
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
      originMs: this.originMs,
      stages: o.plans.length,
      minEpoch,
      control: port2,
      ...(o.recompute ? { recompute: true } : {}),
      ...(o.base ? { base: o.base } : {}),
      ...(this.cores?.[h.index]?.length ? { cores: this.cores[h.index] } : {}),
    };
    const w = o.stageEndpoint
      ? o.stageEndpoint(init, h.started)
      : new Worker(STAGE_URL, { workerData: init, transferList: [port2] });
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
    w.on('error', (e) => this.events.death(h, 'crash', `uncaught error: ${e.message}`));
    w.on('exit', (code) => {
      if (h.worker === w && h.alive) this.events.death(h, 'crash', `worker exited with code ${code}`);
    });
    return h.ready;
  }

  /**
   * A fresh channel between stages i and i+1 (at start, and after either was restarted):
   * Forward and Backward then go from worker to worker without waking this thread.
   */
  async link(i: number): Promise<void> {
    const { port1, port2 } = new MessageChannel();
    await Promise.all([
      this.request(i, { type: 'link', side: 'next', port: port1 }, 10_000, [port1]),
      this.request(i + 1, { type: 'link', side: 'prev', port: port2 }, 10_000, [port2]),
    ]);
  }

  private onMessage(h: StageHandle, m: FromStage): void {
    h.lastBeat = performance.now();
    switch (m.type) {
      case 'heartbeat':
        return;
      case 'record':
        h.slowestMs = Math.max(h.slowestMs, m.rec.end - m.rec.start);
        return this.events.record(m.rec);
      case 'reply': {
        const p = this.pending.get(m.id);
        if (!p) return;
        this.settle(m.id, p);
        if (m.error) p.reject(fromWire(m.error, `stage ${p.stage}: ${p.what}: `));
        else p.resolve(m.value);
        return;
      }
      case 'done':
        return this.events.done(h, m);
      case 'error':
        return this.events.error(h, m);
    }
  }

  post(stage: number, m: ToStage, transfer?: MessagePort[]): void {
    this.stages[stage]!.worker.postMessage(m, transfer);
  }

  /** A question to a stage, failed with a coded error when no answer comes within `timeoutMs`. */
  private track<T>(stage: number, what: string, timeoutMs: number, ask: (key: number) => void): Promise<T> {
    const key = this.nextReq++;
    return new Promise<T>((resolve, reject) => {
      const timer = setTimeout(() => {
        this.pending.delete(key);
        reject(new MloraError(ErrorCode.Unavailable, `stage ${stage}: '${what}' got no reply within ${timeoutMs} ms`));
      }, timeoutMs);
      this.pending.set(key, { resolve: resolve as (v: unknown) => void, reject, timer, stage, what });
      ask(key);
    });
  }

  private settle(key: number, p: Pending): void {
    this.pending.delete(key);
    clearTimeout(p.timer);
  }

  /** An ordered request (Step, Poison, Drop, Link): into the stage's mailbox, answered by a ReplyMsg with its id. */
  request<T>(stage: number, m: Unsent<StageRequest>, timeoutMs = 120_000, transfer?: MessagePort[]): Promise<T> {
    return this.track<T>(stage, m.type, timeoutMs, (id) => this.post(stage, { ...m, id } as StageRequest, transfer));
  }

  /** The same request to every stage. */
  all<T>(m: Unsent<StageRequest>): Promise<T[]> {
    return Promise.all(this.stages.map((s) => this.request<T>(s.index, m)));
  }

  /** A comlink call of the stage's management API (actors/rpc.ts), tracked like a request. */
  call<K extends keyof StageApi>(
    stage: number,
    what: K,
    args: Parameters<StageApi[K]>,
    timeoutMs = 120_000,
  ): Promise<Awaited<ReturnType<StageApi[K]>>> {
    const api = this.stages[stage]!.api;
    return this.track(stage, what, timeoutMs, (key) => {
      const fn = api[what] as unknown as (...a: unknown[]) => Promise<unknown>;
      fn(...args).then(
        (v) => {
          const p = this.pending.get(key);
          if (!p) return; // failed already: a recovery or the timeout answered the caller
          this.settle(key, p);
          p.resolve(v);
        },
        (e: unknown) => {
          const p = this.pending.get(key);
          if (!p) return;
          this.settle(key, p);
          p.reject(fromWire(toWire(e), `stage ${stage}: ${what}: `));
        },
      );
    });
  }

  /** The same call to every stage. */
  callAll<K extends keyof StageApi>(
    what: K,
    args: Parameters<StageApi[K]>,
  ): Promise<Awaited<ReturnType<StageApi[K]>>[]> {
    return Promise.all(this.stages.map((s) => this.call(s.index, what, args)));
  }

  /** Requests and calls not answered yet. */
  pendingCount(): number {
    return this.pending.size;
  }

  /** Fails the questions in flight to the stages `which` picks (their callers retry after the recovery). */
  failPending(which: (stage: number) => boolean, why: (stage: number, what: string) => Error): void {
    for (const [key, p] of this.pending) {
      if (!which(p.stage)) continue;
      this.settle(key, p);
      p.reject(why(p.stage, p.what));
    }
  }

  private checkHeartbeats(): void {
    if (!this.events.watching()) return;
    const now = performance.now();
    // This thread itself was held up (synchronous work such as a checkpoint's fsync, a long GC,
    // a loaded machine): the stages' heartbeats of that time may be waiting unread behind this
    // timer, so a stage is judged at the next check, after they are read, never now.
    const stalled = now - this.lastCheck > 2 * this.checkEveryMs() + 100;
    this.lastCheck = now;
    if (stalled) return;
    const base = this.opts.hangTimeoutMs ?? 10_000;
    for (const s of this.stages) {
      if (!s.alive) continue;
      // deadlines scale with the measured step time, so a slow but healthy stage is never killed
      const deadline = Math.max(base, 3 * s.slowestMs);
      if (now - s.lastBeat > deadline) {
        this.events.death(
          s,
          'hang',
          `no heartbeat for ${Math.round(now - s.lastBeat)} ms (deadline ${Math.round(deadline)} ms)`,
        );
      }
    }
  }

  /** Shuts every stage down (terminates those that do not end by themselves). */
  async close(): Promise<void> {
    clearInterval(this.watchdog);
    await Promise.all(
      this.stages.map(async (s) => {
        if (!s.worker) return;
        const w = s.worker;
        const exited = new Promise<boolean>((r) => (w.threadId < 0 ? r(true) : w.once('exit', () => r(true))));
        if (s.alive) {
          try {
            // the stage frees its device and closes its ports: its thread then ends by itself (exit code 0)
            await this.call(s.index, 'shutdown', [], 10_000);
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
    for (const s of this.stages) s.control?.close();
    // what is still asked is forgotten, not failed: its callers went away with the run
    for (const p of this.pending.values()) clearTimeout(p.timer);
    this.pending.clear();
  }
}
