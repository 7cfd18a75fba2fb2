// An in-memory Pipeline (actors/pipeline.ts) for testing the job scheduler without a
// model: forward, backward and step finish at once (on the next turn of the event loop), every
// byte is an agreed number (base weights, bytes per adapter, bytes per token of a micro-batch),
// and everything the supervisor did is recorded. Its memory accounting is the real contract
// the supervisor relies on: used bytes are base + resident adapters + what the micro-batches in
// flight hold, and going over a stage's budget is recorded as an overrun (a real device would
// have run out of memory there).
import type { LoraSpec } from '../../lib/lora/adapter.js';
import { cloneState, type AdapterState, type StepParams } from '../../lib/lora/state.js';
import type { LlamaConfig } from '../../lib/model/config.js';
import type { MicroBatchData, SegmentSpec, StagePlan } from '../../lib/model/batch.js';
import type { ScheduleRecord } from '../../lib/schedule/record.js';
import type { Pipeline } from '../../actors/pipeline.js';
import { StageFailure } from '../../actors/recovery.js';
import { loraSpec } from '../../actors/scheduler/prepare.js';
import type {
  MicroBatchSource,
  PreparedJob,
  SourceMicroBatch,
  SchedulerHooks,
} from '../../actors/scheduler/job-types.js';

export interface FakePipelineOptions {
  /** Byte budget of each stage (its length is the number of stages). */
  budgets: number[];
  /** Bytes each stage holds at rest (the base model's weights); default 0. */
  base?: number[];
  /** Bytes one adapter takes on each stage; default r × 1000 on every stage. */
  adapterBytes?: (spec: LoraSpec) => number[];
  /** Bytes per token a micro-batch in flight holds on each stage between its calls; default 10. */
  heldPerToken?: number;
  /** Bytes per token a stage holds only while it runs the micro-batch (one call at a time); default 0. */
  transientPerToken?: number;
  maxTokens?: number;
  /**
   * Turns of the event loop addAdapter() takes to answer after the stages took the adapter's
   * bytes (a real one is a round trip to every stage, which allocate it ahead of the Forwards
   * queued there, while the scheduler goes on); default 0.
   */
  addTurns?: number;
  /** A micro-batch for which this is true fails the pipeline for good (a StageFailure of stage 0). */
  failsFor?: (mb: MicroBatchData) => boolean;
  /**
   * Offer trainAfterStep (as the worker-thread pipeline does): a micro-batch sent ahead of its
   * adapter's step waits until that step is applied, then trains.
   */
  afterStep?: boolean;
}

export type FakeEvent =
  | { op: 'add'; adapter: number; version: number }
  | { op: 'remove'; adapter: number }
  | { op: 'export'; adapter: number; version: number }
  | { op: 'train'; mb: number; adapters: number[]; tokens: number }
  /** trainAfterStep was called: the micro-batch waits for the adapter's step to `version`. */
  | { op: 'ahead'; mb: number; adapter: number; version: number }
  | { op: 'step'; adapter: number; version: number };

const CONFIG = { numLayers: 2, hiddenSize: 8, vocabSize: 16 } as unknown as LlamaConfig;

export class FakePipeline implements Pipeline {
  readonly config = CONFIG;
  readonly plans: StagePlan[];
  readonly devices: string[];
  readonly maxTokens: number;
  onOutOfMemory?: (stage: number) => number | undefined;
  /** Everything the supervisor asked, in order. */
  readonly events: FakeEvent[] = [];
  /** Adapters on the stages now, with their state. */
  readonly resident = new Map<number, { spec: LoraSpec; state: AdapterState }>();
  /** Micro-batches in flight now, and the most at once. */
  inflight = 0;
  peakInflight = 0;
  /** Bytes used per stage now, the most ever, and every time a stage went over its budget. */
  readonly used: number[];
  readonly peak: number[];
  readonly overruns: Array<{ stage: number; used: number; budget: number; what: string }> = [];
  private readonly base: number[];
  private readonly running: number[];
  private closed = false;
  trainAfterStep?: (mb: MicroBatchData) => Promise<Float32Array>;

