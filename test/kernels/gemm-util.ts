// What the GEMM tests (gemm.test.ts, gemm-dtypes.test.ts) share: one device per thread count,
// seeded operands with optional mixed magnitudes, and the comparison in units of the terms'
// magnitude (not a test file itself).
import type { Test } from 'tap';
import type { Rng } from '../../lib/rng.js';
import type { Device } from '../../lib/tensor.js';
import { assertClose, cpuDevice, randn } from '../support/helpers.js';

/** True in the child process eachGemmKernel starts per micro-kernel (it runs fewer sizes). */
export const GEMM_CHILD = process.env.MLORA_GEMM_CHILD === '1';

const devices = new Map<number, Device>();
/** One CPU device per thread count, made once per process. */
export function gemmDevice(threads: number): Device {
  let d = devices.get(threads);
  if (!d) devices.set(threads, (d = cpuDevice(threads, 2 ** 28)));
  return d;
}

/** n values N(0, std²), each times one of `scales` picked at random (mixed magnitudes) if given. */
export function draw(rng: Rng, n: number, std: number, scales?: number[]): Float32Array {
  const x = randn(rng, n, std);
  if (scales) for (let i = 0; i < n; i++) x[i]! *= scales[rng.int(scales.length)]!;
  return x;
}

/**
 * got vs the float64 `want`, both divided by S (the per-element sum of the terms' magnitudes):
 * float32 accumulation of k terms errs by ~√k·u of S in practice (k·u at worst), so 8·u·(√k + 1)
 * never flakes, while a missed or doubled term is off by O(1).
 */
export function assertGemmClose(
  t: Test,
  got: Float32Array,
  r: { want: Float64Array; scale: Float64Array },
  k: number,
  label: string,
): void {
  const s = (i: number) => (r.scale[i]! > 0 ? r.scale[i]! : 1);
  const g = Float64Array.from(got, (v, i) => v / s(i));
  const w = Float64Array.from(r.want, (v, i) => v / s(i));
  const u = 2 ** -24; // float32 unit roundoff
  assertClose(t, g, w, { atol: 8 * u * (Math.sqrt(k) + 1), rtol: 0 }, label);
}
