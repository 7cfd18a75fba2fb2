// The stage program: one contiguous range of LLaMA layers (plus the embedding on the first
// stage and the final norm + LM head + loss on the last), run forward and backward over a
// BatchLoRA micro-batch on one device. The single-device trainer is one stage that is both
// first and last; the pipeline cuts the same model into several stages, at a layer or inside
// one (StagePlan.lastAttnOnly / firstMlpOnly: a layer's attention half here, its MLP half on the
// next stage). No second implementation of the model exists anywhere.
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
//
// One file (over 500 lines) because it is one class: every call below allocates the stage's
// memory for one micro-batch (its saved activation block, the recompute work block, scratch and
// views) and must give all of it back on every exit, an error included; the allocation and the
// release read side by side with the calls that need them. What is not the program itself lives
// in files of its own: a layer's forward and backward ops in layer.ts, the final norm, LM head
// and loss in head.ts, the activation layout and every byte estimate in activations.ts, the
// micro-batch and plan types with the half-layer checks in batch.ts, an adapter's stage slice
// in ../lora/state.ts.
import type { Device, Tensor } from '../tensor.js';
import type { Op } from '../native.js';
import type { LlamaConfig } from './config.js';
import { StageAdapter, type LoraSpec } from '../lora/adapter.js';
import { stageSlice, type AdapterState } from '../lora/state.js';
import { modelRopeTables } from './rope.js';
import {
  checkPlanHalves,
  checkSegments,
  holdsHead,
  layerPart,
  type MicroBatch,
  type SegmentSpec,
  type StagePlan,
} from './batch.js';
import { layerBackwardOps, layerForwardOps, type LayerContext, type LayerWeights } from './layer.js';
import { defaultHeadBlockRows, headOps, logitsOps, type HeadContext } from './head.js';
import {
  activationBytes,
  bucketFloats,
  Carver,
  carveActs,
  carveWork,
  headScratchShapes,
  scratchBytes,
  scratchShapes,
  workBytes,
  type LayerActs,
} from './activations.js';
import { freeViews, takeViews, view, type Scratch } from './views.js';

export type { MicroBatch, MicroBatchTensors, Segment, SegmentSpec, StagePlan } from './batch.js';
export type { LayerWeights } from './layer.js';
export { activationBytes, scratchBytes, scratchRows, workBytes } from './activations.js';
export { defaultHeadBlockRows } from './head.js';

export interface StageWeights {
  embed?: Tensor;
  layers: LayerWeights[];
  norm?: Tensor;
  /** [vocab, hidden]; the embedding table itself when the model ties them. */
  head?: Tensor;
  /** Bytes of the GEMM panels packed for the linears and the head at load (BaseFormat.packWeights). */
  packedBytes?: number;
}

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
  /**
   * bf16: the frozen base's GEMMs (projections and LM head, forward and dX) round their operands
   * to bf16 and accumulate in f32 (vdpbf16ps where the CPU has it). LoRA, attention, norms, the
   * loss, gradients and AdamW stay f32. The weights' storage is chosen at load (lib/model/weights.ts).
   */
  computeDtype?: 'f32' | 'bf16';
}

