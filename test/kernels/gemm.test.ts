// The general GEMM (cpu/gemm.cc): C = alpha·op(A)·op(B) + beta·C against a float64 reference,
// for every transpose combination, each weight dtype (f32, bf16, f16: the reference uses the
// exact values the rounded bits hold), odd sizes that leave partial micro-tiles, sizes that
// cross the cache blocks, 1 and 2 threads, and an extreme-range case. Every micro-kernel this
// CPU has is also run in a child process with MLORA_GEMM_KERNEL forcing it.
//
// Tolerance. Each output is a sum of k products plus beta·c; float32 accumulation errs by at
// most ~k·u of the sum of the *absolute* terms (u = 2⁻²⁴), and in practice by ~√k·u because
// the rounding errors are random. Cancellation can make |C| much smaller than its terms, so we
// measure the error relative to S = |alpha|·Σ|a||b| + |beta|·|c|, and allow 8·u·(√k + 1): wide
// enough to never flake, while any wrong element (a missed or doubled term) is off by O(1).
import t, { type Test } from 'tap';
import { fileURLToPath } from 'node:url';
import { native } from '../../lib/native.js';
import type { Device, Tensor } from '../../lib/tensor.js';
import { Rng } from '../../lib/rng.js';
import { assertClose, eachGemmKernel, randn } from '../support/helpers.js';
import { assertGemmClose, draw, GEMM_CHILD, gemmDevice } from './gemm-util.js';
import { toHalf } from '../support/half.js';

type WType = 'f32' | 'bf16' | 'f16';

interface Case {
  m: number;
  n: number;
  k: number;
  transA: boolean;
  transB: boolean;
  dtype: WType;
  alpha: number;
  beta: number;
  /** scales for A and B entries: each entry is randn · one of these, picked at random */
  ranges?: [number[], number[]];
}

function weight(
  d: Device,
  dtype: WType,
  shape: number[],
  x: Float32Array,
): { tensor: Tensor; values: ArrayLike<number> } {
  if (dtype === 'f32') return { tensor: d.fromArray('f32', shape, x), values: x };
  const h = toHalf(x, dtype);
  return { tensor: d.fromArray(dtype, shape, h.bits), values: h.values };
}

/** want = alpha·op(A)·op(B) + beta·C0 and the per-element magnitude of its terms, in float64. */
function reference(c: Case, a: ArrayLike<number>, b: ArrayLike<number>, c0: ArrayLike<number>) {
  const { m, n, k, transA, transB, alpha, beta } = c;
  const want = new Float64Array(m * n);
  const scale = new Float64Array(m * n);
  const row = new Float64Array(n);
  const absRow = new Float64Array(n);
  for (let i = 0; i < m; i++) {
    row.fill(0);
    absRow.fill(0);
    for (let p = 0; p < k; p++) {
      const av = transA ? a[p * m + i]! : a[i * k + p]!;
      for (let j = 0; j < n; j++) {
        const bv = transB ? b[j * k + p]! : b[p * n + j]!;
        row[j]! += av * bv;
        absRow[j]! += Math.abs(av * bv);
      }
    }
    for (let j = 0; j < n; j++) {
      const cv = beta === 0 ? 0 : c0[i * n + j]!;
      want[i * n + j] = alpha * row[j]! + beta * cv;
      scale[i * n + j] = Math.abs(alpha) * absRow[j]! + Math.abs(beta * cv);
    }
  }
  return { want, scale };
}

