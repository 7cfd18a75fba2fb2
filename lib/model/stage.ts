// The stage program: one contiguous range of LLaMA layers (plus the embedding on the first
// stage and the final norm + LM head + loss on the last), run forward and backward over a
// BatchLoRA micro-batch on one device. The single-device trainer is one stage that is both
// first and last; the pipeline cuts the same model into several stages. No second
// implementation of the model exists anywhere.
//
// Data flow of a micro-batch through a stage:
//   forward(mb, input, output): input = token ids (first stage) or the previous stage's
//     hidden states [N, H]; output = hidden states [N, H] for the next stage. Everything the
//     backward needs is saved in one activation block per micro-batch; `input` is held too
//     (the caller keeps that memory alive until backward: zero copies between stages).
//   backward(mb, grad): grad [N, H] holds dL/d(output) and is turned, in place, into
//     dL/d(input), which the caller hands on to the previous stage.
//   trainLast(mb, input, gradIn): the last stage's forward, loss, and backward in one run.
// Every op of a call goes to the native core in ONE device.run(), off the JS thread.
import type { Device, Tensor } from '../tensor.js';
import type { LoraSegmentArg, Op } from '../native.js';
import { LORA_TARGETS, type LlamaConfig, type LoraTarget } from './config.js';
import { allocBytes, StageAdapter, type LoraSpec } from '../lora/adapter.js';
import { deriveSeed } from '../rng.js';
import { stageSlice } from '../lora/state.js';
import type { AdapterState } from '../../actors/protocol.js';
import { ropeTables } from './rope.js';

export interface StagePlan {
  /** Layers [lo, hi) of the model. */
  lo: number;
  hi: number;
  /** Holds the token embedding (input = token ids). */
  first: boolean;
  /** Holds the final norm, the LM head and the loss. */
  last: boolean;
  /**
   * The stage before the last only: it also runs the final norm, LM head and loss (forward and
   * backward) on this fraction of each training micro-batch's targeted rows, so the split can
   * balance below a whole layer (the head has no trainable weights and its rows are independent,
   * so who computes a row changes no bit). The last stage hands it those rows' final hidden
   * states and gets their gradients back (lib/schedule/split.ts decides the share).
   */
  headShare?: number;
}

/** Whether a stage holds the final norm and the LM head (the last stage, or one with a head share). */
export function holdsHead(plan: StagePlan): boolean {
  return plan.last || (plan.headShare ?? 0) > 0;
}

export interface LayerWeights {
  attnNorm: Tensor;
  q: Tensor;
  k: Tensor;
  v: Tensor;
  o: Tensor;
  mlpNorm: Tensor;
  gate: Tensor;
  up: Tensor;
  down: Tensor;
}

export interface StageWeights {
  embed?: Tensor;
  layers: LayerWeights[];
  norm?: Tensor;
  /** [vocab, hidden]; the embedding table itself when the model ties them. */
  head?: Tensor;
}

/** One adapter's rows in a micro-batch. */
export interface Segment {
  adapter: number;
  rowStart: number;
  rowEnd: number;
  /** The micro-batch's place in its adapter's data (supervisor microSerial): dropout masks are a function of (seed, serial, layer, module, row). */
  serial: number;
}

/** Per-micro-batch tensors on this stage's device (often views of shared-memory slots). */
export interface MicroBatchTensors {
  /** i32 [N]: position of each row within its own sequence. */
  positions: Tensor;
  /** i32 [nseq + 1]: row offsets of the packed sequences. */
  cuSeqlens: Tensor;
  /** i32 [N], last stage: the token each row must predict (labels shifted within each sequence; -100 = none). */
  targets?: Tensor;
  /** f32 [N], last stage: each row's weight in its adapter's loss (1/target tokens of the step). */
  weights?: Tensor;
}

export interface MicroBatch {
  id: number;
  numTokens: number;
  segments: Segment[];
  tensors: MicroBatchTensors;
}

interface LayerActs {
  x: Tensor;
  xn1: Tensor;
  rstd1: Tensor;
  q: Tensor;
  k: Tensor;
  v: Tensor;
  ao: Tensor;
  lse: Tensor;
  hmid: Tensor;
  xn2: Tensor;
  rstd2: Tensor;
  gate: Tensor;
  up: Tensor;
  act: Tensor;
  /** xa per target, per segment index (undefined where the adapter has no LoRA there). */
  xa: Map<LoraTarget, Array<Tensor | undefined>>;
}

/** One call's scratch by name (scratchShapes); each call has its own, so calls that overlap (in-process pipelines) never share it. */
type Scratch = Record<string, Tensor>;

/** Recompute: one call's work block and the views carved from it. */
interface Work {
  block: Tensor;
  views: Tensor[];
  /** The output of a recomputed layer (written by its LoRA down_proj, never read). */
  y: Tensor;
}

interface Saved {
  block: Tensor;
  layers: LayerActs[];
  input: Tensor;
  views: Tensor[];
}

/** Carves typed views out of one flat f32 block; the same code computes sizes for accounting. */
class Carver {
  offset = 0;
  readonly views: Tensor[] = [];
  constructor(private readonly block: Tensor | null) {}
  take(shape: number[]): Tensor {
    const n = shape.reduce((a, b) => a * b, 1);
    // 16-float (64-byte) alignment for vector loads
    const start = this.offset;
    this.offset += Math.ceil(n / 16) * 16;
    if (!this.block) return null as unknown as Tensor;
    const r = this.block.rows(start, start + n);
    const t = r.reshape(shape);
    r.free(); // the reshaped view holds the block; an unfreed intermediate would hold it until GC
    this.views.push(t);
    return t;
  }
}

