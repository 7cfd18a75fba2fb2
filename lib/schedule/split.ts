// Stage balance: where to cut the model into pipeline stages. A cost model gives each half of a
// layer (attention, MLP) and the head a cost per micro-batch, and the contiguous split that
// minimises the slowest stage's time (cost / device speed) wins. The costs are FLOPs (forward +
// backward, no weight grads) unless the profile brings measured ones (lib/schedule/calibrate.ts:
// on a small model, per-op overheads and each kernel's own efficiency weigh more than FLOPs).
// Cuts go between layers; where whole layers cannot balance, a cut may fall inside a layer, after
// its attention (StagePlan.lastAttnOnly / firstMlpOnly), and the stage before the last may run a
// share of the head's rows (StagePlan.headShare).
import type { LlamaConfig } from '../model/config.js';
import type { StagePlan } from '../model/batch.js';
import { headRows } from '../model/head.js';

/** FLOPs per token of a layer's attention half (norm, q/k/v/o, attention), forward + backward (dX only), at sequence length T. */
export function attentionFlopsPerToken(c: LlamaConfig, T = 512): number {
  const H = c.hiddenSize,
    q = c.numHeads * c.headDim,
    kv = c.numKvHeads * c.headDim;
  const gemm = 2 * (H * q + 2 * H * kv + q * H); // forward projections
  const attn = 2 * 2 * (T / 2) * q; // causal QKᵀ and PV, average half a sequence
  return 2 * gemm + 3.5 * attn; // backward dX ≈ forward; attention backward ≈ 2.5× forward
}

/** FLOPs per token of a layer's MLP half (norm, gate/up/down), forward + backward (dX only). */
export function mlpFlopsPerToken(c: LlamaConfig): number {
  return 2 * 2 * (3 * c.hiddenSize * c.intermediateSize);
}

/** FLOPs per token of one decoder layer, forward + backward (dX only), at sequence length T. */
export function layerFlopsPerToken(c: LlamaConfig, T = 512): number {
  return attentionFlopsPerToken(c, T) + mlpFlopsPerToken(c);
}

/**
 * FLOPs per token of the LM head (logits + dX through the head), at its real cost: it runs only
 * on the rows it is gathered to (lib/model/stage.ts headRows), so with `targetFraction` of the
 * rows targeted (prompts masked) it costs that fraction of the full head.
 */
export function headFlopsPerToken(c: LlamaConfig, targetFraction = 1): number {
  return 2 * 2 * c.hiddenSize * c.vocabSize * headRows(1, targetFraction);
}

/**
 * What one micro-batch costs, per kind of unit: a layer's attention half, a layer's MLP half (every
 * layer alike) and the head on the targeted rows; forward + backward. Any unit (FLOPs per token,
 * ms per micro-batch): only the ratios matter.
 */
export interface UnitCosts {
  attention: number;
  mlp: number;
  head: number;
}

/** What the data looks like, for the cost model: sequence length, the fraction of rows with a target, or measured costs. */
export interface SplitProfile {
  seqLen?: number;
  targetFraction?: number;
  /** Costs to balance instead of FLOP counts (measured on the stages' machine: lib/schedule/calibrate.ts). */
  costs?: UnitCosts;
}

/** The FLOP costs per token of the units at the profile's sequence length and targeted rows. */
export function flopCosts(c: LlamaConfig, profile: SplitProfile = {}): UnitCosts {
  return {
    attention: attentionFlopsPerToken(c, profile.seqLen ?? 512),
    mlp: mlpFlopsPerToken(c),
    head: headFlopsPerToken(c, profile.targetFraction),
  };
}

export interface SplitResult {
  plans: StagePlan[];
  /** Estimated cost of each stage (in the units of the costs: FLOPs per token, or measured ms / relative speed). */
  cost: number[];
}

