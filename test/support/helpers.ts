// Shared test helpers: devices, seeded random data, and comparisons that print the max
// difference (llm.c style) so a failing tolerance says by how much.
import type { Test } from 'tap';
import { spawnSync } from 'node:child_process';
import { native } from '../../lib/native.js';
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
  a: ArrayLike<number>,
  b: ArrayLike<number>,
  m: number,
  n: number,
  k: number,
  transA = false,
  transB = false,
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

/**
 * Reruns a test file in a child process once per GEMM micro-kernel this CPU has, with
 * MLORA_GEMM_KERNEL forcing it (and MLORA_GEMM_CHILD=1, so the child skips this step).
 */
export async function eachGemmKernel(t: Test, file: string, bf16Kernels = false): Promise<void> {
  const info = native().info();
  const have: Record<string, boolean> = { scalar: true, avx2: info.cpu.avx2, avx512: info.cpu.avx512f };
  // bf16Kernels: also each bf16-compute kernel of the AVX-512 family (MLORA_GEMM_BF16_KERNEL)
  const runs: Array<[string, Record<string, string>, string | false]> = [
    ...['scalar', 'avx2', 'avx512'].map((k): [string, Record<string, string>, string | false] => [
      `MLORA_GEMM_KERNEL=${k}`,
      { MLORA_GEMM_KERNEL: k },
      have[k] ? false : `this CPU does not have ${k}`,
    ]),
    ...(bf16Kernels
      ? ([
          [
            'MLORA_GEMM_BF16_KERNEL=avx512bf16',
            { MLORA_GEMM_KERNEL: 'avx512', MLORA_GEMM_BF16_KERNEL: 'avx512bf16' },
            info.cpu.avx512bf16 ? false : 'this CPU does not have AVX512_BF16',
          ],
          [
            'MLORA_GEMM_BF16_KERNEL=emu',
            { MLORA_GEMM_KERNEL: 'avx512', MLORA_GEMM_BF16_KERNEL: 'emu' },
            info.cpu.avx512f ? false : 'this CPU does not have avx512',
          ],
        ] as Array<[string, Record<string, string>, string | false]>)
      : []),
  ];
  for (const [label, vars, skip] of runs) {
    await t.test(label, { skip }, async (t) => {
      const r = spawnSync(process.execPath, [file], {
        env: { ...process.env, ...vars, MLORA_GEMM_CHILD: '1' },
        encoding: 'utf8',
        timeout: 300_000,
      });
      const out = `${r.stdout ?? ''}${r.stderr ?? ''}`;
      const failed = /^\s*not ok/m.test(out);
      const passes = (out.match(/^\s*ok \d+/gm) ?? []).length;
      t.ok(r.status === 0 && !failed && passes > 0, `${label}: child exited ${r.status}, ${passes} ok lines`, {
        diagnostic: r.status !== 0 || failed,
        output: out.slice(-3000),
      });
    });
  }
}