export interface StageOptions {
  /** Rows of logits materialised at once on the last stage. */
  headBlockRows?: number;
  /** Logits only for rows that have a target (default); false: for every row (tests, benchmarks). */
  gatherTargets?: boolean;
  /**
   * Activation recomputation: a micro-batch keeps only each layer's input between forward and
   * backward; the backward recomputes one layer's activations at a time (bitwise the same) in a
   * work block that lives only during a call. Less memory per micro-batch in flight, about one
   * more forward of compute.
   */
  recompute?: boolean;
}

export class StageProgram {
  readonly adapters = new Map<number, StageAdapter>();
  private readonly saved = new Map<number, Saved>();
  readonly cos: Tensor;
  readonly sin: Tensor;
  private readonly headBlockRows: number;
  /** See StageOptions.gatherTargets; may be switched between calls (benchmarks compare both on one program). */
  gatherTargets: boolean;
  readonly recompute: boolean;
  readonly qDim: number;
  readonly kvDim: number;

  constructor(
    readonly device: Device,
    readonly config: LlamaConfig,
    readonly plan: StagePlan,
    readonly weights: StageWeights,
    options: StageOptions = {},
  ) {
    const c = config;
    if (weights.layers.length !== plan.hi - plan.lo) {
      throw new Error(`stage [${plan.lo}, ${plan.hi}) got weights for ${weights.layers.length} layers`);
    }
    if (plan.first && !weights.embed) throw new Error('the first stage needs the embedding table');
    if (holdsHead(plan) && (!weights.norm || !weights.head)) throw new Error(`${plan.last ? 'the last stage' : 'a stage with a head share'} needs the final norm and the LM head`);
    this.qDim = c.numHeads * c.headDim;
    this.kvDim = c.numKvHeads * c.headDim;
    const { cos, sin } = ropeTables(c.ropeTheta, c.headDim, c.maxPositionEmbeddings);
    this.cos = device.fromArray('f32', [c.maxPositionEmbeddings, c.headDim / 2], cos);
    this.sin = device.fromArray('f32', [c.maxPositionEmbeddings, c.headDim / 2], sin);
    this.headBlockRows = options.headBlockRows ?? defaultHeadBlockRows(c);
    this.gatherTargets = options.gatherTargets ?? true;
    this.recompute = options.recompute ?? false;
  }

  // ---- adapters

  addAdapter(id: number, spec: LoraSpec, init?: Float32Array): StageAdapter {
    if (this.adapters.has(id)) throw new Error(`adapter ${id} is already on this stage`);
    const a = new StageAdapter(this.device, this.config, spec, this.plan.lo, this.plan.hi, init);
    this.adapters.set(id, a);
    return a;
  }

  /** Adds an adapter from its full state (all layers): this stage takes its own slice. */
  addAdapterState(id: number, spec: LoraSpec, full: AdapterState): StageAdapter {
    const slice = stageSlice(this.config, spec, this.plan, full);
    const a = this.addAdapter(id, spec, slice.params);
    a.importState(slice);
    return a;
  }

  removeAdapter(id: number): void {
    this.adapters.get(id)?.free();
    this.adapters.delete(id);
  }

  adapter(id: number): StageAdapter {
    const a = this.adapters.get(id);
    if (!a) throw new Error(`adapter ${id} is not on this stage`);
    return a;
  }

  // ---- memory accounting (bytes, as the device allocator counts them)

  /** Bytes of the saved-activation block of one micro-batch. */
  activationBytes(numTokens: number, segments: Array<{ rows: number; spec: LoraSpec }>): number {
    return activationBytes(this.config, this.plan, numTokens, segments, this.recompute);
  }

  /** Bytes of the work block a call holds while it runs (recompute only; else 0). */
  workBytes(numTokens: number, segments: Array<{ rows: number; spec: LoraSpec }>): number {
    return workBytes(this.config, numTokens, segments, this.recompute);
  }

  /**
   * Bytes of the scratch a call over `rows` tokens allocates while it runs (backward,
   * trainLast, evaluate). Scratch does not outlive the call, so at rest a stage holds none
   * and the estimate is exact for every micro-batch, not only the first.
   */
  scratchBytes(rows: number): number {
    return scratchBytes(this.config, this.plan, rows, this.headBlockRows);
  }

  // ---- forward / backward

  /**
   * Forward of the stage's layers, saving what backward needs; `output` [N, H] receives the
   * hidden states. The last stage uses it only when it shares the head (then `output` is the
   * final hidden state before the norm, and head() + backward() follow); otherwise trainLast().
   */
  async forward(mb: MicroBatch, input: Tensor, output: Tensor): Promise<void> {
    const ops: Op[] = [];
    const saved = this.saveBlock(mb, input);
    let views: Tensor[] = [];
    let work: Work | undefined;
    try {
      work = this.bindWork(mb, saved.layers);
      this.forwardOps(ops, mb, saved, output);
      views = takeViews();
      await this.device.run(ops);
    } catch (e) {
      this.release(mb.id);
      throw e;
    } finally {
      this.endCall(views, {}, work);
    }
  }

