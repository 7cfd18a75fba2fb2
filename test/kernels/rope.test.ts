// Rotary embedding (HF rotate_half convention): forward and backward against a float64
// reference, the tables against HF's formula (and RoPE scaling against the family fixtures'
// float64 frequencies), in place, thread counts, extreme range, and bad arguments.
import t from 'tap';
import { Rng } from '../../lib/rng.js';
import { readF32, type Device } from '../../lib/tensor.js';
import { readFileSync } from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import {
  ropeTables,
  ropeInvFreq,
  packedPositions,
  modelInvFreq,
  modelRopeTables,
  scaleInvFreq,
} from '../../lib/model/rope.js';
import { parseModelConfig } from '../../lib/io/hf-model.js';
import { assertClose, cpuDevice, randn } from '../support/helpers.js';

/** float64 reference: rotate each head of x[n, heads, d] by sign·angle(pos[r], i). */
function ropeRef(
  x: ArrayLike<number>,
  pos: ArrayLike<number>,
  cos: Float32Array,
  sin: Float32Array,
  n: number,
  heads: number,
  d: number,
  sign = 1,
): Float64Array {
  const half = d / 2;
  const y = new Float64Array(n * heads * d);
  for (let r = 0; r < n; r++)
    for (let h = 0; h < heads; h++)
      for (let i = 0; i < half; i++) {
        const c = cos[pos[r]! * half + i]!,
          s = sign * sin[pos[r]! * half + i]!;
        const base = (r * heads + h) * d;
        const a = x[base + i]!,
          b = x[base + i + half]!;
        y[base + i] = a * c - b * s;
        y[base + i + half] = b * c + a * s;
      }
  return y;
}

/** The cos/sin tables (theta 10000) of positions [0, maxPos) on the device, and on the host (`tab`). */
function deviceTables(dev: Device, d: number, maxPos: number) {
  const tab = ropeTables(10000, d, maxPos);
  const cos = dev.fromArray('f32', [maxPos, d / 2], tab.cos);
  return { tab, cos, sin: dev.fromArray('f32', [maxPos, d / 2], tab.sin) };
}

// Each output is a·c − b·s of two float32 products: a couple of ulps of |a| + |b|, so for
// N(0,1) inputs 2e-6 absolute (plus 1e-6 relative) is a safe bound.
const TOL = { atol: 2e-6, rtol: 1e-6 };

t.test('ropeTables follows HF: inv_freq = theta^(-2i/d), cos/sin of the float32 angle', async (t) => {
  const inv = ropeInvFreq(10000, 64);
  t.equal(inv.length, 32);
  for (let i = 0; i < 32; i++) t.ok(Math.abs(inv[i]! / Math.pow(10000, (-2 * i) / 64) - 1) < 1e-6, `inv_freq[${i}]`);
  const tab = ropeTables(500000, 16, 300);
  t.equal(tab.cos.length, 300 * 8);
  for (let i = 0; i < 8; i++) {
    t.equal(tab.cos[i], 1, 'position 0: cos = 1');
    t.equal(tab.sin[i], 0, 'position 0: sin = 0');
  }
  const p = 257,
    i = 3;
  const want = p * Math.pow(500000, (-2 * i) / 16);
  t.ok(Math.abs(tab.cos[p * 8 + i]! - Math.cos(want)) < 1e-5, 'cos at (257, 3)');
  t.ok(Math.abs(tab.sin[p * 8 + i]! - Math.sin(want)) < 1e-5, 'sin at (257, 3)');
  t.throws(() => ropeTables(10000, 15, 4), /headDim must be a positive even integer/);
  t.throws(() => ropeTables(-1, 16, 4), /theta must be a positive number/);
  t.throws(() => ropeTables(10000, 16, 0), /maxPos must be a positive integer/);
  t.same(Array.from(packedPositions([0, 3, 3, 5])), [0, 1, 2, 0, 1]);
});