  constructor(private readonly o: FakePipelineOptions) {
    if (o.afterStep) this.trainAfterStep = (mb) => this.ahead(mb);
    const S = o.budgets.length;
    this.plans = Array.from(
      { length: S },
      (_, s) => ({ lo: s, hi: s + 1, first: s === 0, last: s === S - 1 }) as StagePlan,
    );
    this.devices = Array.from({ length: S }, (_, s) => `cpu:${s}`);
    this.maxTokens = o.maxTokens ?? 4096;
    this.base = o.base ?? new Array<number>(S).fill(0);
    this.used = this.base.slice();
    this.peak = this.base.slice();
    this.running = new Array<number>(S).fill(0);
  }

  adapterBytes(spec: LoraSpec): number[] {
    return this.o.adapterBytes?.(spec) ?? this.o.budgets.map(() => spec.r * 1000);
  }
  activationBytes(numTokens: number, _segments: SegmentSpec[]): number[] {
    return this.o.budgets.map(() => numTokens * ((this.o.heldPerToken ?? 10) + (this.o.transientPerToken ?? 0)));
  }
  transientBytes(numTokens: number): number[] {
    return this.o.budgets.map(() => numTokens * (this.o.transientPerToken ?? 0));
  }

  async addAdapter(id: number, spec: LoraSpec, state: AdapterState): Promise<void> {
    if (this.resident.has(id)) throw new Error(`adapter ${id} is already on the stages`);
    this.resident.set(id, { spec, state: cloneState(state) });
    this.take(this.adapterBytes(spec), `adapter ${id}`);
    this.events.push({ op: 'add', adapter: id, version: state.version });
    for (let i = 0; i < (this.o.addTurns ?? 0); i++) await turn();
  }
  async removeAdapter(id: number): Promise<void> {
    const a = this.get(id);
    this.resident.delete(id);
    this.give(this.adapterBytes(a.spec));
    this.events.push({ op: 'remove', adapter: id });
  }
  async exportAdapter(id: number): Promise<AdapterState> {
    const a = this.get(id);
    this.events.push({ op: 'export', adapter: id, version: a.state.version });
    return cloneState(a.state);
  }

  /** Forward + backward at once: each row's loss is 1, each adapter's params[0] counts its rows. */
  async train(mb: MicroBatchData): Promise<Float32Array> {
    const N = mb.tokens.length;
    for (const seg of mb.segments) this.get(seg.adapter);
    if (this.o.failsFor?.(mb)) throw new StageFailure(0, 'stage 0 failed for good (fake)');
    this.events.push({ op: 'train', mb: mb.id, adapters: mb.segments.map((s) => s.adapter), tokens: N });
    const held = this.o.budgets.map(() => N * (this.o.heldPerToken ?? 10));
    const transient = this.transientBytes(N);
    this.inflight++;
    this.peakInflight = Math.max(this.peakInflight, this.inflight);
    this.take(held, `micro-batch ${mb.id}`);
    try {
      // each stage runs one call at a time: the transient bytes of a call, one after another
      for (let s = 0; s < this.plans.length; s++) {
        await turn();
        this.runCall(s, transient[s]!, mb.id);
      }
      for (const seg of mb.segments) this.get(seg.adapter).state.params[0]! += seg.rowEnd - seg.rowStart;
      return new Float32Array(N).fill(1);
    } finally {
      this.give(held);
      this.inflight--;
    }
  }
  /** trainAfterStep: the adapter's version is its steps answered; the micro-batch trains after the next one. */
  private async ahead(mb: MicroBatchData): Promise<Float32Array> {
    const adapter = mb.segments[0]!.adapter;
    const version = this.get(adapter).state.version + 1;
    this.events.push({ op: 'ahead', mb: mb.id, adapter, version });
    while (this.get(adapter).state.version < version) await turn();
    return this.train(mb);
  }
  async evaluate(mb: MicroBatchData): Promise<Float32Array> {
    await turn();
    return new Float32Array(mb.tokens.length).fill(1);
  }
  async gradSumsq(id: number): Promise<number> {
    this.get(id);
    return 1;
  }
  async step(id: number, _p: StepParams, measure?: boolean): Promise<{ sumsq?: number }> {
    await turn();
    const a = this.get(id);
    a.state.version++;
    this.events.push({ op: 'step', adapter: id, version: a.state.version });
    return measure ? { sumsq: 1 } : {};
  }
  async poison(): Promise<void> {}
  async memory(): Promise<Array<{ device: string; budget: number; used: number; peak: number }>> {
    return this.devices.map((device, s) => ({
      device,
      budget: this.o.budgets[s]!,
      used: this.used[s]!,
      peak: this.peak[s]!,
    }));
  }
  schedule(): ScheduleRecord[] {
    return [];
  }
  async close(): Promise<void> {
    this.closed = true;
  }