  /** Backward of a non-last stage: `grad` holds dL/d(output) and becomes dL/d(input) in place. */
  async backward(mb: MicroBatch, grad: Tensor): Promise<void> {
    const saved = this.saved.get(mb.id);
    if (!saved) throw new Error(`backward: micro-batch ${mb.id} has no saved activations on this stage`);
    let views: Tensor[] = [];
    const s: Scratch = {};
    let work: Work | undefined;
    try {
      this.allocScratch(mb.numTokens, s);
      work = this.bindWork(mb, saved.layers);
      const ops: Op[] = [];
      for (let i = this.plan.hi - this.plan.lo - 1; i >= 0; i--) {
        if (work) this.layerForwardOps(ops, mb, i, saved.layers[i]!, work.y, true, true);
        this.layerBackwardOps(ops, mb, i, saved.layers[i]!, grad, s);
      }
      views = takeViews();
      await this.device.run(ops);
    } finally {
      this.release(mb.id);
      this.endCall(views, s, work);
    }
  }

  /**
   * The last stage: forward, loss, and backward in one run. Returns the per-row losses
   * (0 where the row predicts nothing). `gradIn` [N, H] receives dL/d(input) (omit on a
   * single-stage model: the first stage needs no input gradient).
   */
  async trainLast(mb: MicroBatch, input: Tensor, gradIn?: Tensor): Promise<Float32Array> {
    if (!this.plan.last) throw new Error('trainLast() is for the last stage');
    const { targets, weights } = mb.tensors;
    if (!targets || !weights) throw new Error('the last stage needs targets and weights');
    if (!this.plan.first && !gradIn) throw new Error('trainLast: gradIn is required on a stage that is not first');
    const N = mb.numTokens;
    const saved = this.saveBlock(mb, input);
    let losses: Tensor | undefined;
    let views: Tensor[] = [];
    const s: Scratch = {};
    let work: Work | undefined;
    // every exit (an allocation that fails included) gives back the block, the scratch and the views
    try {
      this.allocScratch(N, s);
      work = this.bindWork(mb, saved.layers);
      const ops: Op[] = [];
      const xFinal = view(s.xFinal!, [N, this.config.hiddenSize]);
      this.forwardOps(ops, mb, saved, xFinal);
      const dres = gradIn ?? view(s.dres!, [N, this.config.hiddenSize]);
      losses = this.device.alloc('f32', [N], { zero: false });
      this.headOps(ops, mb, xFinal, losses, dres, true, s);
      const n = this.plan.hi - this.plan.lo;
      for (let i = n - 1; i >= 0; i--) {
        // the work block still holds the last layer's activations from the forward above
        if (work && i < n - 1) this.layerForwardOps(ops, mb, i, saved.layers[i]!, work.y, true, true);
        this.layerBackwardOps(ops, mb, i, saved.layers[i]!, dres, s);
      }
      views = takeViews();
      await this.device.run(ops);
      return losses.read() as Float32Array;
    } finally {
      this.release(mb.id);
      losses?.free();
      this.endCall(views, s, work);
    }
  }

  /**
   * The final norm, LM head and loss of the rows of `mb` (forward and backward): `xFinal`
   * [N, H] holds their final hidden states, `dres` [N, H] receives dL/d(xFinal). Returns the
   * per-row losses. Any stage that holds the head runs it (a head share, StagePlan.headShare).
   */
  async head(mb: MicroBatch, xFinal: Tensor, dres: Tensor): Promise<Float32Array> {
    if (!holdsHead(this.plan)) throw new Error('head(): this stage holds no LM head');
    const N = mb.numTokens;
    const s: Scratch = {};
    let losses: Tensor | undefined;
    let views: Tensor[] = [];
    try {
      for (const [name, shape, dtype] of headScratchShapes(this.config, N, this.headBlockRows)) s[name] = this.device.alloc(dtype ?? 'f32', shape, { zero: false });
      losses = this.device.alloc('f32', [N], { zero: false });
      const ops: Op[] = [];
      this.headOps(ops, mb, xFinal, losses, dres, true, s);
      views = takeViews();
      await this.device.run(ops);
      return losses.read() as Float32Array;
    } finally {
      losses?.free();
      this.endCall(views, s);
    }
  }

  /** Forward only, nothing saved (evaluation). Non-last stages write `output`; the last returns losses. */
  async evaluate(mb: MicroBatch, input: Tensor, output?: Tensor): Promise<Float32Array | undefined> {
    if (!this.plan.last && !output) throw new Error('evaluate: a non-last stage needs an output tensor');
    const N = mb.numTokens;
    return this.forwardOnly(mb, input, (ops, saved, s, own) => {
      const out = this.plan.last ? view(s.xFinal!, [N, this.config.hiddenSize]) : output!;
      this.forwardOps(ops, mb, saved, out, false);
      if (!this.plan.last) return () => undefined;
      const losses = own(this.device.alloc('f32', [N], { zero: false }));
      this.headOps(ops, mb, out, losses, null, false, s);
      return () => losses.read() as Float32Array;
    });
  }

  /**
   * Logits [N, vocab] of every row (single-stage models: evaluation tools and generation).
   * The full matrix is materialised, so keep N small.
   */
  async logits(mb: MicroBatch, input: Tensor): Promise<Float32Array> {
    if (!this.plan.first || !this.plan.last) throw new Error('logits() needs a model in one stage');
    const N = mb.numTokens;
    const c = this.config;
    return this.forwardOnly(mb, input, (ops, saved, s, own) => {
      const xFinal = view(s.xFinal!, [N, c.hiddenSize]);
      const xf = view(s.xf!, [N, c.hiddenSize]);
      const out = own(this.device.alloc('f32', [N, c.vocabSize], { zero: false }));
      this.forwardOps(ops, mb, saved, xFinal, false);
      ops.push({ op: 'rmsnorm_forward', y: xf, rstd: view(s.rstdf!, [N]), x: xFinal, w: this.weights.norm!, eps: c.rmsNormEps });
      ops.push({ op: 'linear_forward', y: out, x: xf, w: this.weights.head! });
      return () => out.read() as Float32Array;
    });
  }