async function checkGemm(t: Test, c: Case, threads: number, seed: number) {
  const d = gemmDevice(threads);
  const rng = new Rng(seed, 'gemm', c.m, c.n, c.k);
  const { m, n, k, transA, transB } = c;
  const aData = draw(rng, m * k, 1, c.ranges?.[0]);
  const bData = draw(rng, k * n, 1, c.ranges?.[1]);
  // beta = 0 must not read C (BLAS semantics): start from NaN there.
  const c0 = c.beta === 0 ? new Float32Array(m * n).fill(NaN) : randn(rng, m * n);
  const A = d.fromArray('f32', transA ? [k, m] : [m, k], aData);
  const B = weight(d, c.dtype, transB ? [n, k] : [k, n], bData);
  const C = d.fromArray('f32', [m, n], c0);
  await d.run([{ op: 'gemm', c: C, a: A, b: B.tensor, transA, transB, alpha: c.alpha, beta: c.beta }]);
  const got = C.read() as Float32Array;
  A.free();
  B.tensor.free();
  C.free();
  const r = reference(c, aData, B.values, c0);
  const label =
    `${m}x${n}x${k} ${transA ? 'T' : 'N'}${transB ? 'T' : 'N'} ${c.dtype} alpha=${c.alpha} beta=${c.beta} ` +
    `threads=${threads}${c.ranges ? ' extreme' : ''}`;
  assertGemmClose(t, got, r, k, label);
}

const dtypes: WType[] = ['f32', 'bf16', 'f16'];
const transposes: Array<[boolean, boolean]> = [
  [false, false],
  [false, true],
  [true, false],
  [true, true],
];
const scalars: Array<[number, number]> = [
  [1, 0],
  [0.5, -1.25],
  [-2, 1],
  [1, 1],
];
// Odd sizes leave partial tiles in every direction; 300 and 600 cross the MC/KC blocks.
const sizes: Array<[number, number, number]> = GEMM_CHILD
  ? [
      [1, 1, 1],
      [7, 17, 33],
      [33, 40, 129],
      [150, 37, 300],
    ]
  : [
      [1, 1, 1],
      [1, 8, 4],
      [3, 7, 17],
      [17, 33, 7],
      [33, 17, 129],
      [7, 129, 33],
      [129, 65, 300],
      [300, 40, 17],
    ];

t.test('the kernel this process runs', async (t) => {
  const info = native().info();
  const name = info.cpu.gemmKernel;
  t.match(name, /^(avx512|avx2|scalar)-\d+x\d+$/, `gemm kernel ${name}`);
  const forced = process.env.MLORA_GEMM_KERNEL;
  if (forced) t.ok(name.startsWith(forced), `MLORA_GEMM_KERNEL=${forced} is honoured (${name})`);
  else if (info.cpu.avx512f) t.match(name, /^avx512/, 'AVX-512 machines run the AVX-512 kernel');
  else if (info.cpu.avx2) t.match(name, /^avx2/, 'AVX2 machines run the AVX2 kernel');
});

t.test('every transpose, weight dtype, odd size, alpha/beta, 1 and 2 threads', async (t) => {
  let seed = 1;
  for (const [m, n, k] of sizes)
    for (const [transA, transB] of transposes)
      for (const dtype of dtypes)
        for (const threads of [1, 2]) {
          const [alpha, beta] = scalars[seed % scalars.length]!;
          await checkGemm(t, { m, n, k, transA, transB, dtype, alpha, beta }, threads, seed++);
        }
});

t.test('shapes that cross every cache block, split over rows or over columns', async (t) => {
  const cases: Array<[number, number, number, boolean, boolean, WType]> = [
    [300, 70, 600, false, true, 'f32'], // several MC and KC blocks
    [13, 4100, 20, false, true, 'bf16'], // crosses NC (4080 / 4096); few rows: split over N
    [1, 1000, 64, false, true, 'f16'], // m = 1 (a GEMV), split over N
    [1, 1000, 64, true, false, 'f32'],
    [96, 8, 512, false, true, 'f32'], // LoRA shapes: rank 8 out, rank 16 in
    [96, 512, 16, false, false, 'f32'],
    [200, 16, 96, true, false, 'f32'], // dB-like: xᵀ·dy
  ];
  let seed = 1000;
  for (const [m, n, k, transA, transB, dtype] of GEMM_CHILD ? cases.slice(0, 3) : cases)
    for (const threads of [1, 2])
      await checkGemm(t, { m, n, k, transA, transB, dtype, alpha: 1, beta: 0.5 }, threads, seed++);
});