for (const threads of [1, 2]) {
  for (const [heads, d, cu] of [
    [4, 16, [0, 1, 9, 40]],
    [2, 32, [0, 37]],
    [3, 64, [0, 5, 6, 70, 71]],
  ] as Array<[number, number, number[]]>) {
    t.test(
      `forward and backward vs float64: heads ${heads}, head_dim ${d}, seqs ${cu.length - 1}, ${threads} thread(s)`,
      async (t) => {
        const dev = cpuDevice(threads);
        const rng = new Rng(7, 'rope', heads, d, threads);
        const n = cu[cu.length - 1]!;
        const { tab, cos: cosT, sin: sinT } = deviceTables(dev, d, 128);
        const pos = packedPositions(cu);
        const x = randn(rng, n * heads * d);
        const dy = randn(rng, n * heads * d);
        const posT = dev.fromArray('i32', [n], pos);
        const xT = dev.fromArray('f32', [n, heads * d], x);
        const yT = dev.fromArray('f32', [n, heads * d], randn(rng, n * heads * d)); // junk: must be overwritten
        const dyT = dev.fromArray('f32', [n, heads, d], dy);
        const dxT = dev.fromArray('f32', [n, heads, d], randn(rng, n * heads * d));
        await dev.run([
          { op: 'rope_forward', y: yT, x: xT, pos: posT, cos: cosT, sin: sinT, heads },
          { op: 'rope_backward', dx: dxT, dy: dyT, pos: posT, cos: cosT, sin: sinT, heads },
        ]);
        const y = readF32(yT);
        assertClose(t, y, ropeRef(x, pos, tab.cos, tab.sin, n, heads, d), TOL, 'y');
        const dx = readF32(dxT);
        assertClose(t, dx, ropeRef(dy, pos, tab.cos, tab.sin, n, heads, d, -1), TOL, 'dx');
        // Backward is the adjoint of forward: <R x, dy> = <x, Rᵀ dy> (the exact finite-difference
        // statement for a linear map), checked in float64 on the kernel outputs.
        let lhs = 0,
          rhs = 0,
          mag = 0;
        for (let i = 0; i < x.length; i++) {
          lhs += y[i]! * dy[i]!;
          rhs += x[i]! * dx[i]!;
          mag += Math.abs(y[i]! * dy[i]!);
        }
        t.ok(Math.abs(lhs - rhs) <= 1e-5 * mag, `adjoint: <Rx,dy> ${lhs.toFixed(6)} = <x,Rᵀdy> ${rhs.toFixed(6)}`);
        // Inverse: backward of forward gives x back.
        await dev.run([{ op: 'rope_backward', dx: yT, dy: yT, pos: posT, cos: cosT, sin: sinT, heads }]);
        assertClose(t, readF32(yT), x, { atol: 4e-6, rtol: 2e-6 }, 'inverse rotation restores x');
      },
    );
  }
}

t.test('in place (y is x) equals out of place', async (t) => {
  const dev = cpuDevice(2);
  const rng = new Rng(8, 'rope-inplace');
  const n = 33,
    heads = 4,
    d = 32;
  const { cos, sin } = deviceTables(dev, d, 64);
  const pos = new Int32Array(n).map(() => rng.int(64));
  const x = randn(rng, n * heads * d);
  const p = dev.fromArray('i32', [n], pos);
  const a = dev.fromArray('f32', [n, heads * d], x);
  const b = dev.alloc('f32', [n, heads * d]);
  await dev.run([
    { op: 'rope_forward', y: b, x: a, pos: p, cos, sin, heads },
    { op: 'rope_forward', y: a, x: a, pos: p, cos, sin, heads },
  ]);
  t.same(readF32(a), readF32(b), 'bitwise equal');
});

t.test('extreme range: huge and tiny magnitudes keep their relative accuracy', async (t) => {
  const dev = cpuDevice(1);
  const rng = new Rng(9, 'rope-extreme');
  const n = 20,
    heads = 2,
    d = 16;
  const { tab, cos, sin } = deviceTables(dev, d, 4096);
  const pos = new Int32Array(n).map((_, i) => 4095 - i * 97); // large positions
  for (const mag of [1e30, 1e-30]) {
    const x = randn(rng, n * heads * d, mag);
    const y = dev.alloc('f32', [n, heads * d]);
    await dev.run([
      {
        op: 'rope_forward',
        y,
        x: dev.fromArray('f32', [n, heads * d], x),
        pos: dev.fromArray('i32', [n], pos),
        cos,
        sin,
        heads,
      },
    ]);
    const got = readF32(y);
    t.ok(got.every(Number.isFinite), `finite at ${mag}`);
    // Relative to the input scale: same ulp argument as TOL, scaled.
    assertClose(
      t,
      got,
      ropeRef(x, pos, tab.cos, tab.sin, n, heads, d),
      { atol: 2e-6 * mag, rtol: 1e-6 },
      `y at ${mag}`,
    );
  }
});

