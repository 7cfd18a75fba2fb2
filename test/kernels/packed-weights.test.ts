// Frozen weights packed once (Device.packWeights): linear_forward and linear_backward then read
// the weight's GEMM panels instead of packing it on every call. The panels are the very operand
// the GEMM packs per call (same layout, same blocking), so every result must be bitwise equal to
// the unpacked weight's: forward and backward, with and without accumulate, with the LoRA
// segments fused into the GEMM, for f32, f16, bf16 and quantized weights, bf16 compute, 1 and 2
// threads, and sizes with several K and N blocks and partial micro-tiles. One case is also held
// against a float64 reference, so the two paths cannot agree on a wrong answer. Every
// micro-kernel this CPU has runs in a child process (MLORA_GEMM_KERNEL, MLORA_GEMM_BF16_KERNEL).
import t, { type Test } from 'tap';
import { fileURLToPath } from 'node:url';
import { native, type DType, type Op } from '../../lib/native.js';
import type { Device, Tensor } from '../../lib/tensor.js';
import { Rng } from '../../lib/rng.js';
import { cpuDevice, eachGemmKernel, randn } from '../support/helpers.js';
import { assertGemmClose, GEMM_CHILD, gemmDevice } from './gemm-util.js';
import { f32ToBf16 } from '../support/half.js';

const rng = new Rng(20261202);

/** A weight [out, in] of the storage asked, from fresh random f32 values. */
async function weight(d: Device, dtype: DType | 'nf4' | 'int8', out: number, inp: number): Promise<Tensor> {
  const v = randn(rng, out * inp, 0.5);
  if (dtype === 'f32') return d.fromArray('f32', [out, inp], v);
  if (dtype === 'bf16') return d.fromArray('bf16', [out, inp], Uint16Array.from(v, f32ToBf16));
  const src = d.fromArray('f32', [out, inp], v);
  try {
    if (dtype === 'f16') {
      const w = d.alloc('f16', [out, inp]);
      await d.run([{ op: 'copy', y: w, x: src }]);
      return w;
    }
    const w = d.alloc(dtype, [out, inp]);
    await d.run([{ op: 'quantize', dst: w, src }]);
    return w;
  } finally {
    src.free();
  }
}

interface Case {
  out: number;
  inp: number;
  m: number;
  dtype: DType | 'nf4' | 'int8';
  bf16?: boolean;
}

/** The forward and backward ops of one case on `w` (plain, accumulate, and with LoRA segments). */
function caseOps(d: Device, c: Case, w: Tensor, r0: Rng): { ops: Op[]; outputs: Tensor[]; free: () => void } {
  const { out, inp, m } = c;
  const t = (shape: number[], std = 1) =>
    d.fromArray(
      'f32',
      shape,
      randn(
        r0,
        shape.reduce((a, b) => a * b),
        std,
      ),
    );
  const x = t([m, inp]);
  const dy = t([m, out]);
  const y = d.alloc('f32', [m, out]);
  const yAcc = t([m, out]);
  const dx = d.alloc('f32', [m, inp]);
  const dxAcc = t([m, inp]);
  const r = 4;
  const split = Math.floor(m / 3);
  const lora = [0, 1].map(() => ({
    a: t([r, inp], 0.3),
    b: t([out, r], 0.3),
    da: d.alloc('f32', [r, inp]),
    db: d.alloc('f32', [out, r]),
  }));
  const xa = [d.alloc('f32', [split, r]), d.alloc('f32', [m - split, r])];
  const segments = (grads: boolean) =>
    lora.map((l, i) => ({
      rowStart: i === 0 ? 0 : split,
      rowEnd: i === 0 ? split : m,
      a: l.a,
      b: l.b,
      scale: 0.75,
      xa: xa[i]!,
      ...(grads ? { da: l.da, db: l.db } : {}),
    }));
  const yL = d.alloc('f32', [m, out]);
  const dxL = d.alloc('f32', [m, inp]);
  const bf16 = !!c.bf16;
  const ops: Op[] = [
    { op: 'linear_forward', y, x, w, bf16 },
    { op: 'linear_forward', y: yAcc, x, w, bf16, accumulate: true },
    { op: 'linear_backward', dx, dy, w, bf16 },
    { op: 'linear_backward', dx: dxAcc, dy, w, bf16, accumulate: true },
    { op: 'linear_forward', y: yL, x, w, bf16, segments: segments(false) },
    { op: 'linear_backward', dx: dxL, dy, w, bf16, x, segments: segments(true) },
  ];
  const all = [x, dy, y, yAcc, dx, dxAcc, yL, dxL, ...xa, ...lora.flatMap((l) => [l.a, l.b, l.da, l.db])];
  return {
    ops,
    outputs: [y, yAcc, dx, dxAcc, yL, dxL, ...lora.flatMap((l) => [l.da, l.db])],
    free: () => all.forEach((a) => a.free()),
  };
}