/** A split in half-layer units: unit 2l is layer l's attention half, 2l + 1 its MLP half. */
interface UnitSplit {
  /** S + 1 cut positions in units, from 0 to 2L. */
  bounds: number[];
  /** The head share of the stage before the last (0: none). */
  share: number;
  /** The slowest stage's time. */
  worst: number;
}

/**
 * The best contiguous split of the units, with cuts at multiples of `step` (2: whole layers,
 * 1: halves too); also every head share x on the stage before the last, taken when it shortens
 * the slowest stage by more than HEAD_SHARE_GAIN.
 */
function bestUnits(units: number[], hf: number, speeds: number[], step: number): UnitSplit {
  const S = speeds.length;
  const U = units.length;
  const P = [0];
  for (const u of units) P.push(P.at(-1)! + u);
  const work = (k: number, m: number) => P[m]! - P[k]!;
  const stageCost = (s: number, k: number, m: number) => (work(k, m) + (s === S - 1 ? hf : 0)) / speeds[s]!;
  // dynamic programming over cut points: best[s][c] = min over splits of units [0,c) into s stages of the max cost
  const INF = Number.POSITIVE_INFINITY;
  const best: number[][] = Array.from({ length: S + 1 }, () => new Array<number>(U + 1).fill(INF));
  const cut: number[][] = Array.from({ length: S + 1 }, () => new Array<number>(U + 1).fill(-1));
  best[0]![0] = 0;
  for (let s = 1; s <= S; s++) {
    for (let c = s * step; c <= U - (S - s) * step; c += step) {
      for (let k = (s - 1) * step; k < c; k += step) {
        const v = Math.max(best[s - 1]![k]!, stageCost(s - 1, k, c));
        if (v < best[s]![c]!) {
          best[s]![c] = v;
          cut[s]![c] = k;
        }
      }
    }
  }
  const boundsFrom = (s0: number, c0: number, tail: number[]) => {
    const bounds = [c0, ...tail];
    for (let s = s0, c = c0; s > 0; s--) {
      c = cut[s]![c]!;
      bounds.unshift(c);
    }
    return bounds;
  };
  const whole: UnitSplit = { bounds: boundsFrom(S, U, []), share: 0, worst: best[S]![U]! };
  // a head share x on stage S-2 that gives the last two stages the same time, within [0, 1]
  let shared: UnitSplit | undefined;
  if (S >= 2 && hf > 0) {
    const v1 = speeds[S - 2]!,
      v2 = speeds[S - 1]!;
    for (let k = (S - 2) * step; k <= U - 2 * step; k += step) {
      const prefix = best[S - 2]![k]!;
      if (prefix === INF) continue;
      for (let m = k + step; m <= U - step; m += step) {
        const A = work(k, m),
          B = work(m, U);
        const x = Math.min(1, Math.max(0, (((A + B + hf) * v1) / (v1 + v2) - A) / hf));
        const worst = Math.max(prefix, (A + x * hf) / v1, (B + (1 - x) * hf) / v2);
        if (x > 0 && (!shared || worst < shared.worst))
          shared = { bounds: boundsFrom(S - 2, k, [m, U]), share: x, worst };
      }
    }
  }
  // the share costs a round trip per micro-batch and a copy of the head: only for a real gain
  return shared && shared.worst < whole.worst * (1 - HEAD_SHARE_GAIN) ? shared : whole;
}

