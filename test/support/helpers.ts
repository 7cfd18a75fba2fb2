// Shared test helpers: devices, seeded random data, and comparisons that print the max
// difference (llm.c style) so a failing tolerance says by how much.
import type { Test } from 'tap';
import { openDevice, type Device } from '../../lib/tensor.js';
import { Rng } from '../../lib/rng.js';

export function cpuDevice(threads = 1, budget = 2 ** 30): Device {
  return openDevice('cpu:0', { threads, budget });
}

export function randn(rng: Rng, n: number, std = 1): Float32Array {
  return rng.fillNormal(new Float32Array(n), std);
}

export function randu(rng: Rng, n: number, lo = -1, hi = 1): Float32Array {
  return rng.fillUniform(new Float32Array(n), lo, hi);
}

export interface Tolerance {
  atol: number;
  rtol: number;
}

/** Max |got - want| / (atol + rtol·|want|) over all elements; ≤ 1 passes. */
export function closeness(got: ArrayLike<number>, want: ArrayLike<number>, tol: Tolerance) {
  let worst = 0;
  let worstAt = -1;
  let maxAbs = 0;
  for (let i = 0; i < want.length; i++) {
    const d = Math.abs(got[i]! - want[i]!);
    const r = d / (tol.atol + tol.rtol * Math.abs(want[i]!));
    if (!(r <= worst) || Number.isNaN(d)) {
      if (Number.isNaN(d) || r > worst) {
        worst = Number.isNaN(d) ? Infinity : r;
        worstAt = i;
      }
    }
    if (d > maxAbs) maxAbs = d;
  }
  return { worst, worstAt, maxAbs };
}

export function assertClose(t: Test, got: ArrayLike<number>, want: ArrayLike<number>, tol: Tolerance, label: string) {
  if (got.length !== want.length) {
    t.fail(`${label}: length ${got.length} != ${want.length}`);
    return;
  }
  const c = closeness(got, want, tol);
  const msg = `${label}: max |diff| ${c.maxAbs.toExponential(2)} (atol ${tol.atol}, rtol ${tol.rtol})`;
  if (c.worst <= 1) t.pass(msg);
  else t.fail(`${msg}; worst at ${c.worstAt}: got ${got[c.worstAt]}, want ${want[c.worstAt]}`);
}

/** Float64 GEMM reference: C[m,n] = A[m,k]·B[k,n] with optional transposes (row-major). */
export function gemmRef(
  a: ArrayLike<number>, b: ArrayLike<number>, m: number, n: number, k: number, transA = false, transB = false,
): Float64Array {
  const c = new Float64Array(m * n);
  for (let i = 0; i < m; i++)
    for (let p = 0; p < k; p++) {
      const av = transA ? a[p * m + i]! : a[i * k + p]!;
      if (av === 0) continue;
      for (let j = 0; j < n; j++) c[i * n + j]! += av * (transB ? b[j * k + p]! : b[p * n + j]!);
    }
  return c;
}