  /** The adapters of each micro-batch trained, in order. */
  trained(): number[][] {
    return this.events.flatMap((e) => (e.op === 'train' ? [e.adapters] : []));
  }

  private get(id: number) {
    if (this.closed) throw new Error('the pipeline is closed');
    const a = this.resident.get(id);
    if (!a) throw new Error(`adapter ${id} is not on the stages`);
    return a;
  }
  private runCall(s: number, bytes: number, mb: number) {
    if (this.running[s]!) throw new Error(`stage ${s} runs two calls at once`);
    this.running[s] = 1;
    this.used[s]! += bytes;
    this.check(s, `micro-batch ${mb}'s call`);
    this.used[s]! -= bytes;
    this.running[s] = 0;
  }
  private take(bytes: number[], what: string) {
    bytes.forEach((b, s) => {
      this.used[s]! += b;
      this.check(s, what);
    });
  }
  private give(bytes: number[]) {
    bytes.forEach((b, s) => (this.used[s]! -= b));
  }
  private check(s: number, what: string) {
    this.peak[s] = Math.max(this.peak[s]!, this.used[s]!);
    if (this.used[s]! > this.o.budgets[s]!)
      this.overruns.push({ stage: s, used: this.used[s]!, budget: this.o.budgets[s]!, what });
  }
}

/** The next turn of the event loop (not a timer: nothing here depends on time). */
const turn = () => new Promise<void>((r) => setImmediate(r));

/** Micro-batches of `tokens` tokens (one sequence each), `micro` per step, `steps` steps. */
export function fakeSource(steps: number, micro: number, tokens: number): MicroBatchSource {
  let i = 0;
  const mb = (k: number): SourceMicroBatch => ({
    step: Math.floor(k / micro),
    microIndex: k % micro,
    microCount: micro,
    inputIds: new Int32Array(tokens),
    labels: Int32Array.from({ length: tokens }, (_, j) => (j === 0 ? -100 : 1)),
    cuSeqlens: Int32Array.from([0, tokens]),
    positions: Int32Array.from({ length: tokens }, (_, j) => j),
    numTokens: tokens,
    numTargetTokens: tokens - 1,
    stepTargetTokens: micro * (tokens - 1),
    lastOfStep: k % micro === micro - 1,
  });
  return {
    totalSteps: steps,
    next: () => (i < steps * micro ? mb(i++) : null),
    state: () => i,
    restore: (s) => void (i = s as number),
  };
}

/**
 * Hooks whose prepare() makes a fake source from the adapter config (max_steps steps of
 * batch_size / micro_batch_size micro-batches of seq_len tokens) and a zero initial state;
 * finish() records the final state of each adapter by name.
 */
export function fakeHooks(finals = new Map<string, AdapterState>()): SchedulerHooks & {
  finals: Map<string, AdapterState>;
  checkpoints: Array<{ name: string; state: AdapterState; step: number; tokens: number; source: unknown }>;
} {
  const checkpoints: Array<{ name: string; state: AdapterState; step: number; tokens: number; source: unknown }> = [];
  return {
    finals,
    checkpoints,
    prepare: async (c): Promise<PreparedJob> => ({
      spec: loraSpec(c),
      source: fakeSource(c.max_steps ?? 1, Math.max(1, Math.floor(c.batch_size / c.micro_batch_size)), c.seq_len),
      initial: { params: new Float32Array(4), m: new Float32Array(4), v: new Float32Array(4), version: 0 },
    }),
    checkpoint: async (job, state) => {
      checkpoints.push({
        name: job.name,
        state: cloneState(state),
        step: job.step,
        tokens: job.tokens - job.tokensInStep,
        source: job.sourceState(),
      });
      return `fake:${job.name}:checkpoint`;
    },
    finish: async (job, state) => {
      finals.set(job.name, cloneState(state));
      return `fake:${job.name}`;
    },
  };
}
