// Rotary-embedding tables for the rope_forward / rope_backward ops, computed the way Hugging
// Face's LlamaRotaryEmbedding does (default rope type): inv_freq[i] = 1 / theta^(2i/d) in
// float32, angle = float32(position · inv_freq[i]), cos/sin of that float32 angle. Matching the
// float32 rounding of the angle matters at large positions (angle ≈ 4000 has an ulp ≈ 5e-4).
// Only the d/2 distinct columns are stored: HF's cat(freqs, freqs) repeats them.
// (LLaMA-3 style `rope_scaling` is not handled here.)

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
  if (!(theta > 0) || !Number.isFinite(theta)) throw new Error(`ropeTables: theta must be a positive number, got ${theta}`);
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

export function ropeTables(theta: number, headDim: number, maxPos: number): RopeTables {
  if (!Number.isInteger(maxPos) || maxPos <= 0) throw new Error(`ropeTables: maxPos must be a positive integer, got ${maxPos}`);
  const inv = ropeInvFreq(theta, headDim);
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
