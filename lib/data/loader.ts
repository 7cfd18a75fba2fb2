// AdapterDataLoader: one adapter's stream of packed micro-batches, deterministic and
// resumable.
//
// Steps and batches
// - An epoch visits every example once, in file order (shuffle off) or in the order
//   Rng(seed, 'data', epoch).shuffle([0..n)) (shuffle on): a pure function of seed and epoch,
//   so a checkpoint needs no RNG stream state, only (epoch, cursor).
// - Optimizer step k of an epoch takes the next batchSize examples of that order: with
//   shuffle off, batch k is examples [k·B, (k+1)·B) in file order. Batches never straddle
//   epochs: the last batch of an epoch keeps the remaining n mod B examples (a smaller
//   step, not dropped, not topped up from the next epoch).
// - totalSteps = min(epochs · ceil(n / B), maxSteps).
// Micro-batches
// - A batch is split in order into micro-batches of microBatchSize examples; when
//   microBatchSize does not divide the batch, the last micro-batch is smaller.
// - Token-budget mode (maxTokensPerMicroBatch): examples are packed greedily, in order, while
//   the micro-batch stays within the budget (and within microBatchSize examples); an example
//   longer than the budget goes alone.
// - A micro-batch is packed: its sequences concatenated without padding; cuSeqlens holds row
//   offsets (nseq+1), positions restart at 0 for each sequence.
// Loss normalisation
// - targets[i] is the label predicted at row i (HF's shift: labels[i+1] within the same
//   sequence, -100 at a sequence's last row). numTargetTokens counts targets ≠ -100, i.e.
//   labels ≠ -100 at every position but the first of a sequence. A step's loss is the mean
//   over all target tokens of its micro-batches: weight each token by 1 / stepTargetTokens.
import { Rng, deriveSeed } from '../rng.js';
import { IGNORE_INDEX, type TokenizedExample } from './tokenize.js';

export interface LoaderOptions {
  batchSize: number;
  /** ≤ batchSize; default batchSize (no accumulation). */
  microBatchSize?: number;
  epochs?: number;
  maxSteps?: number;
  shuffle?: boolean;
  seed?: number;
  /** Pack micro-batches by token budget (see above). */
  maxTokensPerMicroBatch?: number;
}

export interface MicroBatch {
  /** Optimizer step this micro-batch belongs to (0-based, over the whole run). */
  step: number;
  epoch: number;
  /** Index of this micro-batch in its step, and the step's number of micro-batches. */
  microIndex: number;
  microCount: number;
  /** Dataset indices of the packed examples, in row order. */
  examples: number[];
  inputIds: Int32Array;
  labels: Int32Array;
  /** Label predicted at each row (shifted labels; -100 where nothing is predicted). */
  targets: Int32Array;
  /** Row offsets of the sequences: [0, len0, len0+len1, ..., numTokens]. */
  cuSeqlens: Int32Array;
  /** Position of each row within its own sequence. */
  positions: Int32Array;
  numTokens: number;
  numTargetTokens: number;
  /** Target tokens of the whole step (all its micro-batches). */
  stepTargetTokens: number;
  lastOfStep: boolean;
}

/** A loader position, small and JSON-able, for checkpoints. */
export interface LoaderState {
  /** Epoch of the next step, and the index in that epoch's order where that step starts. */
  epoch: number;
  cursor: number;
  /** Steps completed. */
  step: number;
  /** Micro-batches of the current step already handed out (0 at a step boundary). */
  microIndex: number;
  /** For checking that a state is restored into the same loader setup. */
  seed: number;
  numExamples: number;
  batchSize: number;
  microBatchSize: number;
  shuffle: boolean;
  /** The epoch's order is derived, not streamed: deriveSeed(seed, 'data', epoch). */
  orderSeed: number;
}

interface CurrentStep {
  micros: number[][];
  stepTargetTokens: number;
  size: number;
}

function posInt(v: number, name: string): number {
  if (!Number.isInteger(v) || v < 1) throw new Error(`${name} must be a positive integer, got ${v}`);
  return v;
}