  /**
   * A forward that saves nothing (evaluation, logits): a temporary activation block and scratch
   * around the ops `build` appends; `own` registers tensors to free afterwards; the function
   * `build` returns reads the result once the run is done.
   */
  private async forwardOnly<T>(
    mb: MicroBatch, input: Tensor,
    build: (ops: Op[], saved: Saved, s: Scratch, own: (t: Tensor) => Tensor) => () => T,
  ): Promise<T> {
    const N = mb.numTokens;
    const block = this.allocBlock(mb);
    const carver = new Carver(block);
    const owned: Tensor[] = [];
    let views: Tensor[] = [];
    const s: Scratch = {};
    let work: Work | undefined;
    try {
      this.allocScratch(N, s);
      const layers = carveActs(carver, this.config, this.plan, N, this.segmentSpecs(mb), this.recompute);
      work = this.bindWork(mb, layers);
      const saved: Saved = { block, layers, input, views: carver.views };
      const ops: Op[] = [];
      const result = build(ops, saved, s, (t) => (owned.push(t), t));
      views = takeViews();
      await this.device.run(ops);
      return result();
    } finally {
      for (const v of carver.views) v.free();
      block.free();
      for (const t of owned) t.free();
      this.endCall(views, s, work);
    }
  }

  /** Drops a micro-batch's saved activations (a fault, or a cancelled job). */
  drop(mbId: number): void {
    this.release(mbId);
  }

  inFlight(): number[] {
    return [...this.saved.keys()];
  }

  // ---- optimizer

  /** Σ grad² of an adapter's slice (for global gradient clipping across stages). */
  async gradSumsq(adapterId: number): Promise<number> {
    const a = this.adapter(adapterId);
    await this.device.run([{ op: 'fill', y: a.sumsq, value: 0 }, { op: 'sumsq', out: a.sumsq, xs: [a.grads] }]);
    return (a.sumsq.read() as Float32Array)[0]!;
  }

  /** AdamW on this stage's slice of the adapter, then zero its gradients. */
  /**
   * AdamW on this stage's slice of the adapter, then zero its gradients, in one native run.
   * With `measure`, Σ grad² of the slice is taken first (before clipping) and returned, so a
   * step without clipping needs no separate round trip for the gradient norm.
   */
  async step(
    adapterId: number,
    h: { lr: number; beta1: number; beta2: number; eps: number; weightDecay: number; step: number; gradScale?: number },
    measure = false,
  ): Promise<number | undefined> {
    const a = this.adapter(adapterId);
    const out = a.sumsq;
    await this.device.run([
      ...(measure ? [{ op: 'fill', y: out, value: 0 } as Op, { op: 'sumsq', out, xs: [a.grads] } as Op] : []),
      {
        op: 'adamw', params: [a.params], grads: [a.grads], m: [a.m], v: [a.v],
        lr: h.lr, beta1: h.beta1, beta2: h.beta2, eps: h.eps, weightDecay: h.weightDecay, step: h.step,
        gradScale: h.gradScale ?? 1,
      },
      { op: 'fill', y: a.grads, value: 0 },
    ]);
    a.version++;
    return measure ? (out.read() as Float32Array)[0]! : undefined;
  }

  async zeroGrads(adapterId: number): Promise<void> {
    await this.device.run([{ op: 'fill', y: this.adapter(adapterId).grads, value: 0 }]);
  }

  free(): void {
    for (const id of [...this.saved.keys()]) this.release(id);
    for (const id of [...this.adapters.keys()]) this.removeAdapter(id);
    this.cos.free();
    this.sin.free();
  }

  // ---- internals

  private segmentSpecs(mb: MicroBatch) {
    return mb.segments.map((s) => ({ rows: s.rowEnd - s.rowStart, spec: this.adapter(s.adapter).spec }));
  }

  private allocBlock(mb: MicroBatch): Tensor {
    const carver = new Carver(null);
    carveActs(carver, this.config, this.plan, mb.numTokens, this.segmentSpecs(mb), this.recompute);
    return this.device.alloc('f32', [bucketFloats(carver.offset)], { zero: false });
  }

  /**
   * Recompute: allocates this call's work block (one layer's activations) and binds it into
   * every saved layer (their inputs stay their own); undefined without recompute.
   */
  private bindWork(mb: MicroBatch, layers: LayerActs[]): Work | undefined {
    if (!this.recompute) return undefined;
    const segs = this.segmentSpecs(mb);
    const sizer = new Carver(null);
    carveWork(sizer, this.config, mb.numTokens, segs);
    const block = this.device.alloc('f32', [bucketFloats(sizer.offset)], { zero: false });
    const c = new Carver(block);
    const { body, y } = carveWork(c, this.config, mb.numTokens, segs);
    for (const L of layers) Object.assign(L, body);
    return { block, views: c.views, y };
  }

  private saveBlock(mb: MicroBatch, input: Tensor): Saved {
    if (this.saved.has(mb.id)) throw new Error(`micro-batch ${mb.id} is already in flight on this stage`);
    checkSegments(mb);
    const block = this.allocBlock(mb);
    const carver = new Carver(block);
    const layers = carveActs(carver, this.config, this.plan, mb.numTokens, this.segmentSpecs(mb), this.recompute);
    const saved: Saved = { block, layers, input, views: carver.views };
    this.saved.set(mb.id, saved);
    return saved;
  }

