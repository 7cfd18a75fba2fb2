// The GEMM on quantized weights (nf4, nf4dq, int8: dequantized while B is packed) and with bf16
// compute (operands rounded to bf16, f32 accumulation; vdpbf16ps on AVX512_BF16 CPUs), forward
// (linear_forward: Y = X·Wᵀ) and backward (linear_backward: dX = dY·W), against a float64
// reference built from an independent JavaScript dequantizer of the weight's blob and from
// JavaScript bf16 rounding. Fresh seeded random inputs, odd sizes (blocks of 64 that straddle
// weight rows, partial micro-tiles), and an extreme-range case (entries ~1e4 and ~1e-4 mixed).
// Every micro-kernel this CPU has runs in a child process with MLORA_GEMM_KERNEL forcing it, so
// the AMX tile kernel, the vdpbf16ps kernel (MLORA_GEMM_BF16_KERNEL) and the AVX2/AVX-512
// emulations are all exercised on an AMX machine.
//
// Tolerance: the reference holds exactly the values the kernel multiplies (the dequantized
// weight; bf16-rounded operands), so what remains is float32 accumulation, bounded as in
// gemm.test.ts by 8·u·(√k + 1) relative to S = Σ|a||b| per output (u = 2⁻²⁴).
import t, { type Test } from 'tap';
import { fileURLToPath } from 'node:url';
import { native, type QuantDType } from '../../lib/native.js';
import type { Device, Tensor } from '../../lib/tensor.js';
import { NF4_CODE, quantLayout } from '../../lib/io/bnb.js';
import { Rng } from '../../lib/rng.js';
import { eachGemmKernel } from '../support/helpers.js';
import { assertGemmClose, draw, GEMM_CHILD, gemmDevice } from './gemm-util.js';
import { bf16ToF32, f32ToBf16 } from '../support/half.js';

const f = Math.fround;
const INV127 = f(7.874015718698502e-3);

/** Float64 copy of what bitsandbytes' dequantizer gives for the blob (float32 steps, no FMA). */
export function dequantRef(dtype: QuantDType, rows: number, cols: number, blob: Uint8Array): Float64Array {
  const L = quantLayout(dtype, rows, cols);
  const dv = new DataView(blob.buffer, blob.byteOffset, blob.byteLength);
  const n = rows * cols;
  const out = new Float64Array(n);
  if (dtype === 'int8') {
    for (let i = 0; i < n; i++) {
      const cb = dv.getInt8(i);
      out[i] = f(f(cb * dv.getFloat32(L.absmax + 4 * Math.floor(i / cols), true)) * INV127);
    }
    return out;
  }
  const scale = (b: number) => {
    if (dtype === 'nf4') return dv.getFloat32(L.absmax + 4 * b, true);
    const code = dv.getFloat32(L.code + 4 * blob[L.absmax + b]!, true);
    const nested = dv.getFloat32(L.nested + 4 * Math.floor(b / 256), true);
    return f(f(code * nested) + dv.getFloat32(L.offset, true));
  };
  for (let i = 0; i < n; i++) {
    const byte = blob[i >> 1]!;
    out[i] = f(NF4_CODE[i & 1 ? byte & 15 : byte >> 4]! * scale(Math.floor(i / 64)));
  }
  return out;
}

const roundBf16 = (x: ArrayLike<number>) => Float64Array.from(x, (v) => bf16ToF32(f32ToBf16(v)));

type WKind = 'f32' | 'bf16' | QuantDType;

/** A weight [n, k] of the kind asked, and the exact values the kernel sees. */
async function makeWeight(
  t: Test,
  d: Device,
  kind: WKind,
  n: number,
  k: number,
  x: Float32Array,
): Promise<{ w: Tensor; values: Float64Array }> {
  if (kind === 'f32') return { w: d.fromArray('f32', [n, k], x), values: Float64Array.from(x) };
  if (kind === 'bf16') {
    const bits = Uint16Array.from(x, (v) => f32ToBf16(v));
    return { w: d.fromArray('bf16', [n, k], bits), values: Float64Array.from(bits, bf16ToF32) };
  }
  const src = d.fromArray('f32', [n, k], x);
  const w = d.alloc(kind, [n, k]);
  await d.run([{ op: 'quantize', dst: w, src }]);
  src.free();
  const blob = w.read() as Uint8Array;
  t.equal(
    blob.length,
    quantLayout(kind, n, k).bytes,
    `${kind} [${n}, ${k}]: the native blob has the layout lib/io/bnb.ts computes`,
  );
  return { w, values: dequantRef(kind, n, k, blob) };
}