/** Runs the case's ops before and after packing the weight: every output bitwise the same. */
async function samePacked(t: Test, threads: number, c: Case): Promise<void> {
  const d = gemmDevice(threads);
  const start = d.memory().used;
  const w = await weight(d, c.dtype, c.out, c.inp);
  const label = `[${c.out}, ${c.inp}] ${c.dtype}${c.bf16 ? ' bf16 compute' : ''}, m ${c.m}, ${threads} thread(s)`;
  const seed = rng.int(1 << 30);
  const run = async () => {
    const k = caseOps(d, c, w, new Rng(seed)); // the same operands both times
    await d.run(k.ops);
    const got = k.outputs.map((o) => o.read() as Float32Array);
    k.free();
    return got;
  };
  const before = native().gemmPackedBWords();
  const plain = await run();
  t.ok(native().gemmPackedBWords() > before, `${label}: unpacked, the GEMMs pack per call`);
  const used = d.memory().used;
  const bytes = await d.packWeights([w], { bf16: c.bf16 });
  t.equal(bytes, native().gemmPanelBytes(c.out, c.inp, c.bf16), `${label}: packWeights took gemmPanelBytes`);
  t.equal(d.memory().used - used, bytes, `${label}: the panels are counted against the device`);
  const words = native().gemmPackedBWords();
  const packed = await run();
  t.equal(native().gemmPackedBWords(), words, `${label}: the GEMMs read the panels, packing nothing per call`);
  const names = ['y', 'y (accumulate)', 'dx', 'dx (accumulate)', 'y with LoRA', 'dx with LoRA', 'dA', 'dB', 'dA', 'dB'];
  const differing = packed
    .map((p, i) => (Buffer.compare(Buffer.from(p.buffer), Buffer.from(plain[i]!.buffer)) === 0 ? null : names[i]))
    .filter((n) => n);
  t.same(differing, [], `${label}: packed and per-call packing give the same bits`);
  w.free();
  t.equal(d.memory().used, start, `${label}: freeing the weight frees its panels`);
}

// Several N blocks (out > the widest NC, 4096) and K blocks (in > KC) forward, many K blocks
// backward; odd sizes leave partial micro-tiles and slivers.
const BIG: Case = { out: 4130, inp: 600, m: 29, dtype: 'f32' };
const CASES: Case[] = GEMM_CHILD
  ? [
      BIG,
      { out: 70, inp: 1100, m: 300, dtype: 'f32' },
      { out: 90, inp: 130, m: 37, dtype: 'f32', bf16: true },
      { out: 64, inp: 520, m: 50, dtype: 'bf16', bf16: true },
      { out: 33, inp: 200, m: 13, dtype: 'bf16' },
    ]
  : [
      BIG,
      { out: 70, inp: 1100, m: 300, dtype: 'f32' },
      { out: 1, inp: 1, m: 3, dtype: 'f32' },
      { out: 90, inp: 130, m: 37, dtype: 'f32', bf16: true },
      { out: 64, inp: 520, m: 50, dtype: 'bf16', bf16: true },
      { out: 33, inp: 200, m: 13, dtype: 'bf16' },
      { out: 40, inp: 72, m: 9, dtype: 'f16' },
      { out: 48, inp: 128, m: 20, dtype: 'nf4' },
      { out: 24, inp: 96, m: 31, dtype: 'int8' },
    ];

for (const threads of [1, 2])
  t.test(`packed weights compute the same bits (${threads} thread(s))`, async (t) => {
    for (const c of CASES) await samePacked(t, threads, c);
  });