  private release(mbId: number): void {
    const s = this.saved.get(mbId);
    if (!s) return;
    for (const v of s.views) v.free();
    s.block.free();
    this.saved.delete(mbId);
  }

  /** Fills `s` with the scratch of one call (freed by endCall; the device's block cache makes the next allocation cheap). */
  private allocScratch(rows: number, s: Scratch): void {
    for (const [name, shape, dtype] of scratchShapes(this.config, this.plan, rows, this.headBlockRows)) s[name] = this.device.alloc(dtype ?? 'f32', shape, { zero: false });
  }

  /** Frees a call's views (those of an op list left half built by an error too) and its scratch. */
  private endCall(views: Tensor[], s: Scratch, work?: Work): void {
    freeViews(views);
    freeViews(takeViews());
    freeViews(Object.values(s));
    if (work) {
      freeViews(work.views);
      work.block.free();
    }
  }

  /** LoRA segment arguments for one projection of one layer (undefined: no adapter targets it). */
  /** `train` false (evaluation, generation): no dropout, as PEFT in eval mode. */
  private loraSegments(mb: MicroBatch, layer: number, target: LoraTarget, acts: LayerActs, withGrads: boolean, train = true): LoraSegmentArg[] {
    const xa = acts.xa.get(target)!;
    const out: LoraSegmentArg[] = [];
    const ti = LORA_TARGETS.indexOf(target);
    mb.segments.forEach((seg, i) => {
      const x = xa[i];
      if (!x) return;
      const a = this.adapter(seg.adapter);
      const m = a.module(layer, target)!;
      out.push({
        rowStart: seg.rowStart, rowEnd: seg.rowEnd, a: m.a, b: m.b, scale: a.scale,
        dropout: train ? a.spec.dropout : 0, seed: deriveSeed(a.spec.seed, 'dropout', seg.serial, layer, ti), position: 0, xa: x,
        ...(withGrads ? { da: m.da, db: m.db } : {}),
      });
    });
    return out;
  }

  /** y (=, or += with accumulate) = x·Wᵀ + Σ_segments LoRA(x) */
  private proj(ops: Op[], mb: MicroBatch, layer: number, target: LoraTarget, acts: LayerActs, y: Tensor, x: Tensor, w: Tensor, accumulate: boolean, train: boolean, base = true) {
    if (base) ops.push({ op: 'linear_forward', y, x, w, accumulate });
    const segments = this.loraSegments(mb, layer, target, acts, false, train);
    if (segments.length) ops.push({ op: 'lora_forward', y, x, segments });
  }

  /** dx (=, or +=) = dy·W + Σ_segments LoRA backward (which also accumulates dA, dB) */
  private projBack(ops: Op[], mb: MicroBatch, layer: number, target: LoraTarget, acts: LayerActs, dx: Tensor, dy: Tensor, x: Tensor, w: Tensor, accumulate = false) {
    ops.push({ op: 'linear_backward', dx, dy, w, accumulate });
    const segments = this.loraSegments(mb, layer, target, acts, true);
    if (segments.length) ops.push({ op: 'lora_backward', dx, dy, x, segments });
  }

  private forwardOps(ops: Op[], mb: MicroBatch, saved: Saved, output: Tensor, train = true): void {
    const W = this.weights;
    const n = this.plan.hi - this.plan.lo;
    if (this.plan.first) {
      ops.push({ op: 'embedding_forward', y: saved.layers[0]?.x ?? output, ids: saved.input, table: W.embed! });
    } else if (n > 0) {
      saved.layers[0]!.x = saved.input;
    }
    for (let i = 0; i < n; i++) this.layerForwardOps(ops, mb, i, saved.layers[i]!, i + 1 < n ? saved.layers[i + 1]!.x : output, train);
  }

  /**
   * One layer's forward from A.x, activations into A, output into y. `recomputing` (the backward
   * of recompute): the activations again, bitwise, but not the layer's output, which nobody
   * reads: no residual copy and no base down_proj (its LoRA still runs, for the saved x·A).
   */
  private layerForwardOps(ops: Op[], mb: MicroBatch, i: number, A: LayerActs, y: Tensor, train: boolean, recomputing = false): void {
    const c = this.config;
    const { positions, cuSeqlens } = mb.tensors;
    const l = this.plan.lo + i;
    const L = this.weights.layers[i]!;
    ops.push({ op: 'rmsnorm_forward', y: A.xn1, rstd: A.rstd1, x: A.x, w: L.attnNorm, eps: c.rmsNormEps });
    this.proj(ops, mb, l, 'q_proj', A, A.q, A.xn1, L.q, false, train);
    this.proj(ops, mb, l, 'k_proj', A, A.k, A.xn1, L.k, false, train);
    this.proj(ops, mb, l, 'v_proj', A, A.v, A.xn1, L.v, false, train);
    ops.push({ op: 'rope_forward', y: A.q, x: A.q, pos: positions, cos: this.cos, sin: this.sin, heads: c.numHeads });
    ops.push({ op: 'rope_forward', y: A.k, x: A.k, pos: positions, cos: this.cos, sin: this.sin, heads: c.numKvHeads });
    ops.push({
      op: 'attention_forward', out: A.ao, lse: A.lse, q: A.q, k: A.k, v: A.v, cuSeqlens,
      heads: c.numHeads, kvHeads: c.numKvHeads, scale: 1 / Math.sqrt(c.headDim),
    });
    ops.push({ op: 'copy', y: A.hmid, x: A.x });
    this.proj(ops, mb, l, 'o_proj', A, A.hmid, A.ao, L.o, true, train);
    ops.push({ op: 'rmsnorm_forward', y: A.xn2, rstd: A.rstd2, x: A.hmid, w: L.mlpNorm, eps: c.rmsNormEps });
    this.proj(ops, mb, l, 'gate_proj', A, A.gate, A.xn2, L.gate, false, train);
    this.proj(ops, mb, l, 'up_proj', A, A.up, A.xn2, L.up, false, train);
    ops.push({ op: 'swiglu_forward', h: A.act, gate: A.gate, up: A.up });
    if (!recomputing) ops.push({ op: 'copy', y, x: A.hmid });
    this.proj(ops, mb, l, 'down_proj', A, y, A.act, L.down, true, train, !recomputing);
  }

