// One LLaMA decoder layer of the stage program, forward and backward side by side: the ops each
// appends, in order, for one layer over one BatchLoRA micro-batch. Every frozen projection is one
// base GEMM over all rows plus each adapter's low-rank delta on its own row segment (proj,
// projBack). A layer variant (biases, q/k norms, a sliding window) is an optional field of
// LayerWeights and a branch in both functions below, never a second layer implementation.
import type { Tensor } from '../tensor.js';
import type { LoraSegmentArg, Op } from '../native.js';
import { LORA_TARGETS, layerWindow, type LlamaConfig, type LoraTarget } from './config.js';
import type { StageAdapter } from '../lora/adapter.js';
import { deriveSeed } from '../rng.js';
import type { MicroBatch } from './batch.js';
import type { LayerActs } from './activations.js';
import { view, type Scratch } from './views.js';

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
  /** Qwen2: frozen biases of q_proj, k_proj, v_proj [out] (added after the base GEMM, before LoRA). */
  qBias?: Tensor;
  kBias?: Tensor;
  vBias?: Tensor;
  /** Qwen3: RMSNorm weights [head_dim] applied to each head of q and k before RoPE. */
  qNorm?: Tensor;
  kNorm?: Tensor;
}

/** What a layer's ops need from the stage around it. */
export interface LayerContext {
  readonly config: LlamaConfig;
  /** RoPE tables [maxPositionEmbeddings, headDim / 2]. */
  readonly cos: Tensor;
  readonly sin: Tensor;
  /** The resident adapter of a segment (its A/B for this stage's layers, its spec). */
  adapter(id: number): StageAdapter;
  /** The base projections' GEMMs with bf16 operands (StageOptions.computeDtype). */
  readonly bf16: boolean;
}

/**
 * Layer `l`'s forward from A.x, activations into A, output into y. `recomputing` (the backward
 * of recompute): the activations again, bitwise, but not the layer's output, which nobody
 * reads: no residual copy and no base down_proj (its LoRA still runs, for the saved x·A).
 */
export function layerForwardOps(
  ctx: LayerContext,
  ops: Op[],
  mb: MicroBatch,
  l: number,
  L: LayerWeights,
  A: LayerActs,
  y: Tensor,
  train: boolean,
  recomputing = false,
): void {
  const c = ctx.config;
  const N = mb.numTokens;
  const { positions, cuSeqlens } = mb.tensors;
  ops.push({ op: 'rmsnorm_forward', y: A.xn1, rstd: A.rstd1, x: A.x, w: L.attnNorm, eps: c.rmsNormEps });
  // with q/k norms the projections land in qRaw/kRaw and the normed heads in q/k
  const qOut = L.qNorm ? A.qRaw! : A.q,
    kOut = L.kNorm ? A.kRaw! : A.k;
  proj(ctx, ops, mb, l, 'q_proj', A, qOut, A.xn1, L.q, false, train, true, L.qBias);
  proj(ctx, ops, mb, l, 'k_proj', A, kOut, A.xn1, L.k, false, train, true, L.kBias);
  proj(ctx, ops, mb, l, 'v_proj', A, A.v, A.xn1, L.v, false, train, true, L.vBias);
  if (L.qNorm && L.kNorm) {
    const d = c.headDim;
    for (const [y, rstd, x, w, heads] of [
      [A.q, A.qRstd!, A.qRaw!, L.qNorm, c.numHeads],
      [A.k, A.kRstd!, A.kRaw!, L.kNorm, c.numKvHeads],
    ] as const)
      ops.push({
        op: 'rmsnorm_forward',
        y: view(y, [N, heads, d]),
        rstd,
        x: view(x, [N, heads, d]),
        w,
        eps: c.rmsNormEps,
      });
  }
  ops.push({ op: 'rope_forward', y: A.q, x: A.q, pos: positions, cos: ctx.cos, sin: ctx.sin, heads: c.numHeads });
  ops.push({ op: 'rope_forward', y: A.k, x: A.k, pos: positions, cos: ctx.cos, sin: ctx.sin, heads: c.numKvHeads });
  ops.push({
    op: 'attention_forward',
    out: A.ao,
    lse: A.lse,
    q: A.q,
    k: A.k,
    v: A.v,
    cuSeqlens,
    heads: c.numHeads,
    kvHeads: c.numKvHeads,
    scale: 1 / Math.sqrt(c.headDim),
    window: layerWindow(c, l),
  });
  ops.push({ op: 'copy', y: A.hmid, x: A.x });
  proj(ctx, ops, mb, l, 'o_proj', A, A.hmid, A.ao, L.o, true, train);
  ops.push({ op: 'rmsnorm_forward', y: A.xn2, rstd: A.rstd2, x: A.hmid, w: L.mlpNorm, eps: c.rmsNormEps });
  proj(ctx, ops, mb, l, 'gate_proj', A, A.gate, A.xn2, L.gate, false, train);
  proj(ctx, ops, mb, l, 'up_proj', A, A.up, A.xn2, L.up, false, train);
  ops.push({ op: 'swiglu_forward', h: A.act, gate: A.gate, up: A.up });
  if (!recomputing) ops.push({ op: 'copy', y, x: A.hmid });
  proj(ctx, ops, mb, l, 'down_proj', A, y, A.act, L.down, true, train, !recomputing);
}