/** want[i, j] = Σ_p a[i, p]·b(p, j) and its magnitude S in float64. */
function ref(m: number, n: number, k: number, a: ArrayLike<number>, b: (p: number, j: number) => number) {
  const want = new Float64Array(m * n);
  const scale = new Float64Array(m * n);
  for (let i = 0; i < m; i++)
    for (let j = 0; j < n; j++) {
      let s = 0;
      let sa = 0;
      for (let p = 0; p < k; p++) {
        const v = a[i * k + p]! * b(p, j);
        s += v;
        sa += Math.abs(v);
      }
      want[i * n + j] = s;
      scale[i * n + j] = sa;
    }
  return { want, scale };
}

/** linear_forward and linear_backward on one weight, checked against float64. */
async function checkLinear(
  t: Test,
  kind: WKind,
  bf16: boolean,
  m: number,
  n: number,
  k: number,
  threads: number,
  seed: number,
  ranges?: [number[], number[]],
) {
  const d = gemmDevice(threads);
  const rng = new Rng(seed, 'gemm-dtypes', kind, m, n, k);
  const wx = draw(rng, n * k, 0.05, ranges?.[1]);
  const x = draw(rng, m * k, 0.05, ranges?.[0]).map((v) => v * 20);
  const dy = draw(rng, m * n, 0.05, ranges?.[0]).map((v) => v * 20);
  const { w, values } = await makeWeight(t, d, kind, n, k, wx);
  const wv = bf16 ? roundBf16(values) : values;
  const xv = bf16 ? roundBf16(x) : x;
  const dyv = bf16 ? roundBf16(dy) : dy;
  const X = d.fromArray('f32', [m, k], x);
  const Y = d.fromArray('f32', [m, n], new Float32Array(m * n).fill(NaN));
  const DY = d.fromArray('f32', [m, n], dy);
  const DX = d.fromArray('f32', [m, k], new Float32Array(m * k).fill(NaN));
  await d.run([
    { op: 'linear_forward', y: Y, x: X, w, bf16 },
    { op: 'linear_backward', dx: DX, dy: DY, w, bf16 },
  ]);
  const label = `${kind}${bf16 ? ' bf16-compute' : ''} m=${m} n=${n} k=${k} threads=${threads}${ranges ? ' extreme' : ''}`;
  assertGemmClose(
    t,
    Y.read() as Float32Array,
    ref(m, n, k, xv, (p, j) => wv[j * k + p]!),
    k,
    `${label}: Y = X·Wᵀ`,
  );
  assertGemmClose(
    t,
    DX.read() as Float32Array,
    ref(m, k, n, dyv, (p, j) => wv[p * k + j]!),
    n,
    `${label}: dX = dY·W`,
  );
  for (const x of [w, X, Y, DY, DX]) x.free();
}

t.test('the kernels this process runs', async (t) => {
  const info = native().info();
  t.match(info.cpu.gemmBf16Kernel, /bf16/, `bf16 compute runs ${info.cpu.gemmBf16Kernel}`);
  if (!process.env.MLORA_GEMM_KERNEL && !process.env.MLORA_GEMM_BF16_KERNEL && info.cpu.avx512bf16)
    t.match(
      info.cpu.gemmBf16Kernel,
      info.cpu.amxBf16 ? /^amx/ : /^avx512bf16/,
      'AVX512_BF16 machines run vdpbf16ps, AMX ones tiles',
    );
  if (process.env.MLORA_GEMM_KERNEL === 'avx2')
    t.equal(info.cpu.gemmBf16Kernel, 'avx2-6x16-bf16emu', 'forced AVX2: the emulation');
  if (process.env.MLORA_GEMM_BF16_KERNEL === 'avx512bf16')
    t.equal(info.cpu.gemmBf16Kernel, 'avx512bf16-12x32', 'forced vdpbf16ps');
  if (process.env.MLORA_GEMM_BF16_KERNEL === 'emu')
    t.equal(info.cpu.gemmBf16Kernel, 'avx512-12x32-bf16emu', 'forced AVX-512 emulation');
});