  /**
   * Final norm, LM head and loss, one row-block of logits at a time; with grad, dres = dL/d(xFinal).
   * Only rows that have a target pay for logits: with prompts masked (train_on_inputs: false)
   * and one untargeted row per sequence, that is often well under half of the head's GEMMs. The
   * targeted rows are gathered, their losses and gradients scattered back (rows are independent
   * in every head kernel, so the numbers are those of the full computation).
   */
  private headOps(ops: Op[], mb: MicroBatch, xFinal: Tensor, losses: Tensor, dres: Tensor | null, withGrad: boolean, s: Scratch): void {
    const c = this.config;
    const H = c.hiddenSize;
    const N = mb.numTokens;
    const { targets, weights } = mb.tensors;
    const xf = view(s.xf!, [N, H]);
    const rstdf = view(s.rstdf!, [N]);
    const dxf = view(s.dxf!, [N, H]);
    ops.push({ op: 'rmsnorm_forward', y: xf, rstd: rstdf, x: xFinal, w: this.weights.norm!, eps: c.rmsNormEps });
    const labels = targets!.read() as Int32Array;
    let T = 0;
    for (let i = 0; i < N; i++) if (labels[i]! >= 0) T++;
    // x: the rows the head runs on; with grad, their dL/dx replaces them in place, block by block
    let x = xf, lab = targets!, wt = weights!, loss = losses, idx: Tensor | undefined;
    const gathered = headRows(N, T, this.gatherTargets) < N;
    if (gathered && T > 0) {
      const rows = new Int32Array(T), gl = new Int32Array(T), gw = new Float32Array(T);
      const w = withGrad ? (weights!.read() as Float32Array) : undefined;
      for (let i = 0, k = 0; i < N; i++) {
        if (labels[i]! < 0) continue;
        rows[k] = i;
        gl[k] = labels[i]!;
        if (w) gw[k] = w[i]!;
        k++;
      }
      idx = view(s.headRows!, [T]);
      idx.write(rows);
      lab = view(s.headLabels!, [T]);
      lab.write(gl);
      wt = view(s.headWeights!, [T]);
      if (withGrad) wt.write(gw);
      loss = view(s.headLosses!, [T]);
      x = view(s.xg!, [T, H]);
      ops.push({ op: 'embedding_forward', y: x, ids: idx, table: xf });
    }
    const M = gathered ? T : N;
    for (let b = 0; b < M; b += this.headBlockRows) {
      const e = Math.min(M, b + this.headBlockRows);
      const logits = view(s.logits!, [e - b, c.vocabSize]);
      const xb = tmp(x.rows(b, e));
      ops.push({ op: 'linear_forward', y: logits, x: xb, w: this.weights.head! });
      if (withGrad) {
        ops.push({
          op: 'cross_entropy_backward', losses: tmp(loss.rows(b, e)), dlogits: logits, logits,
          labels: tmp(lab.rows(b, e)), weights: tmp(wt.rows(b, e)),
        });
        ops.push({ op: 'linear_backward', dx: gathered ? xb : tmp(dxf.rows(b, e)), dy: logits, w: this.weights.head! });
      } else {
        ops.push({ op: 'cross_entropy_forward', losses: tmp(loss.rows(b, e)), logits, labels: tmp(lab.rows(b, e)) });
      }
    }
    if (gathered) {
      // untargeted rows: loss 0 and no gradient, as cross-entropy gives an ignored label
      ops.push({ op: 'fill', y: losses, value: 0 });
      if (withGrad) ops.push({ op: 'fill', y: dxf, value: 0 });
      if (idx) {
        ops.push({ op: 'embedding_backward', dtable: tmp(losses.reshape([N, 1])), dy: tmp(loss.reshape([T, 1])), ids: idx });
        if (withGrad) ops.push({ op: 'embedding_backward', dtable: dxf, dy: x, ids: idx });
      }
    }
    if (withGrad && dres) {
      ops.push({ op: 'rmsnorm_backward', dx: dres, dy: dxf, x: xFinal, w: this.weights.norm!, rstd: rstdf });
    }
  }