export class StageProgram implements LayerContext {
  readonly adapters = new Map<number, StageAdapter>();
  private readonly saved = new Map<number, Saved>();
  readonly cos: Tensor;
  readonly sin: Tensor;
  private readonly headBlockRows: number;
  /** See StageOptions.gatherTargets; may be switched between calls (benchmarks compare both on one program). */
  gatherTargets: boolean;
  readonly recompute: boolean;
  /** StageOptions.computeDtype === 'bf16' */
  readonly bf16: boolean;
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
    checkPlanHalves(plan);
    if (holdsHead(plan) && (!weights.norm || !weights.head))
      throw new Error(
        `${plan.last ? 'the last stage' : 'a stage with a head share'} needs the final norm and the LM head`,
      );
    this.qDim = c.numHeads * c.headDim;
    this.kvDim = c.numKvHeads * c.headDim;
    const { cos, sin } = modelRopeTables(c);
    this.cos = device.fromArray('f32', [c.maxPositionEmbeddings, c.headDim / 2], cos);
    this.sin = device.fromArray('f32', [c.maxPositionEmbeddings, c.headDim / 2], sin);
    this.headBlockRows = options.headBlockRows ?? defaultHeadBlockRows(c);
    this.gatherTargets = options.gatherTargets ?? true;
    this.recompute = options.recompute ?? false;
    this.bf16 = options.computeDtype === 'bf16';
  }

  // ---- adapters

  addAdapter(id: number, spec: LoraSpec, init?: Float32Array): StageAdapter {
    if (this.adapters.has(id)) throw new Error(`adapter ${id} is already on this stage`);
    const a = new StageAdapter(this.device, this.config, spec, this.plan.lo, this.plan.hi, init, this.plan);
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
  activationBytes(numTokens: number, segments: SegmentSpec[]): number {
    return activationBytes(this.config, this.plan, numTokens, segments, this.recompute);
  }

  /** Bytes of the work block a call holds while it runs (recompute only; else 0). */
  workBytes(numTokens: number, segments: SegmentSpec[]): number {
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
   * final hidden state before the norm, and runHead() + backward() follow); otherwise trainLast().
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
        if (work) this.layerForward(ops, mb, i, saved.layers[i]!, work.y, true, true);
        this.layerBackward(ops, mb, i, saved.layers[i]!, grad, s);
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
      headOps(this.head(), ops, mb, xFinal, losses, dres, true, s);
      const n = this.plan.hi - this.plan.lo;
      for (let i = n - 1; i >= 0; i--) {
        // the work block still holds the last layer's activations from the forward above
        if (work && i < n - 1) this.layerForward(ops, mb, i, saved.layers[i]!, work.y, true, true);
        this.layerBackward(ops, mb, i, saved.layers[i]!, dres, s);
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
  async runHead(mb: MicroBatch, xFinal: Tensor, dres: Tensor): Promise<Float32Array> {
    if (!holdsHead(this.plan)) throw new Error('runHead(): this stage holds no LM head');
    const N = mb.numTokens;
    const s: Scratch = {};
    let losses: Tensor | undefined;
    let views: Tensor[] = [];
    try {
      for (const [name, shape, dtype] of headScratchShapes(this.config, N, this.headBlockRows))
        s[name] = this.device.alloc(dtype ?? 'f32', shape, { zero: false });
      losses = this.device.alloc('f32', [N], { zero: false });
      const ops: Op[] = [];
      headOps(this.head(), ops, mb, xFinal, losses, dres, true, s);
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
      headOps(this.head(), ops, mb, out, losses, null, false, s);
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
      const out = own(this.device.alloc('f32', [N, c.vocabSize], { zero: false }));
      this.forwardOps(ops, mb, saved, xFinal, false);
      logitsOps(this.head(), ops, N, xFinal, out, s);
      return () => out.read() as Float32Array;
    });
  }

  /**
   * A forward that saves nothing (evaluation, logits): a temporary activation block and scratch
   * around the ops `build` appends; `own` registers tensors to free afterwards; the function
   * `build` returns reads the result once the run is done.
   */
  private async forwardOnly<T>(
    mb: MicroBatch,
    input: Tensor,
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
    await this.device.run([
      { op: 'fill', y: a.sumsq, value: 0 },
      { op: 'sumsq', out: a.sumsq, xs: [a.grads] },
    ]);
    return (a.sumsq.read() as Float32Array)[0]!;
  }

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
        op: 'adamw',
        params: [a.params],
        grads: [a.grads],
        m: [a.m],
        v: [a.v],
        lr: h.lr,
        beta1: h.beta1,
        beta2: h.beta2,
        eps: h.eps,
        weightDecay: h.weightDecay,
        step: h.step,
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
    for (const [name, shape, dtype] of scratchShapes(this.config, this.plan, rows, this.headBlockRows))
      s[name] = this.device.alloc(dtype ?? 'f32', shape, { zero: false });
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

  private forwardOps(ops: Op[], mb: MicroBatch, saved: Saved, output: Tensor, train = true): void {
    const W = this.weights;
    const n = this.plan.hi - this.plan.lo;
    if (this.plan.first) {
      ops.push({ op: 'embedding_forward', y: saved.layers[0]?.x ?? output, ids: saved.input, table: W.embed! });
    } else if (n > 0) {
      saved.layers[0]!.x = saved.input;
    }
    for (let i = 0; i < n; i++)
      this.layerForward(ops, mb, i, saved.layers[i]!, i + 1 < n ? saved.layers[i + 1]!.x : output, train);
  }

  /** Layer i of this stage (model layer lo + i). */
  private layerForward(
    ops: Op[],
    mb: MicroBatch,
    i: number,
    A: LayerActs,
    y: Tensor,
    train: boolean,
    recomputing = false,
  ): void {
    const l = this.plan.lo + i;
    layerForwardOps(this, ops, mb, l, this.weights.layers[i]!, A, y, train, recomputing, layerPart(this.plan, l));
  }

  private layerBackward(ops: Op[], mb: MicroBatch, i: number, A: LayerActs, dres: Tensor, s: Scratch): void {
    // the first stage's first layer: nobody needs dL/d(embedding output) (the table is frozen)
    const l = this.plan.lo + i;
    const inputGrad = !(this.plan.first && i === 0);
    layerBackwardOps(this, ops, mb, l, this.weights.layers[i]!, A, dres, s, inputGrad, layerPart(this.plan, l));
  }

  private head(): HeadContext {
    return {
      config: this.config,
      norm: this.weights.norm!,
      head: this.weights.head!,
      headBlockRows: this.headBlockRows,
      gatherTargets: this.gatherTargets,
      bf16: this.bf16,
    };
  }
}