/** Contiguous split of the model over stages with relative speeds (e.g. thread counts). */
export function balanceSplit(c: LlamaConfig, speeds: number[], profile: SplitProfile = {}): SplitResult {
  const S = speeds.length;
  const L = c.numLayers;
  if (S < 1) throw new Error('at least one device is needed');
  if (S > L) throw new Error(`${S} stages for a model of ${L} layers: use at most ${L} devices`);
  const { attention: af, mlp: mf, head: hf } = profile.costs ?? flopCosts(c, profile);
  const units = Array.from({ length: 2 * L }, (_, u) => (u % 2 === 0 ? af : mf));
  const whole = bestUnits(units, hf, speeds, 2);
  // a cut inside a layer loads that layer's weights on both stages: only for a real gain
  const halves = bestUnits(units, hf, speeds, 1);
  const pick = halves.worst < whole.worst * (1 - HALF_LAYER_GAIN) ? halves : whole;
  const x = Math.round(pick.share * 1000) / 1000;
  const b = pick.bounds;
  const plans: StagePlan[] = speeds.map((_, s) => ({
    ...unitPlan(b[s]!, b[s + 1]!, s, S),
    ...(x > 0 && s === S - 2 ? { headShare: x } : {}),
  }));
  const work = (s: number) => units.slice(b[s], b[s + 1]).reduce((a, u) => a + u, 0);
  const head = (s: number) => (s === S - 1 ? (1 - x) * hf : x > 0 && s === S - 2 ? x * hf : 0);
  return { plans, cost: plans.map((_, s) => (work(s) + head(s)) / speeds[s]!) };
}

/** How much shorter the slowest stage must get before the split hands part of the head to another stage. */
export const HEAD_SHARE_GAIN = 0.03;

/** How much shorter the slowest stage must get before the split cuts inside a layer (its weights then live on two stages). */
export const HALF_LAYER_GAIN = 0.03;

/** A user-given split: layers per stage; a half (2.5) cuts a layer after its attention. */
export function explicitSplit(c: LlamaConfig, layers: number[]): StagePlan[] {
  if (layers.some((n) => !Number.isInteger(2 * n)))
    throw new Error(
      `pipeline.split ${JSON.stringify(layers)}: layer counts must be whole numbers or halves (2.5: the next stage starts with that layer's MLP)`,
    );
  const sum = layers.reduce((a, b) => a + b, 0);
  if (sum !== c.numLayers)
    throw new Error(`pipeline.split ${JSON.stringify(layers)} covers ${sum} layers, the model has ${c.numLayers}`);
  if (layers.some((n) => n < 0.5))
    throw new Error(`pipeline.split ${JSON.stringify(layers)}: every stage needs at least half a layer`);
  let u = 0; // in half-layer units
  return layers.map((n, s) => {
    const b0 = u;
    u += 2 * n;
    return unitPlan(b0, u, s, layers.length);
  });
}

/** Stage s of S holding half-layer units [b0, b1) (unit 2l: layer l's attention, 2l + 1: its MLP). */
function unitPlan(b0: number, b1: number, s: number, S: number): StagePlan {
  return {
    lo: Math.floor(b0 / 2),
    hi: Math.ceil(b1 / 2),
    first: s === 0,
    last: s === S - 1,
    ...(b0 % 2 === 1 ? { firstMlpOnly: true } : {}),
    ...(b1 % 2 === 1 ? { lastAttnOnly: true } : {}),
  };
}

export function describeSplit(plans: StagePlan[], devices: string[]): string {
  return plans
    .map((p, s) => {
      const from = p.firstMlpOnly ? `the MLP of layer ${p.lo}` : `layer ${p.lo}`;
      const last = p.hi - 1;
      const to = p.lastAttnOnly ? `the attention of layer ${last}` : `layer ${last}`;
      // one layer: `from` names it (whole, or its MLP), unless only its attention is here
      const layers =
        p.hi - p.lo === 1
          ? p.lastAttnOnly
            ? to
            : from
          : p.firstMlpOnly || p.lastAttnOnly
            ? `${from} to ${to}`
            : `layers ${p.lo}-${last}`;
      return (
        `stage ${s} on ${devices[s]}: ${layers}${p.first ? ' + embedding' : ''}${p.last ? ' + norm/head/loss' : ''}` +
        (p.headShare ? ` + norm/head/loss of ${Math.round(100 * p.headShare)}% of the targeted rows (training)` : '')
      );
    })
    .join('\n');
}
