// Memory layout of the stage program: the saved-activation block of a micro-batch (what the
// backward reads), the recompute work block, and the scratch one call allocates. Every block is
// carved by the same code that sizes it, so the accounting the supervisor admits work by is the
// allocation itself, to the byte.
import type { Tensor } from '../tensor.js';
import { LORA_TARGETS, type LlamaConfig, type LoraTarget } from './config.js';
import { allocBytes } from '../lora/adapter.js';
import { holdsHead, isAttentionTarget, layerPart, type LayerPart, type SegmentSpec, type StagePlan } from './batch.js';
import { defaultHeadBlockRows } from './head.js';

/** One layer's activations in a micro-batch, as its backward reads them. */
export interface LayerActs {
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
  /** q/k norms (Qwen3): the projections before the per-head norm, and its rstd [N·heads]. */
  qRaw?: Tensor;
  kRaw?: Tensor;
  qRstd?: Tensor;
  kRstd?: Tensor;
  /** xa per target, per segment index (undefined where the adapter has no LoRA there). */
  xa: Map<LoraTarget, Array<Tensor | undefined>>;
}

/** One layer's activations besides its input. */
export type LayerBody = Omit<LayerActs, 'x'>;

/** Carves typed views out of one flat f32 block; the same code computes sizes for accounting. */
export class Carver {
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

/**
 * The saved activations of a micro-batch on a stage: every layer's input and body. With
 * `recompute`, only the inputs; the body is bound per call from a work block (carveWork).
 */
export function carveActs(
  c: Carver,
  cfg: LlamaConfig,
  plan: StagePlan,
  N: number,
  segs: SegmentSpec[],
  recompute = false,
): LayerActs[] {
  const H = cfg.hiddenSize;
  const layers: LayerActs[] = [];
  for (let l = plan.lo; l < plan.hi; l++) {
    const first = l === plan.lo;
    // the first layer's input is the stage input (or the embedding output on stage 0)
    const x = first && !plan.first ? (null as unknown as Tensor) : c.take([N, H]);
    layers.push({ x, ...(recompute ? unboundBody(cfg) : carveBody(c, cfg, N, segs, layerPart(plan, l))) });
  }
  return layers;
}

/** Recompute: a layer's body before a call binds its work block. */
function unboundBody(cfg: LlamaConfig): LayerBody {
  const none = null as unknown as Tensor;
  return {
    xn1: none,
    rstd1: none,
    q: none,
    k: none,
    v: none,
    ao: none,
    lse: none,
    hmid: none,
    xn2: none,
    rstd2: none,
    gate: none,
    up: none,
    act: none,
    ...(cfg.qkNorm ? { qRaw: none, kRaw: none, qRstd: none, kRstd: none } : {}),
    xa: new Map(),
  };
}

/** Recompute: one call's work block: a layer body shared by every layer, and a [N, H] output nobody reads. */
export function carveWork(c: Carver, cfg: LlamaConfig, N: number, segs: SegmentSpec[]): { body: LayerBody; y: Tensor } {
  const body = carveBody(c, cfg, N, segs);
  return { body, y: c.take([N, cfg.hiddenSize]) };
}

/**
 * Carves one layer's body: the activations its backward reads besides its input. Half a layer
 * (`part`, a layer cut between stages) carves only its half's; the residual stream between the
 * halves is the attention half's output or the MLP half's input, never a tensor of its own.
 */
function carveBody(c: Carver, cfg: LlamaConfig, N: number, segs: SegmentSpec[], part: LayerPart = 'all'): LayerBody {
  const H = cfg.hiddenSize,
    I = cfg.intermediateSize;
  const none = null as unknown as Tensor;
  const attn = part !== 'mlp',
    mlp = part !== 'attn';
  const take = (on: boolean, shape: number[]) => (on ? c.take(shape) : none);
  const acts: LayerBody = {
    xn1: take(attn, [N, H]),
    rstd1: take(attn, [N]),
    q: take(attn, [N, cfg.numHeads * cfg.headDim]),
    k: take(attn, [N, cfg.numKvHeads * cfg.headDim]),
    v: take(attn, [N, cfg.numKvHeads * cfg.headDim]),
    ao: take(attn, [N, cfg.numHeads * cfg.headDim]),
    lse: take(attn, [cfg.numHeads, N]),
    hmid: take(part === 'all', [N, H]),
    xn2: take(mlp, [N, H]),
    rstd2: take(mlp, [N]),
    gate: take(mlp, [N, I]),
    up: take(mlp, [N, I]),
    act: take(mlp, [N, I]),
    xa: new Map(),
  };
  if (cfg.qkNorm && attn) {
    acts.qRaw = c.take([N, cfg.numHeads * cfg.headDim]);
    acts.kRaw = c.take([N, cfg.numKvHeads * cfg.headDim]);
    acts.qRstd = c.take([N * cfg.numHeads]);
    acts.kRstd = c.take([N * cfg.numKvHeads]);
  }
  for (const target of LORA_TARGETS) {
    if (part !== 'all' && isAttentionTarget(target) !== attn) continue;
    acts.xa.set(
      target,
      segs.map((s) => (s.spec.targets.includes(target) ? c.take([s.rows, s.spec.r]) : undefined)),
    );
  }
  return acts;
}

/** Rows a call's scratch is allocated for: multiples of 64, so the device's block cache reuses the blocks. */
export function scratchRows(rows: number): number {
  return Math.max(64, Math.ceil(rows / 64) * 64);
}

export function scratchShapes(
  c: LlamaConfig,
  plan: StagePlan,
  numTokens: number,
  headBlockRows: number,
): Array<[string, number[], ('f32' | 'i32')?]> {
  const H = c.hiddenSize,
    I = c.intermediateSize;
  const rows = scratchRows(numTokens);
  const shapes: Array<[string, number[], ('f32' | 'i32')?]> = [
    ['dact', [rows, I]],
    ['dgate', [rows, I]],
    ['dup', [rows, I]],
    ['dxn', [rows, H]],
    ['dao', [rows, c.numHeads * c.headDim]],
    ['dq', [rows, c.numHeads * c.headDim]],
    ['dk', [rows, c.numKvHeads * c.headDim]],
    ['dv', [rows, c.numKvHeads * c.headDim]],
  ];
  // q/k norms: the gradients of the projections' outputs, before the norm
  if (c.qkNorm) shapes.push(['dqRaw', [rows, c.numHeads * c.headDim]], ['dkRaw', [rows, c.numKvHeads * c.headDim]]);
  if (plan.last) {
    shapes.push(['xFinal', [rows, H]], ...headScratchShapes(c, numTokens, headBlockRows));
    if (plan.first) shapes.push(['dres', [rows, H]]);
  }
  return shapes;
}

/** The scratch of the final norm, the LM head and the loss over `numTokens` rows (headOps). */
export function headScratchShapes(
  c: LlamaConfig,
  numTokens: number,
  headBlockRows: number,
): Array<[string, number[], ('f32' | 'i32')?]> {
  const H = c.hiddenSize;
  const rows = scratchRows(numTokens);
  return [
    ['xf', [rows, H]],
    ['rstdf', [rows]],
    ['dxf', [rows, H]],
    ['logits', [Math.min(rows, headBlockRows), c.vocabSize]],
    // the targeted rows, gathered (headOps)
    ['xg', [rows, H]],
    ['headRows', [rows], 'i32'],
    ['headLabels', [rows], 'i32'],
    ['headWeights', [rows]],
    ['headLosses', [rows]],
  ];
}

/** Bytes of the saved-activation block of one micro-batch on a stage (as the allocator counts). */
export function activationBytes(
  config: LlamaConfig,
  plan: StagePlan,
  numTokens: number,
  segments: SegmentSpec[],
  recompute = false,
): number {
  const carver = new Carver(null);
  carveActs(carver, config, plan, numTokens, segments, recompute);
  return allocBytes(bucketFloats(carver.offset) * 4);
}

/** Bytes of the work block one call holds with recompute (0 without). */
export function workBytes(config: LlamaConfig, numTokens: number, segments: SegmentSpec[], recompute: boolean): number {
  if (!recompute) return 0;
  const carver = new Carver(null);
  carveWork(carver, config, numTokens, segments);
  return allocBytes(bucketFloats(carver.offset) * 4);
}

/** Bytes of the scratch a call over `rows` tokens holds while it runs (none at rest). */
export function scratchBytes(
  config: LlamaConfig,
  plan: StagePlan,
  rows: number,
  headBlockRows = defaultHeadBlockRows(config),
): number {
  const bytes = (shapes: Array<[string, number[], unknown?]>) =>
    shapes.reduce((s, [, shape]) => s + allocBytes(4 * shape.reduce((a, b) => a * b, 1)), 0);
  const own = bytes(scratchShapes(config, plan, rows, headBlockRows));
  // a head share runs the head in calls of its own (StageProgram.runHead): the larger of the two
  return !plan.last && holdsHead(plan) ? Math.max(own, bytes(headScratchShapes(config, rows, headBlockRows))) : own;
}

/** Activation blocks are rounded up to size classes so the device's block cache reuses them. */
export function bucketFloats(n: number): number {
  const bucket = 1 << 16; // 256 KiB
  return Math.max(bucket, Math.ceil(n / bucket) * bucket);
}