t.test(
  'dequantize op = the independent JavaScript dequantizer, bit for bit (odd sizes: blocks straddle rows)',
  async (t) => {
    const d = gemmDevice(2);
    for (const kind of ['nf4', 'nf4dq', 'int8'] as const)
      for (const [n, k] of [
        [7, 33],
        [300, 70],
        [64, 64],
      ] as const) {
        const rng = new Rng(3, 'dequant', kind, n, k);
        const { w, values } = await makeWeight(t, d, kind, n, k, draw(rng, n * k, 0.05, [1, 1e-3, 30]));
        const out = d.alloc('f32', [n, k]);
        await d.run([{ op: 'dequantize', dst: out, src: w }]);
        const got = out.read() as Float32Array;
        let bad = 0;
        for (let i = 0; i < got.length; i++) if (got[i] !== values[i]) bad++;
        t.equal(bad, 0, `${kind} [${n}, ${k}]: every element identical`);
        w.free();
        out.free();
      }
  },
);

const sizes: Array<[number, number, number]> = GEMM_CHILD
  ? [
      [5, 33, 70],
      [40, 70, 129],
    ]
  : [
      [1, 16, 64],
      [5, 33, 70],
      [13, 64, 96],
      [40, 70, 129],
      [150, 96, 320],
    ];

t.test('quantized weights: forward and backward, 1 and 2 threads', async (t) => {
  let seed = 10;
  for (const kind of ['nf4', 'nf4dq', 'int8'] as const)
    for (const [m, n, k] of sizes)
      for (const threads of [1, 2]) await checkLinear(t, kind, false, m, n, k, threads, seed++);
});

t.test('bf16 compute on f32, bf16 and quantized weights: forward and backward', async (t) => {
  let seed = 100;
  for (const kind of ['f32', 'bf16', 'nf4', 'int8'] as const)
    for (const [m, n, k] of sizes) await checkLinear(t, kind, true, m, n, k, 2, seed++);
});

t.test('extreme range: entries of size ~1e4 and ~1e-4 mixed', async (t) => {
  const ranges: [number[], number[]] = [
    [1e4, 1e-4, 1],
    [1e-4, 1e4, 3e-3],
  ];
  let seed = 200;
  for (const kind of ['nf4', 'nf4dq', 'int8', 'bf16'] as const)
    for (const bf16 of [false, true]) await checkLinear(t, kind, bf16, 37, 45, 290, 2, seed++, ranges);
});

t.test('the gemm op with bf16 compute and a transposed A (the generic pair packing)', async (t) => {
  const d = gemmDevice(2);
  const rng = new Rng(5, 'gemm-bf16-T');
  const m = 19,
    n = 40,
    k = 75;
  const a = draw(rng, k * m, 0.05);
  const b = draw(rng, k * n, 0.05);
  const A = d.fromArray('f32', [k, m], a);
  const B = d.fromArray('f32', [k, n], b);
  const C = d.alloc('f32', [m, n]);
  await d.run([{ op: 'gemm', c: C, a: A, b: B, transA: true, bf16: true }]);
  const av = roundBf16(a),
    bv = roundBf16(b);
  const at = new Float64Array(m * k);
  for (let i = 0; i < m; i++) for (let p = 0; p < k; p++) at[i * k + p] = av[p * m + i]!;
  assertGemmClose(
    t,
    C.read() as Float32Array,
    ref(m, n, k, at, (p, j) => bv[p * n + j]!),
    k,
    'C = Aᵀ·B in bf16',
  );
});

t.test('bad arguments are Errors', async (t) => {
  const d = gemmDevice(1);
  t.throws(() => d.alloc('nf4', [4, 4, 4]), /2-D weight/);
  const w = d.alloc('nf4', [4, 64]);
  t.throws(() => w.rows(0, 1), /no row views/);
  t.throws(() => w.reshape([64, 4]), /keeps its shape/);
  t.throws(() => d.fromArray('nf4', [4, 64], new Uint8Array(3)), /blob has \d+ bytes, the array has 3/);
  const x = d.alloc('f32', [4, 64]);
  const y = d.alloc('f32', [4, 63]);
  t.throws(
    () => d.runSync([{ op: 'quantize', dst: w, src: y }]),
    /quantize.*'src' has shape \[4,63\], expected \[4,64\]/,
  );
  t.throws(() => d.runSync([{ op: 'dequantize', dst: x, src: x }]), /dequantize.*'src'/);
  t.throws(() => d.runSync([{ op: 'linear_forward', y: x, x, w: d.alloc('i32', [4, 64]) }]), /'w'/);
  for (const a of [w, x, y]) a.free();
});

if (!GEMM_CHILD) {
  t.test('every micro-kernel this CPU has, forced with MLORA_GEMM_KERNEL (child processes)', (t) =>
    eachGemmKernel(t, fileURLToPath(import.meta.url), true),
  );
}