  private layerBackwardOps(ops: Op[], mb: MicroBatch, i: number, A: LayerActs, dres: Tensor, s: Scratch): void {
    const c = this.config;
    const N = mb.numTokens;
    const l = this.plan.lo + i;
    const L = this.weights.layers[i]!;
    const { positions, cuSeqlens } = mb.tensors;
    const H = c.hiddenSize, I = c.intermediateSize;
    const dact = view(s.dact!, [N, I]), dgate = view(s.dgate!, [N, I]), dup = view(s.dup!, [N, I]);
    const dxn = view(s.dxn!, [N, H]);
    const dao = view(s.dao!, [N, this.qDim]), dq = view(s.dq!, [N, this.qDim]);
    const dk = view(s.dk!, [N, this.kvDim]), dv = view(s.dv!, [N, this.kvDim]);
    // MLP: out = hmid + down(swiglu(gate(xn2), up(xn2))), xn2 = norm(hmid)
    this.projBack(ops, mb, l, 'down_proj', A, dact, dres, A.act, L.down);
    ops.push({ op: 'swiglu_backward', dgate, dup, dh: dact, gate: A.gate, up: A.up });
    this.projBack(ops, mb, l, 'gate_proj', A, dxn, dgate, A.xn2, L.gate);
    this.projBack(ops, mb, l, 'up_proj', A, dxn, dup, A.xn2, L.up, true);
    ops.push({ op: 'rmsnorm_backward', dx: dres, dy: dxn, x: A.hmid, w: L.mlpNorm, rstd: A.rstd2, accumulate: true });
    // attention: hmid = x + o(attn(rope(q(xn1)), rope(k(xn1)), v(xn1))), xn1 = norm(x)
    this.projBack(ops, mb, l, 'o_proj', A, dao, dres, A.ao, L.o);
    ops.push({
      op: 'attention_backward', dq, dk, dv, dout: dao, q: A.q, k: A.k, v: A.v, out: A.ao, lse: A.lse, cuSeqlens,
      heads: c.numHeads, kvHeads: c.numKvHeads, scale: 1 / Math.sqrt(c.headDim),
    });
    ops.push({ op: 'rope_backward', dx: dq, dy: dq, pos: positions, cos: this.cos, sin: this.sin, heads: c.numHeads });
    ops.push({ op: 'rope_backward', dx: dk, dy: dk, pos: positions, cos: this.cos, sin: this.sin, heads: c.numKvHeads });
    this.projBack(ops, mb, l, 'q_proj', A, dxn, dq, A.xn1, L.q);
    this.projBack(ops, mb, l, 'k_proj', A, dxn, dk, A.xn1, L.k, true);
    this.projBack(ops, mb, l, 'v_proj', A, dxn, dv, A.xn1, L.v, true);
    // the first stage's first layer: nobody needs dL/d(embedding output) (the table is frozen)
    if (!(this.plan.first && i === 0)) {
      ops.push({ op: 'rmsnorm_backward', dx: dres, dy: dxn, x: A.x, w: L.attnNorm, rstd: A.rstd1, accumulate: true });
    }
  }
}

/**
 * The saved activations of a micro-batch on a stage: every layer's input and body. With
 * `recompute`, only the inputs; the body is bound per call from a work block (carveWork).
 */
function carveActs(c: Carver, cfg: LlamaConfig, plan: StagePlan, N: number, segs: Array<{ rows: number; spec: LoraSpec }>, recompute = false): LayerActs[] {
  const H = cfg.hiddenSize;
  const layers: LayerActs[] = [];
  for (let l = plan.lo; l < plan.hi; l++) {
    const first = l === plan.lo;
    // the first layer's input is the stage input (or the embedding output on stage 0)
    const x = first && !plan.first ? (null as unknown as Tensor) : c.take([N, H]);
    layers.push({ x, ...(recompute ? unboundBody() : carveBody(c, cfg, N, segs)) });
  }
  return layers;
}

type LayerBody = Omit<LayerActs, 'x'>;

/** Recompute: a layer's body before a call binds its work block. */
function unboundBody(): LayerBody {
  const none = null as unknown as Tensor;
  return { xn1: none, rstd1: none, q: none, k: none, v: none, ao: none, lse: none, hmid: none, xn2: none, rstd2: none, gate: none, up: none, act: none, xa: new Map() };
}

/** Recompute: one call's work block: a layer body shared by every layer, and a [N, H] output nobody reads. */
function carveWork(c: Carver, cfg: LlamaConfig, N: number, segs: Array<{ rows: number; spec: LoraSpec }>): { body: LayerBody; y: Tensor } {
  const body = carveBody(c, cfg, N, segs);
  return { body, y: c.take([N, cfg.hiddenSize]) };
}

/** One layer's activations besides its input. */
function carveBody(c: Carver, cfg: LlamaConfig, N: number, segs: Array<{ rows: number; spec: LoraSpec }>): LayerBody {
  const H = cfg.hiddenSize, I = cfg.intermediateSize;
  const acts: LayerBody = {
    xn1: c.take([N, H]),
    rstd1: c.take([N]),
    q: c.take([N, cfg.numHeads * cfg.headDim]),
    k: c.take([N, cfg.numKvHeads * cfg.headDim]),
    v: c.take([N, cfg.numKvHeads * cfg.headDim]),
    ao: c.take([N, cfg.numHeads * cfg.headDim]),
    lse: c.take([cfg.numHeads, N]),
    hmid: c.take([N, H]),
    xn2: c.take([N, H]),
    rstd2: c.take([N]),
    gate: c.take([N, I]),
    up: c.take([N, I]),
    act: c.take([N, I]),
    xa: new Map(),
  };
  for (const target of LORA_TARGETS) {
    acts.xa.set(target, segs.map((s) => (s.spec.targets.includes(target) ? c.take([s.rows, s.spec.r]) : undefined)));
  }
  return acts;
}

/** Rows a call's scratch is allocated for: multiples of 64, so the device's block cache reuses the blocks. */
export function scratchRows(rows: number): number {
  return Math.max(64, Math.ceil(rows / 64) * 64);
}