t.test('the packed forward against a float64 reference', async (t) => {
  const d = gemmDevice(2);
  const { out, inp, m } = BIG;
  const wv = randn(rng, out * inp, 0.5);
  const xv = randn(rng, m * inp, 1);
  const w = d.fromArray('f32', [out, inp], wv);
  const x = d.fromArray('f32', [m, inp], xv);
  const y = d.alloc('f32', [m, out]);
  await d.packWeights([w]);
  await d.run([{ op: 'linear_forward', y, x, w }]);
  const want = new Float64Array(m * out);
  const scale = new Float64Array(m * out);
  for (let i = 0; i < m; i++)
    for (let j = 0; j < out; j++) {
      let s = 0,
        a = 0;
      for (let p = 0; p < inp; p++) {
        const v = xv[i * inp + p]! * wv[j * inp + p]!;
        s += v;
        a += Math.abs(v);
      }
      want[i * out + j] = s;
      scale[i * out + j] = a;
    }
  assertGemmClose(t, y.read() as Float32Array, { want, scale }, inp, 'y = x·Wᵀ from the panels');
  for (const a of [w, x, y]) a.free();
});

t.test('packWeights: the same weight twice, and a view of another shape', async (t) => {
  const d = gemmDevice(1);
  const w = await weight(d, 'f32', 64, 32);
  const first = await d.packWeights([w, w]);
  t.equal(first, native().gemmPanelBytes(64, 32), 'a weight listed twice is packed once');
  t.equal(await d.packWeights([w]), 0, 'packing again takes nothing');
  t.equal(await d.packWeights([w], { bf16: true }), native().gemmPanelBytes(64, 32, true), 'bf16 compute: its own');
  // a view with another shape has no panels: its ops pack per call, and still compute right
  const v = w.rows(0, 16);
  const x = d.fromArray('f32', [3, 32], randn(rng, 96, 1));
  const yv = d.alloc('f32', [3, 16]);
  const yw = d.alloc('f32', [3, 64]);
  await d.run([
    { op: 'linear_forward', y: yv, x, w: v },
    { op: 'linear_forward', y: yw, x, w },
  ]);
  const a = yv.read() as Float32Array,
    b = yw.read() as Float32Array;
  let same = true;
  for (let i = 0; i < 3; i++) for (let j = 0; j < 16; j++) same &&= a[i * 16 + j] === b[i * 64 + j];
  t.ok(same, 'the rows view (per-call packing) and the packed whole agree on its rows');
  for (const q of [w, x, yv, yw]) q.free();
});

t.test('packWeights: bad arguments are clear Errors, and a packed weight is read-only', async (t) => {
  const d = gemmDevice(1);
  const w = d.fromArray('f32', [8, 4], new Float32Array(32));
  const other = cpuDevice(1, 2 ** 20);
  const elsewhere = other.alloc('f32', [8, 4]);
  t.throws(() => d.packWeights('w' as unknown as Tensor[]), /weights must be an array of Tensors/);
  t.throws(() => d.packWeights([{} as Tensor]), /weights\[0\] is not a Tensor/);
  t.throws(() => d.packWeights([d.alloc('f32', [32])]), /weights\[0\] must be a 2-D weight \[out, in\], got \[32\]/);
  t.throws(() => d.packWeights([w, d.alloc('i32', [2, 2])]), /weights\[1\] is i32, not a weight/);
  t.throws(() => d.packWeights([elsewhere]), /weights\[0\] is on cpu:\d+, not cpu:\d+/);
  const freed = d.alloc('f32', [2, 2]);
  freed.free();
  t.throws(() => d.packWeights([freed]), /weights\[0\] has been freed/);
  const small = cpuDevice(1, 4096);
  const big = small.alloc('f32', [16, 32]);
  const before = small.memory().used;
  t.throws(() => small.packWeights([big]), { code: 'ERR_MLORA_OOM' }, 'out of budget: an OOM Error');
  t.equal(small.memory().used, before, 'nothing is kept of a refused packing');
  await d.packWeights([w]);
  t.throws(() => w.write(new Float32Array(32)), /frozen: Device.packWeights packed it/);
  for (const a of [w, elsewhere, big]) a.free();
});

if (!GEMM_CHILD) {
  t.test('every micro-kernel this CPU has, forced with MLORA_GEMM_KERNEL (child processes)', (t) =>
    eachGemmKernel(t, fileURLToPath(import.meta.url), true),
  );
}
