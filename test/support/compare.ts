// Exact comparisons of float arrays and adapter states, for the bitwise-equivalence tests (and
// the max difference to print when they fail).
import type { AdapterState } from '../../lib/lora/state.js';

/** Max |a - b| (Infinity on a length mismatch or NaN). */
export function maxDiff(a: ArrayLike<number>, b: ArrayLike<number>): number {
  if (a.length !== b.length) return Infinity;
  let m = 0;
  for (let i = 0; i < a.length; i++) {
    const d = Math.abs(a[i]! - b[i]!);
    if (!(d <= m)) m = Number.isNaN(d) ? Infinity : d;
  }
  return m;
}

/** True when the two arrays hold the same float32 bit patterns. */
export function bitwiseEqual(a: Float32Array, b: Float32Array): boolean {
  if (a.length !== b.length) return false;
  const x = new Uint32Array(a.buffer, a.byteOffset, a.length);
  const y = new Uint32Array(b.buffer, b.byteOffset, b.length);
  for (let i = 0; i < x.length; i++) if (x[i] !== y[i]) return false;
  return true;
}

/** Largest |a - b| over params, m and v of two adapter states. */
export function stateMaxDiff(a: AdapterState, b: AdapterState): number {
  return Math.max(maxDiff(a.params, b.params), maxDiff(a.m, b.m), maxDiff(a.v, b.v));
}

/** Same bits in params, m and v, and the same optimizer version. */
export function stateBitwiseEqual(a: AdapterState, b: AdapterState): boolean {
  return (
    bitwiseEqual(a.params, b.params) && bitwiseEqual(a.m, b.m) && bitwiseEqual(a.v, b.v) && a.version === b.version
  );
}