/**
 * Layer `l`'s backward: dres holds dL/d(output) and becomes dL/d(input) in place; the
 * adapters' dA/dB accumulate. `inputGrad` false (the first stage's first layer): nobody needs
 * dL/d(embedding output), the table is frozen.
 */
export function layerBackwardOps(
  ctx: LayerContext,
  ops: Op[],
  mb: MicroBatch,
  l: number,
  L: LayerWeights,
  A: LayerActs,
  dres: Tensor,
  s: Scratch,
  inputGrad: boolean,
): void {
  const c = ctx.config;
  const N = mb.numTokens;
  const { positions, cuSeqlens } = mb.tensors;
  const H = c.hiddenSize,
    I = c.intermediateSize;
  const qDim = c.numHeads * c.headDim,
    kvDim = c.numKvHeads * c.headDim;
  const dact = view(s.dact!, [N, I]),
    dgate = view(s.dgate!, [N, I]),
    dup = view(s.dup!, [N, I]);
  const dxn = view(s.dxn!, [N, H]);
  const dao = view(s.dao!, [N, qDim]),
    dq = view(s.dq!, [N, qDim]);
  const dk = view(s.dk!, [N, kvDim]),
    dv = view(s.dv!, [N, kvDim]);
  // MLP: out = hmid + down(swiglu(gate(xn2), up(xn2))), xn2 = norm(hmid)
  projBack(ctx, ops, mb, l, 'down_proj', A, dact, dres, A.act, L.down);
  ops.push({ op: 'swiglu_backward', dgate, dup, dh: dact, gate: A.gate, up: A.up });
  projBack(ctx, ops, mb, l, 'gate_proj', A, dxn, dgate, A.xn2, L.gate);
  projBack(ctx, ops, mb, l, 'up_proj', A, dxn, dup, A.xn2, L.up, true);
  ops.push({ op: 'rmsnorm_backward', dx: dres, dy: dxn, x: A.hmid, w: L.mlpNorm, rstd: A.rstd2, accumulate: true });
  // attention: hmid = x + o(attn(rope(q(xn1)), rope(k(xn1)), v(xn1))), xn1 = norm(x)
  projBack(ctx, ops, mb, l, 'o_proj', A, dao, dres, A.ao, L.o);
  ops.push({
    op: 'attention_backward',
    dq,
    dk,
    dv,
    dout: dao,
    q: A.q,
    k: A.k,
    v: A.v,
    out: A.ao,
    lse: A.lse,
    cuSeqlens,
    heads: c.numHeads,
    kvHeads: c.numKvHeads,
    scale: 1 / Math.sqrt(c.headDim),
    window: layerWindow(c, l),
  });
  ops.push({ op: 'rope_backward', dx: dq, dy: dq, pos: positions, cos: ctx.cos, sin: ctx.sin, heads: c.numHeads });
  ops.push({ op: 'rope_backward', dx: dk, dy: dk, pos: positions, cos: ctx.cos, sin: ctx.sin, heads: c.numKvHeads });
  // q/k norms: back through the per-head RMSNorm (weights frozen: no dw) into the projections'
  // outputs; a frozen bias passes dy through unchanged
  let dqp = dq,
    dkp = dk;
  if (L.qNorm && L.kNorm) {
    const d = c.headDim;
    dqp = view(s.dqRaw!, [N, qDim]);
    dkp = view(s.dkRaw!, [N, kvDim]);
    for (const [dx, dy, x, w, rstd, heads] of [
      [dqp, dq, A.qRaw!, L.qNorm, A.qRstd!, c.numHeads],
      [dkp, dk, A.kRaw!, L.kNorm, A.kRstd!, c.numKvHeads],
    ] as const) {
      const h = [N, heads, d];
      ops.push({ op: 'rmsnorm_backward', dx: view(dx, h), dy: view(dy, h), x: view(x, h), w, rstd });
    }
  }
  projBack(ctx, ops, mb, l, 'q_proj', A, dxn, dqp, A.xn1, L.q);
  projBack(ctx, ops, mb, l, 'k_proj', A, dxn, dkp, A.xn1, L.k, true);
  projBack(ctx, ops, mb, l, 'v_proj', A, dxn, dv, A.xn1, L.v, true);
  if (inputGrad) {
    ops.push({ op: 'rmsnorm_backward', dx: dres, dy: dxn, x: A.x, w: L.attnNorm, rstd: A.rstd1, accumulate: true });
  }
}