function scratchShapes(c: LlamaConfig, plan: StagePlan, numTokens: number, headBlockRows: number): Array<[string, number[], ('f32' | 'i32')?]> {
  const H = c.hiddenSize, I = c.intermediateSize;
  const rows = scratchRows(numTokens);
  const shapes: Array<[string, number[], ('f32' | 'i32')?]> = [
    ['dact', [rows, I]], ['dgate', [rows, I]], ['dup', [rows, I]], ['dxn', [rows, H]],
    ['dao', [rows, c.numHeads * c.headDim]], ['dq', [rows, c.numHeads * c.headDim]], ['dk', [rows, c.numKvHeads * c.headDim]], ['dv', [rows, c.numKvHeads * c.headDim]],
  ];
  if (plan.last) {
    shapes.push(['xFinal', [rows, H]], ...headScratchShapes(c, numTokens, headBlockRows));
    if (plan.first) shapes.push(['dres', [rows, H]]);
  } else if (holdsHead(plan)) {
    // a head share runs the head alone, in calls of its own (head())
    const head = headScratchShapes(c, numTokens, headBlockRows);
    const bytes = (l: typeof shapes) => l.reduce((n, [, shape]) => n + shape.reduce((a, b) => a * b, 1), 0);
    if (bytes(head) > bytes(shapes)) return head;
  }
  return shapes;
}

/** The scratch of the final norm, the LM head and the loss over `numTokens` rows (headOps). */
function headScratchShapes(c: LlamaConfig, numTokens: number, headBlockRows: number): Array<[string, number[], ('f32' | 'i32')?]> {
  const H = c.hiddenSize;
  const rows = scratchRows(numTokens);
  return [
    ['xf', [rows, H]], ['rstdf', [rows]], ['dxf', [rows, H]],
    ['logits', [Math.min(rows, headBlockRows), c.vocabSize]],
    // the targeted rows, gathered (headOps)
    ['xg', [rows, H]], ['headRows', [rows], 'i32'], ['headLabels', [rows], 'i32'], ['headWeights', [rows]], ['headLosses', [rows]],
  ];
}

/** Bytes of the saved-activation block of one micro-batch on a stage (as the allocator counts). */
export function activationBytes(config: LlamaConfig, plan: StagePlan, numTokens: number, segments: Array<{ rows: number; spec: LoraSpec }>, recompute = false): number {
  const carver = new Carver(null);
  carveActs(carver, config, plan, numTokens, segments, recompute);
  return allocBytes(bucketFloats(carver.offset) * 4);
}

/** Bytes of the work block one call holds with recompute (0 without). */
export function workBytes(config: LlamaConfig, numTokens: number, segments: Array<{ rows: number; spec: LoraSpec }>, recompute: boolean): number {
  if (!recompute) return 0;
  const carver = new Carver(null);
  carveWork(carver, config, numTokens, segments);
  return allocBytes(bucketFloats(carver.offset) * 4);
}

/** Bytes of the scratch a call over `rows` tokens holds while it runs (none at rest). */
export function scratchBytes(config: LlamaConfig, plan: StagePlan, rows: number, headBlockRows = defaultHeadBlockRows(config)): number {
  return scratchShapes(config, plan, rows, headBlockRows).reduce((s, [, shape]) => s + allocBytes(4 * shape.reduce((a, b) => a * b, 1)), 0);
}

/**
 * Rows of a micro-batch of N rows, T of them targeted, that the LM head runs on (headOps): the
 * targeted ones, gathered, unless nearly every row is targeted (a few untargeted rows, one per
 * sequence as in pre-training data, are not worth the copies). Fractions work too (N = 1).
 */
export function headRows(N: number, T: number, gather = true): number {
  return gather && T <= 0.9 * N ? T : N;
}

export function defaultHeadBlockRows(c: LlamaConfig): number {
  return Math.max(16, Math.min(512, Math.floor((8 << 20) / (4 * c.vocabSize))));
}

// Handles made while a call builds its ops (views of scratch, row slices). Each holds its
// storage until freed (or garbage-collected), and the device counts those bytes as used, so the
// call frees them once its run is over. Ops are built synchronously: one list is enough.
let madeViews: Tensor[] = [];
function tmp(t: Tensor): Tensor {
  madeViews.push(t);
  return t;
}
function takeViews(): Tensor[] {
  const v = madeViews;
  madeViews = [];
  return v;
}
function freeViews(views: Tensor[]): void {
  for (const v of views) v.free();
}

/** A view of the first elements of a flat or larger tensor, with the given shape (freed with the call's views). */
function view(t: Tensor, shape: number[]): Tensor {
  const n = shape.reduce((a, b) => a * b, 1);
  const flat = t.shape.length === 1 ? t : tmp(t.reshape([t.shape.reduce((a, b) => a * b, 1)]));
  return tmp(tmp(flat.rows(0, n)).reshape(shape));
}

/** Activation blocks are rounded up to size classes so the device's block cache reuses them. */
function bucketFloats(n: number): number {
  const bucket = 1 << 16; // 256 KiB
  return Math.max(bucket, Math.ceil(n / bucket) * bucket);
}

function checkSegments(mb: MicroBatch): void {
  let prev = 0;
  for (const s of mb.segments) {
    if (!(s.rowStart >= prev && s.rowEnd > s.rowStart && s.rowEnd <= mb.numTokens)) {
      throw new Error(`micro-batch ${mb.id}: segment of adapter ${s.adapter} [${s.rowStart}, ${s.rowEnd}) is out of order or outside 0..${mb.numTokens}`);
    }
    prev = s.rowEnd;
  }
}