t.test('bad arguments are Errors naming the argument', async (t) => {
  const dev = cpuDevice(1);
  const rng = new Rng(10, 'rope-bad');
  const n = 4,
    heads = 2,
    d = 8;
  const { tab, cos, sin } = deviceTables(dev, d, 16);
  const x = dev.fromArray('f32', [n, heads * d], randn(rng, n * heads * d));
  const y = dev.alloc('f32', [n, heads * d]);
  const pos = dev.fromArray('i32', [n], new Int32Array([0, 1, 2, 3]));
  const ok = { op: 'rope_forward', y, x, pos, cos, sin, heads } as const;
  const big = dev.alloc('f32', [2 * n, heads * d]);
  const cases: Array<[Record<string, unknown>, RegExp]> = [
    [{ heads: 0 }, /argument 'heads' must be positive/],
    [{ heads: 3 }, /argument 'x' has shape \[4,16\], expected \[4,24\]/],
    [{ pos: dev.fromArray('f32', [n], new Float32Array(n)) }, /argument 'pos' has dtype f32, expected i32/],
    [{ pos: dev.fromArray('i32', [n + 1], new Int32Array(n + 1)) }, /argument 'x' has shape/],
    [
      { sin: dev.fromArray('f32', [8, d / 2], tab.sin.subarray(0, (8 * d) / 2)) },
      /argument 'sin' has shape \[8,4\], expected \[16,4\]/,
    ],
    [{ cos: dev.fromArray('f32', [(16 * d) / 2], tab.cos) }, /argument 'cos' must be 2-D/],
    [{ y: dev.alloc('f32', [n, heads * d - 1]) }, /argument 'y' has/],
    [{ x: dev.alloc('f32', [n * heads * d]) }, /argument 'x' must be \[n, heads·head_dim\]/],
    [{ y: big.rows(0, n), x: big.rows(1, n + 1) }, /arguments 'y' and 'x' overlap/],
    [
      { pos: dev.fromArray('i32', [n], new Int32Array([0, 1, 16, 2])) },
      /argument 'pos': position 16 at row 2 is outside the cos\/sin table \[0, 16\)/,
    ],
    [{ pos: dev.fromArray('i32', [n], new Int32Array([0, -1, 2, 3])) }, /argument 'pos': position -1 at row 1/],
  ];
  for (const [patch, re] of cases) {
    const op = { ...ok, ...patch };
    t.throws(() => dev.runSync([op as never]), re, String(re));
    await t.rejects(async () => dev.run([op as never]), re); // parse errors throw synchronously inside run()
  }
  await t.rejects(
    async () => dev.run([{ op: 'rope_backward', dx: y, dy: x, pos, cos, sin } as never]),
    /op 0 \(rope_backward\): argument 'heads' must be a number/,
  );
});

t.test('RoPE scaling: the inverse frequencies of every family fixture (llama3 bands, qwen theta 1e6)', async (t) => {
  const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../../../test/fixtures/families');
  for (const fam of ['llama3-scaled', 'qwen2', 'qwen3', 'mistral-window']) {
    const want = (JSON.parse(readFileSync(path.join(root, fam, 'ref.json'), 'utf8')) as { rope_inv_freq: number[] })
      .rope_inv_freq;
    const configs = [path.join(root, fam, 'model/config.json')];
    if (fam === 'llama3-scaled') configs.push(path.join(root, fam, 'config.rope_parameters.json'));
    for (const file of configs) {
      const c = parseModelConfig(JSON.parse(readFileSync(file, 'utf8')), file);
      // float32 frequencies (as torch keeps them) vs float64: theta^(-2i/d) carries ~2e-7 of
      // float32 rounding, which the llama3 blend (quadratic in f) about doubles
      assertClose(t, modelInvFreq(c), want, { atol: 0, rtol: 1e-6 }, `${fam}: ${path.basename(file)}`);
    }
  }
  const base = ropeInvFreq(10000, 8);
  t.same(
    Array.from(scaleInvFreq(base, { type: 'linear', factor: 4 })),
    Array.from(base, (f) => Math.fround(f / 4)),
    'linear: f / factor',
  );
  t.equal(
    scaleInvFreq(base, { type: 'dynamic', factor: 4 }),
    base,
    'dynamic: the plain frequencies below max_position_embeddings',
  );
  // llama3 with theta 10000, d 8, N 64: wavelengths 6.3, 63, 628, 6283 → kept, blended, divided, divided
  const l3 = scaleInvFreq(base, {
    type: 'llama3',
    factor: 8,
    lowFreqFactor: 1,
    highFreqFactor: 4,
    originalMaxPositionEmbeddings: 64,
  });
  const s = (64 / ((2 * Math.PI) / base[1]!) - 1) / 3;
  assertClose(
    t,
    l3,
    [base[0]!, ((1 - s) * base[1]!) / 8 + s * base[1]!, base[2]! / 8, base[3]! / 8],
    { atol: 0, rtol: 1e-7 },
    'llama3: the three bands',
  );
  const tab = modelRopeTables({
    ropeTheta: 10000,
    headDim: 8,
    ropeScaling: { type: 'linear', factor: 2 },
    maxPositionEmbeddings: 10,
  });
  t.equal(
    tab.cos[9 * 4 + 1],
    Math.fround(Math.cos(Math.fround(9 * Math.fround(base[1]! / 2)))),
    'tables use the scaled frequencies',
  );
});
