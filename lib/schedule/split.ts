// Stage balance: where to cut the model into pipeline stages. A cost model gives each layer,
// the embedding and the head their FLOPs per token (forward + backward, no weight grads), and
// the contiguous split that minimises the slowest stage's time (cost / device speed) wins.
import type { LlamaConfig } from '../model/config.js';
import type { StagePlan } from '../model/batch.js';

/** FLOPs per token of one decoder layer, forward + backward (dX only), at sequence length T. */
export function layerFlopsPerToken(c: LlamaConfig, T = 512): number {
  const H = c.hiddenSize, q = c.numHeads * c.headDim, kv = c.numKvHeads * c.headDim, I = c.intermediateSize;
  const gemm = 2 * (H * q + 2 * H * kv + q * H + 3 * H * I); // forward projections
  const attn = 2 * 2 * (T / 2) * q; // causal QKᵀ and PV, average half a sequence
  return 2 * gemm + 3.5 * attn; // backward dX ≈ forward; attention backward ≈ 2.5× forward
}

export function headFlopsPerToken(c: LlamaConfig): number {
  return 2 * 2 * c.hiddenSize * c.vocabSize; // logits + dX through the head
}

export interface SplitResult {
  plans: StagePlan[];
  /** Estimated cost of each stage (FLOPs per token / relative speed). */
  cost: number[];
}

/** Contiguous split of numLayers over stages with relative speeds (e.g. thread counts). */
export function balanceSplit(c: LlamaConfig, speeds: number[], T = 512): SplitResult {
  const S = speeds.length;
  const L = c.numLayers;
  if (S < 1) throw new Error('at least one device is needed');
  if (S > L) throw new Error(`${S} stages for a model of ${L} layers: use at most ${L} devices`);
  const lf = layerFlopsPerToken(c, T);
  const hf = headFlopsPerToken(c);
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
  const bounds: number[] = [L];
  for (let s = S, l = L; s > 0; s--) {
    l = cut[s]![l]!;
    bounds.unshift(l);
  }
  const plans = speeds.map((_, s) => ({ lo: bounds[s]!, hi: bounds[s + 1]!, first: s === 0, last: s === S - 1 }));
  return { plans, cost: plans.map((p, s) => stageCost(s, p.lo, p.hi)) };
}

/** A user-given split: layers per stage. */
export function explicitSplit(c: LlamaConfig, layers: number[]): StagePlan[] {
  if (layers.some((n) => !Number.isInteger(n))) throw new Error(`pipeline.split ${JSON.stringify(layers)}: layer counts must be whole numbers`);
  const sum = layers.reduce((a, b) => a + b, 0);
  if (sum !== c.numLayers) throw new Error(`pipeline.split ${JSON.stringify(layers)} covers ${sum} layers, the model has ${c.numLayers}`);
  if (layers.some((n) => n < 1)) throw new Error(`pipeline.split ${JSON.stringify(layers)}: every stage needs at least one layer`);
  let lo = 0;
  return layers.map((n, s) => {
    const p = { lo, hi: lo + n, first: s === 0, last: s === layers.length - 1 };
    lo += n;
    return p;
  });
}

export function describeSplit(plans: StagePlan[], devices: string[]): string {
  return plans
    .map((p, s) => `stage ${s} on ${devices[s]}: layers ${p.lo}-${p.hi - 1}${p.first ? ' + embedding' : ''}${p.last ? ' + norm/head/loss' : ''}`)
    .join('\n');
}
