// Stage balance: where to cut the model into pipeline stages. A cost model gives each layer,
// the embedding and the head their FLOPs per token (forward + backward, no weight grads), and
// the contiguous split that minimises the slowest stage's time (cost / device speed) wins.
import type { LlamaConfig } from '../model/config.js';
import type { StagePlan } from '../model/batch.js';
import { headRows } from '../model/head.js';

/** FLOPs per token of one decoder layer, forward + backward (dX only), at sequence length T. */
export function layerFlopsPerToken(c: LlamaConfig, T = 512): number {
  const H = c.hiddenSize,
    q = c.numHeads * c.headDim,
    kv = c.numKvHeads * c.headDim,
    I = c.intermediateSize;
  const gemm = 2 * (H * q + 2 * H * kv + q * H + 3 * H * I); // forward projections
  const attn = 2 * 2 * (T / 2) * q; // causal QKᵀ and PV, average half a sequence
  return 2 * gemm + 3.5 * attn; // backward dX ≈ forward; attention backward ≈ 2.5× forward
}

/**
 * FLOPs per token of the LM head (logits + dX through the head), at its real cost: it runs only
 * on the rows it is gathered to (lib/model/stage.ts headRows), so with `targetFraction` of the
 * rows targeted (prompts masked) it costs that fraction of the full head.
 */
export function headFlopsPerToken(c: LlamaConfig, targetFraction = 1): number {
  return 2 * 2 * c.hiddenSize * c.vocabSize * headRows(1, targetFraction);
}

/** What the data looks like, for the cost model: sequence length and the fraction of rows with a target. */
export interface SplitProfile {
  seqLen?: number;
  targetFraction?: number;
}

export interface SplitResult {
  plans: StagePlan[];
  /** Estimated cost of each stage (FLOPs per token / relative speed). */
  cost: number[];
}

/** Contiguous split of numLayers over stages with relative speeds (e.g. thread counts). */
export function balanceSplit(c: LlamaConfig, speeds: number[], profile: SplitProfile = {}): SplitResult {
  const T = profile.seqLen ?? 512;
  const S = speeds.length;
  const L = c.numLayers;
  if (S < 1) throw new Error('at least one device is needed');
  if (S > L) throw new Error(`${S} stages for a model of ${L} layers: use at most ${L} devices`);
  const lf = layerFlopsPerToken(c, T);
  const hf = headFlopsPerToken(c, profile.targetFraction);
  const stageCost = (s: number, lo: number, hi: number) => ((hi - lo) * lf + (s === S - 1 ? hf : 0)) / speeds[s]!;
  // dynamic programming over cut points: best[s][l] = min over splits of layers [0,l) into s stages of the max cost
  const INF = Number.POSITIVE_INFINITY;
  const best: number[][] = Array.from({ length: S + 1 }, () => new Array<number>(L + 1).fill(INF));
  const cut: number[][] = Array.from({ length: S + 1 }, () => new Array<number>(L + 1).fill(-1));
  best[0]![0] = 0;
  for (let s = 1; s <= S; s++) {
    for (let l = s; l <= L - (S - s); l++) {
      for (let k = s - 1; k < l; k++) {
        const v = Math.max(best[s - 1]![k]!, stageCost(s - 1, k, l));
        if (v < best[s]![l]!) {
          best[s]![l] = v;
          cut[s]![l] = k;
        }
      }
    }
  }
  const boundsFrom = (s0: number, l0: number, tail: number[]) => {
    const bounds = [l0, ...tail];
    for (let s = s0, l = l0; s > 0; s--) {
      l = cut[s]![l]!;
      bounds.unshift(l);
    }
    return bounds;
  };
  const whole = best[S]![L]!;
  // Below a layer: the stage before the last may run a share of the head (StagePlan.headShare),
  // chosen to even out the last two stages. Taken only when it shortens the slowest stage by
  // more than HEAD_SHARE_GAIN: it costs a round trip per micro-batch and a copy of the head.
  let share: { k: number; m: number; x: number; cost: number } | undefined;
  if (S >= 2 && hf > 0) {
    const v1 = speeds[S - 2]!,
      v2 = speeds[S - 1]!;
    for (let k = S - 2; k <= L - 2; k++) {
      const prefix = best[S - 2]![k]!;
      if (prefix === INF) continue;
      for (let m = k + 1; m <= L - 1; m++) {
        const A = (m - k) * lf,
          B = (L - m) * lf;
        // the share x of the head on stage S-2 that gives both the same time, within [0, 1]
        const x = Math.min(1, Math.max(0, (((A + B + hf) * v1) / (v1 + v2) - A) / hf));
        const cost = Math.max(prefix, (A + x * hf) / v1, (B + (1 - x) * hf) / v2);
        if (x > 0 && (!share || cost < share.cost)) share = { k, m, x, cost };
      }
    }
  }
  if (share && share.cost < whole * (1 - HEAD_SHARE_GAIN)) {
    const bounds = boundsFrom(S - 2, share.k, [share.m, L]);
    const x = Math.round(share.x * 1000) / 1000;
    const plans: StagePlan[] = speeds.map((_, s) => ({
      lo: bounds[s]!,
      hi: bounds[s + 1]!,
      first: s === 0,
      last: s === S - 1,
      ...(s === S - 2 ? { headShare: x } : {}),
    }));
    const cost = plans.map(
      (p, s) =>
        stageCost(s, p.lo, p.hi) + (s === S - 2 ? (x * hf) / speeds[s]! : s === S - 1 ? (-x * hf) / speeds[s]! : 0),
    );
    return { plans, cost };
  }
  const bounds = boundsFrom(S, L, []);
  const plans = speeds.map((_, s) => ({ lo: bounds[s]!, hi: bounds[s + 1]!, first: s === 0, last: s === S - 1 }));
  return { plans, cost: plans.map((p, s) => stageCost(s, p.lo, p.hi)) };
}

/** How much shorter the slowest stage must get before the split hands part of the head to another stage. */
export const HEAD_SHARE_GAIN = 0.03;

/** A user-given split: layers per stage. */
export function explicitSplit(c: LlamaConfig, layers: number[]): StagePlan[] {
  if (layers.some((n) => !Number.isInteger(n)))
    throw new Error(`pipeline.split ${JSON.stringify(layers)}: layer counts must be whole numbers`);
  const sum = layers.reduce((a, b) => a + b, 0);
  if (sum !== c.numLayers)
    throw new Error(`pipeline.split ${JSON.stringify(layers)} covers ${sum} layers, the model has ${c.numLayers}`);
  if (layers.some((n) => n < 1))
    throw new Error(`pipeline.split ${JSON.stringify(layers)}: every stage needs at least one layer`);
  let lo = 0;
  return layers.map((n, s) => {
    const p = { lo, hi: lo + n, first: s === 0, last: s === layers.length - 1 };
    lo += n;
    return p;
  });
}

export function describeSplit(plans: StagePlan[], devices: string[]): string {
  return plans
    .map(
      (p, s) =>
        `stage ${s} on ${devices[s]}: layers ${p.lo}-${p.hi - 1}${p.first ? ' + embedding' : ''}${p.last ? ' + norm/head/loss' : ''}` +
        (p.headShare ? ` + norm/head/loss of ${Math.round(100 * p.headShare)}% of the targeted rows (training)` : ''),
    )
    .join('\n');
}