t.test('extreme range: entries of size ~1e4 and ~1e-4 mixed', async (t) => {
  const ranges: [number[], number[]] = [
    [1e4, 1e-4, 1],
    [1e-4, 1e4, 3e-3],
  ];
  let seed = 2000;
  for (const dtype of dtypes)
    for (const [transA, transB] of transposes)
      await checkGemm(t, { m: 37, n: 45, k: 290, transA, transB, dtype, alpha: 1, beta: 0, ranges }, 2, seed++);
});

// A row of C is the same sum whether its micro-tile is full or the call's rows end inside it
// (edge tiles run kernels for fewer rows): a 256-row pipeline message and a 1024-row batch
// must agree bit for bit, row for row. Rows 0..m-1 of a 48-row call (48 = 4·12 = 8·6: full
// tiles for every kernel) against calls of m rows, every m up to 25 (every edge of 12, 6 and 4).
t.test('a row has the same bits whatever the number of rows in the call', async (t) => {
  const n = 40,
    k = 70,
    big = 48;
  let seed = 3000;
  for (const bf16 of [false, true])
    for (const transA of [false, true])
      for (const [alpha, beta] of GEMM_CHILD ? scalars.slice(1, 2) : scalars)
        for (const threads of [1, 2]) {
          const d = gemmDevice(threads);
          const rng = new Rng(seed++, 'gemm-rows');
          const a = randn(rng, big * k),
            b = randn(rng, n * k),
            c0 = randn(rng, big * n);
          const B = d.fromArray('f32', [n, k], b);
          // A's first m rows ([m, k]) or, transposed, its first m columns of [k, m]
          const rowsOf = (m: number) =>
            transA
              ? Float32Array.from({ length: k * m }, (_, i) => a[Math.floor(i / m) * big + (i % m)]!)
              : a.subarray(0, m * k);
          const gemmRows = async (m: number) => {
            const A = d.fromArray('f32', transA ? [k, m] : [m, k], rowsOf(m));
            const C = d.fromArray('f32', [m, n], c0.subarray(0, m * n));
            await d.run([{ op: 'gemm', c: C, a: A, b: B, transA, transB: true, alpha, beta, bf16 }]);
            const got = C.read() as Float32Array;
            A.free();
            C.free();
            return got;
          };
          const want = await gemmRows(big);
          let differ = '';
          for (let m = 1; m <= 25 && !differ; m++) {
            const got = await gemmRows(m);
            for (let i = 0; i < m * n; i++)
              if (!Object.is(got[i], want[i])) {
                differ = `m = ${m}: row ${Math.floor(i / n)} column ${i % n} is ${got[i]}, ${want[i]} in the ${big}-row call`;
                break;
              }
          }
          B.free();
          t.equal(differ, '', `bf16 ${bf16} ${transA ? 'T' : 'N'}T alpha=${alpha} beta=${beta} threads=${threads}`);
        }
});

t.test('alpha = 0 scales C by beta without reading A or B', async (t) => {
  const d = gemmDevice(1);
  const rng = new Rng(7, 'alpha0');
  const c0 = randn(rng, 6 * 5);
  const A = d.fromArray('f32', [6, 4], new Float32Array(24).fill(NaN));
  const B = d.fromArray('f32', [4, 5], new Float32Array(20).fill(NaN));
  const C = d.fromArray('f32', [6, 5], c0);
  await d.run([{ op: 'gemm', c: C, a: A, b: B, alpha: 0, beta: -0.5 }]);
  assertClose(
    t,
    C.read() as Float32Array,
    Array.from(c0, (x) => -0.5 * x),
    { atol: 0, rtol: 1e-7 },
    'C = -0.5·C',
  );
});

if (!GEMM_CHILD) {
  t.test('every micro-kernel this CPU has, forced with MLORA_GEMM_KERNEL (child processes)', (t) =>
    eachGemmKernel(t, fileURLToPath(import.meta.url)),
  );
}
