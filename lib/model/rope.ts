// Rotary-embedding tables for the rope_forward / rope_backward ops, computed the way Hugging
// Face's LlamaRotaryEmbedding does (default rope type): inv_freq[i] = 1 / theta^(2i/d) in
// float32, angle = float32(position · inv_freq[i]), cos/sin of that float32 angle. Matching the
// float32 rounding of the angle matters at large positions (angle ≈ 4000 has an ulp ≈ 5e-4).
// Only the d/2 distinct columns are stored: HF's cat(freqs, freqs) repeats them.
// RoPE scaling (config.ropeScaling) changes only the inverse frequencies, as transformers'
// _compute_{linear_scaling,llama3,dynamic_ntk}_parameters do; the attention factor of these
// three is 1, so cos and sin stay unscaled.
import type { LlamaConfig, RopeScaling } from './config.js';

export interface RopeTables {
  /** [maxPos, headDim/2], row-major */
  cos: Float32Array;
  /** [maxPos, headDim/2], row-major */
  sin: Float32Array;
  half: number;
  maxPos: number;
}

/** inv_freq[i] = theta^(−2i/headDim), i < headDim/2, rounded like torch's float32 computation. */
export function ropeInvFreq(theta: number, headDim: number): Float32Array {
  if (!(theta > 0) || !Number.isFinite(theta))
    throw new Error(`ropeTables: theta must be a positive number, got ${theta}`);
  if (!Number.isInteger(headDim) || headDim <= 0 || headDim % 2 !== 0)
    throw new Error(`ropeTables: headDim must be a positive even integer, got ${headDim}`);
  const half = headDim / 2;
  const inv = new Float32Array(half);
  for (let i = 0; i < half; i++) {
    const expo = Math.fround((2 * i) / headDim);
    inv[i] = Math.fround(1 / Math.fround(Math.pow(theta, expo)));
  }
  return inv;
}

/**
 * The inverse frequencies after a RoPE scaling, from the default ones (float32 like torch's; the
 * band tests and the blend in double, then rounded once).
 *   linear: f / factor.
 *   llama3: with N = original_max_position_embeddings and wavelen = 2π / f: wavelen < N /
 *     high_freq_factor keeps f; wavelen > N / low_freq_factor gives f / factor; between, with
 *     s = (N / wavelen − low) / (high − low), (1 − s)·f/factor + s·f.
 *   dynamic: f (the plain RoPE: mlora never runs a position past max_position_embeddings).
 */
export function scaleInvFreq(inv: Float32Array, scaling: RopeScaling | undefined): Float32Array {
  if (!scaling || scaling.type === 'dynamic') return inv;
  const out = new Float32Array(inv.length);
  for (let i = 0; i < inv.length; i++) {
    const f = inv[i]!;
    if (scaling.type === 'linear') {
      out[i] = f / scaling.factor;
      continue;
    }
    const { factor, lowFreqFactor: low, highFreqFactor: high, originalMaxPositionEmbeddings: N } = scaling;
    const wavelen = (2 * Math.PI) / f;
    if (wavelen < N / high) out[i] = f;
    else if (wavelen > N / low) out[i] = f / factor;
    else {
      const sm = (N / wavelen - low) / (high - low);
      out[i] = ((1 - sm) * f) / factor + sm * f;
    }
  }
  return out;
}

/** The RoPE inverse frequencies a model uses (rope_theta, head_dim and any rope scaling). */
export function modelInvFreq(c: Pick<LlamaConfig, 'ropeTheta' | 'headDim' | 'ropeScaling'>): Float32Array {
  return scaleInvFreq(ropeInvFreq(c.ropeTheta, c.headDim), c.ropeScaling);
}

/** cos/sin tables of a model (see modelInvFreq) for positions 0 … maxPositionEmbeddings − 1. */
export function modelRopeTables(
  c: Pick<LlamaConfig, 'ropeTheta' | 'headDim' | 'ropeScaling' | 'maxPositionEmbeddings'>,
): RopeTables {
  return tablesOf(modelInvFreq(c), c.maxPositionEmbeddings);
}

export function ropeTables(theta: number, headDim: number, maxPos: number): RopeTables {
  return tablesOf(ropeInvFreq(theta, headDim), maxPos);
}

function tablesOf(inv: Float32Array, maxPos: number): RopeTables {
  if (!Number.isInteger(maxPos) || maxPos <= 0)
    throw new Error(`ropeTables: maxPos must be a positive integer, got ${maxPos}`);
  const headDim = 2 * inv.length;
  const half = headDim / 2;
  const cos = new Float32Array(maxPos * half);
  const sin = new Float32Array(maxPos * half);
  for (let p = 0; p < maxPos; p++)
    for (let i = 0; i < half; i++) {
      const angle = Math.fround(p * inv[i]!);
      cos[p * half + i] = Math.cos(angle);
      sin[p * half + i] = Math.sin(angle);
    }
  return { cos, sin, half, maxPos };
}

/** Positions of packed sequences: each restarts at 0 (cuSeqlens = row offsets, 0 … n). */
export function packedPositions(cuSeqlens: ArrayLike<number>): Int32Array {
  const n = cuSeqlens[cuSeqlens.length - 1] ?? 0;
  const pos = new Int32Array(n);
  for (let s = 0; s + 1 < cuSeqlens.length; s++)
    for (let r = cuSeqlens[s]!; r < cuSeqlens[s + 1]!; r++) pos[r] = r - cuSeqlens[s]!;
  return pos;
}