export class AdapterDataLoader {
  readonly numExamples: number;
  readonly batchSize: number;
  readonly microBatchSize: number;
  readonly epochs: number;
  readonly shuffle: boolean;
  readonly seed: number;
  readonly maxTokensPerMicroBatch?: number;
  readonly totalSteps: number;
  readonly stepsPerEpoch: number;
  private readonly targetsPerExample: Int32Array;
  private epoch = 0;
  private cursor = 0;
  private step = 0;
  private microIndex = 0;
  private current: CurrentStep | null = null;
  private orderCache: { epoch: number; order: Int32Array } | null = null;

  constructor(private readonly data: readonly TokenizedExample[], opts: LoaderOptions) {
    this.numExamples = data.length;
    if (this.numExamples === 0) throw new Error('data loader: the dataset has no examples');
    this.batchSize = posInt(opts.batchSize, 'batch_size');
    this.microBatchSize = posInt(opts.microBatchSize ?? this.batchSize, 'micro_batch_size');
    if (this.microBatchSize > this.batchSize)
      throw new Error(`micro_batch_size (${this.microBatchSize}) must not exceed batch_size (${this.batchSize})`);
    this.epochs = posInt(opts.epochs ?? 1, 'epochs');
    this.shuffle = opts.shuffle ?? true;
    this.seed = opts.seed ?? 0;
    if (!Number.isInteger(this.seed)) throw new Error(`seed must be an integer, got ${this.seed}`);
    if (opts.maxTokensPerMicroBatch !== undefined) this.maxTokensPerMicroBatch = posInt(opts.maxTokensPerMicroBatch, 'max_tokens_per_micro_batch');
    this.stepsPerEpoch = Math.ceil(this.numExamples / this.batchSize);
    const all = this.epochs * this.stepsPerEpoch;
    this.totalSteps = opts.maxSteps !== undefined ? Math.min(all, posInt(opts.maxSteps, 'max_steps')) : all;
    this.targetsPerExample = new Int32Array(this.numExamples);
    data.forEach((e, i) => {
      if (e.inputIds.length !== e.labels.length || e.inputIds.length === 0)
        throw new Error(`data loader: example ${i} has ${e.inputIds.length} ids and ${e.labels.length} labels`);
      let n = 0;
      for (let j = 1; j < e.labels.length; j++) if (e.labels[j] !== IGNORE_INDEX) n++;
      this.targetsPerExample[i] = n;
    });
  }

  /** Steps completed so far. */
  get stepsDone(): number {
    return this.step;
  }

  get done(): boolean {
    return this.step >= this.totalSteps;
  }

  /** The visiting order of an epoch (dataset indices). */
  order(epoch: number): Int32Array {
    if (this.orderCache?.epoch === epoch) return this.orderCache.order;
    const idx = Array.from({ length: this.numExamples }, (_, i) => i);
    if (this.shuffle) new Rng(this.seed, 'data', epoch).shuffle(idx);
    const order = Int32Array.from(idx);
    this.orderCache = { epoch, order };
    return order;
  }

  private beginStep(): CurrentStep {
    if (this.cursor >= this.numExamples) {
      this.epoch++;
      this.cursor = 0;
    }
    const order = this.order(this.epoch);
    const batch = Array.from(order.subarray(this.cursor, Math.min(this.numExamples, this.cursor + this.batchSize)));
    const micros: number[][] = [];
    const budget = this.maxTokensPerMicroBatch;
    let cur: number[] = [];
    let tokens = 0;
    for (const i of batch) {
      const len = this.data[i]!.inputIds.length;
      const full = cur.length >= this.microBatchSize || (budget !== undefined && cur.length > 0 && tokens + len > budget);
      if (full) {
        micros.push(cur);
        cur = [];
        tokens = 0;
      }
      cur.push(i);
      tokens += len;
    }
    if (cur.length) micros.push(cur);
    let stepTargetTokens = 0;
    for (const i of batch) stepTargetTokens += this.targetsPerExample[i]!;
    return { micros, stepTargetTokens, size: batch.length };
  }