/**
 * LoRA segment arguments for one projection of one layer (empty: no adapter targets it).
 * `train` false (evaluation, generation): no dropout, as PEFT in eval mode.
 */
function loraSegments(
  ctx: LayerContext,
  mb: MicroBatch,
  layer: number,
  target: LoraTarget,
  acts: LayerActs,
  withGrads: boolean,
  train = true,
): LoraSegmentArg[] {
  const xa = acts.xa.get(target)!;
  const out: LoraSegmentArg[] = [];
  const ti = LORA_TARGETS.indexOf(target);
  mb.segments.forEach((seg, i) => {
    const x = xa[i];
    if (!x) return;
    const a = ctx.adapter(seg.adapter);
    const m = a.module(layer, target)!;
    out.push({
      rowStart: seg.rowStart,
      rowEnd: seg.rowEnd,
      a: m.a,
      b: m.b,
      scale: a.scale,
      dropout: train ? a.spec.dropout : 0,
      seed: deriveSeed(a.spec.seed, 'dropout', seg.serial, layer, ti),
      position: 0,
      xa: x,
      ...(withGrads ? { da: m.da, db: m.db } : {}),
    });
  });
  return out;
}

/** y (=, or += with accumulate) = x·Wᵀ + Σ_segments LoRA(x) (+ bias), the first two in one op
 *  (the CPU fuses the LoRA expand into the base GEMM); without the base, LoRA alone. */
function proj(
  ctx: LayerContext,
  ops: Op[],
  mb: MicroBatch,
  layer: number,
  target: LoraTarget,
  acts: LayerActs,
  y: Tensor,
  x: Tensor,
  w: Tensor,
  accumulate: boolean,
  train: boolean,
  base = true,
  bias?: Tensor,
) {
  const segments = loraSegments(ctx, mb, layer, target, acts, false, train);
  if (base)
    ops.push({ op: 'linear_forward', y, x, w, accumulate, bf16: ctx.bf16, ...(segments.length ? { segments } : {}) });
  else if (segments.length) ops.push({ op: 'lora_forward', y, x, segments });
  if (base && bias) ops.push({ op: 'add_bias', y, b: bias });
}

/** dx (=, or +=) = dy·W + Σ_segments LoRA backward (which also accumulates dA, dB), one op */
function projBack(
  ctx: LayerContext,
  ops: Op[],
  mb: MicroBatch,
  layer: number,
  target: LoraTarget,
  acts: LayerActs,
  dx: Tensor,
  dy: Tensor,
  x: Tensor,
  w: Tensor,
  accumulate = false,
) {
  const segments = loraSegments(ctx, mb, layer, target, acts, true);
  ops.push({
    op: 'linear_backward',
    dx,
    dy,
    w,
    accumulate,
    bf16: ctx.bf16,
    ...(segments.length ? { x, segments } : {}),
  });
}