  /** The next micro-batch, or null when the run's steps are done. */
  next(): MicroBatch | null {
    if (this.done) return null;
    if (!this.current) this.current = this.beginStep();
    const cur = this.current;
    const examples = cur.micros[this.microIndex]!;
    const mb = this.pack(examples);
    const out: MicroBatch = {
      step: this.step,
      epoch: this.epoch,
      microIndex: this.microIndex,
      microCount: cur.micros.length,
      examples,
      ...mb,
      stepTargetTokens: cur.stepTargetTokens,
      lastOfStep: this.microIndex === cur.micros.length - 1,
    };
    this.microIndex++;
    if (out.lastOfStep) {
      this.step++;
      this.cursor += cur.size;
      this.microIndex = 0;
      this.current = null;
    }
    return out;
  }

  /** All micro-batches of the next step (convenience for tests and simple trainers). */
  nextStep(): MicroBatch[] | null {
    const out: MicroBatch[] = [];
    for (;;) {
      const mb = this.next();
      if (!mb) return out.length ? out : null;
      out.push(mb);
      if (mb.lastOfStep) return out;
    }
  }

  private pack(examples: number[]) {
    let numTokens = 0;
    for (const i of examples) numTokens += this.data[i]!.inputIds.length;
    const inputIds = new Int32Array(numTokens);
    const labels = new Int32Array(numTokens);
    const targets = new Int32Array(numTokens);
    const positions = new Int32Array(numTokens);
    const cuSeqlens = new Int32Array(examples.length + 1);
    let o = 0;
    let numTargetTokens = 0;
    examples.forEach((i, s) => {
      const e = this.data[i]!;
      const n = e.inputIds.length;
      inputIds.set(e.inputIds, o);
      labels.set(e.labels, o);
      for (let j = 0; j < n; j++) {
        positions[o + j] = j;
        const t = j + 1 < n ? e.labels[j + 1]! : IGNORE_INDEX;
        targets[o + j] = t;
        if (t !== IGNORE_INDEX) numTargetTokens++;
      }
      o += n;
      cuSeqlens[s + 1] = o;
    });
    return { inputIds, labels, targets, cuSeqlens, positions, numTokens, numTargetTokens };
  }

  state(): LoaderState {
    return {
      epoch: this.epoch,
      cursor: this.cursor,
      step: this.step,
      microIndex: this.microIndex,
      seed: this.seed,
      numExamples: this.numExamples,
      batchSize: this.batchSize,
      microBatchSize: this.microBatchSize,
      shuffle: this.shuffle,
      orderSeed: deriveSeed(this.seed, 'data', this.epoch),
    };
  }

  restore(s: LoaderState): void {
    const mismatch = (what: string, got: unknown, want: unknown) =>
      new Error(`data loader: cannot restore a state saved with ${what} ${String(got)} into a loader with ${what} ${String(want)}`);
    if (s.seed !== this.seed) throw mismatch('seed', s.seed, this.seed);
    if (s.numExamples !== this.numExamples) throw mismatch('numExamples', s.numExamples, this.numExamples);
    if (s.batchSize !== this.batchSize) throw mismatch('batchSize', s.batchSize, this.batchSize);
    if (s.shuffle !== undefined && s.shuffle !== this.shuffle) throw mismatch('shuffle', s.shuffle, this.shuffle);
    if (s.microIndex > 0 && s.microBatchSize !== undefined && s.microBatchSize !== this.microBatchSize)
      throw mismatch('microBatchSize (mid-step)', s.microBatchSize, this.microBatchSize);
    for (const k of ['epoch', 'cursor', 'step', 'microIndex'] as const)
      if (!Number.isInteger(s[k]) || s[k] < 0) throw new Error(`data loader: bad state field '${k}': ${String(s[k])}`);
    if (s.cursor > this.numExamples || s.epoch >= this.epochs + 1) throw new Error(`data loader: state out of range (epoch ${s.epoch}, cursor ${s.cursor})`);
    this.epoch = s.epoch;
    this.cursor = s.cursor;
    this.step = s.step;
    this.microIndex = 0;
    this.current = null;
    if (s.microIndex > 0) {
      this.current = this.beginStep();
      if (s.microIndex >= this.current.micros.length) throw new Error(`data loader: bad state: micro-batch ${s.microIndex} of ${this.current.micros.length}`);
      this.microIndex = s.microIndex;
    }
  }
}
