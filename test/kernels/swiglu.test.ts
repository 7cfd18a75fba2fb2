// SwiGLU: h = silu(gate)·up; backward dgate, dup (=). Float64 reference, finite differences on
// the reference, extreme gates (where σ saturates and exp overflows), in-place variants.
import t from 'tap';
import { Rng } from '../../lib/rng.js';
import { assertClose, cpuDevice, randn } from '../support/helpers.js';
import { assertBitwise, dot, eachSimdKernel, expectRefused, f32, finiteDiff, read } from './util.js';

const d = cpuDevice(2);

const sig = (g: number) => 1 / (1 + Math.exp(-g));
const fwdRef = (g: ArrayLike<number>, u: ArrayLike<number>) => Float64Array.from(g, (gi, i) => gi * sig(gi) * u[i]!);
function bwdRef(dh: ArrayLike<number>, g: ArrayLike<number>, u: ArrayLike<number>) {
  const dgate = new Float64Array(g.length),
    dup = new Float64Array(g.length);
  for (let i = 0; i < g.length; i++) {
    const s = sig(g[i]!);
    dup[i] = dh[i]! * g[i]! * s;
    dgate[i] = dh[i]! * u[i]! * s * (1 + g[i]! * (1 - s));
  }
  return { dgate, dup };
}

/** Forward and backward on the device (outputs out of place): h, dgate, dup. */
async function swiglu(g: Float32Array, u: Float32Array, dh: Float32Array) {
  const n = g.length;
  const gt = f32(d, [n], g),
    ut = f32(d, [n], u);
  const h = d.alloc('f32', [n]),
    dgate = d.alloc('f32', [n]),
    dup = d.alloc('f32', [n]);
  await d.run([
    { op: 'swiglu_forward', h, gate: gt, up: ut },
    { op: 'swiglu_backward', dgate, dup, dh: f32(d, [n], dh), gate: gt, up: ut },
  ]);
  return { h: read(h), dgate: read(dgate), dup: read(dup) };
}

// A few float roundings plus exp_approx (≈2e-7 relative) on O(1..10) values; atol covers
// dgate's zero crossing near g ≈ -1.28 where 1 + g(1-σ) cancels.
const TOL = { atol: 2e-6, rtol: 1e-5 };

// The loops are compiled for AVX-512, AVX2 and baseline and picked per call (MLORA_GEMM_KERNEL
// forces one): every path this CPU has is checked.
eachSimdKernel('forward and backward vs float64', async (t) => {
  const rng = new Rng(20, 'swiglu');
  const n = 40000; // spans several pool chunks
  const g = randn(rng, n, 3),
    u = randn(rng, n, 2),
    dh = randn(rng, n);
  const got = await swiglu(g, u, dh);
  assertClose(t, got.h, fwdRef(g, u), TOL, 'h');
  const ref = bwdRef(dh, g, u);
  assertClose(t, got.dgate, ref.dgate, TOL, 'dgate');
  assertClose(t, got.dup, ref.dup, TOL, 'dup');
});

eachSimdKernel('extreme gates: saturated sigmoid, overflowing exp', async (t) => {
  const rng = new Rng(26, 'swiglu-extreme-gates');
  const g = Float32Array.from([
    -1e37, -1e4, -200, -88.8, -87.5, -30, -1e-30, 0.5, 1e-30, 30, 87.5, 88.8, 200, 1e4, 1e37,
  ]);
  const u = randn(rng, g.length),
    dh = randn(rng, g.length);
  const out = await swiglu(g, u, dh);
  const ref = bwdRef(dh, g, u);
  // |u|, |dh| ~ 1: where σ underflows (g < -87) the exact values are < 1e-36, so atol 1e-30 is
  // meaningful; elsewhere relative error of a few float roundings.
  const tol = { atol: 1e-30, rtol: 1e-5 };
  for (const [name, got, want] of [
    ['h', out.h, fwdRef(g, u)],
    ['dgate', out.dgate, ref.dgate],
    ['dup', out.dup, ref.dup],
  ] as const) {
    t.ok(got.every(Number.isFinite), `${name}: all finite (no NaN from inf·0)`);
    assertClose(t, got, want, tol, `${name} at extreme gates`);
  }
});

t.test('huge dh and up with ordinary gates: no intermediate overflow', async (t) => {
  const g = Float32Array.from([0.5, -0.3, 2, -3, 1.7, -6]);
  const u = Float32Array.from([1e30, -1e30, 1e-30, 2e19, -1, 3]);
  const dh = Float32Array.from([1e-6, 1e-6, 1e30, -1e19, 1e35, -2e37]);
  const got = await swiglu(g, u, dh);
  const ref = bwdRef(dh, g, u);
  const tol = { atol: 0, rtol: 1e-5 }; // every value is representable; only relative rounding
  assertClose(t, got.h, fwdRef(g, u), tol, 'h');
  assertClose(t, got.dgate, ref.dgate, tol, 'dgate');
  assertClose(t, got.dup, ref.dup, tol, 'dup');
});

t.test('the reference gradient agrees with finite differences', async (t) => {
  const rng = new Rng(21, 'swiglu-fd');
  const n = 12,
    g = randn(rng, n, 2),
    u = randn(rng, n),
    c = randn(rng, n);
  const ref = bwdRef(c, g, u);
  assertClose(
    t,
    ref.dgate,
    finiteDiff((gg) => dot(c, fwdRef(gg, u)), g),
    { atol: 1e-8, rtol: 1e-6 },
    'dgate',
  );
  assertClose(
    t,
    ref.dup,
    finiteDiff((uu) => dot(c, fwdRef(g, uu)), u),
    { atol: 1e-8, rtol: 1e-6 },
    'dup',
  );
});

t.test('in place: h over gate; dgate over gate and dup over up', async (t) => {
  const rng = new Rng(22, 'swiglu-inplace');
  const n = 1000,
    g = randn(rng, n, 2),
    u = randn(rng, n),
    dh = randn(rng, n);
  const h = d.alloc('f32', [n]),
    dgate = d.alloc('f32', [n]),
    dup = d.alloc('f32', [n]);
  const dht = f32(d, [n], dh);
  d.runSync([
    { op: 'swiglu_forward', h, gate: f32(d, [n], g), up: f32(d, [n], u) },
    { op: 'swiglu_backward', dgate, dup, dh: dht, gate: f32(d, [n], g), up: f32(d, [n], u) },
  ]);
  const gt = f32(d, [n], g);
  d.runSync([{ op: 'swiglu_forward', h: gt, gate: gt, up: f32(d, [n], u) }]);
  assertBitwise(t, read(gt), read(h), 'h in place equals out of place');
  const g2 = f32(d, [n], g),
    u2 = f32(d, [n], u);
  d.runSync([{ op: 'swiglu_backward', dgate: g2, dup: u2, dh: dht, gate: g2, up: u2 }]);
  assertBitwise(t, read(g2), read(dgate), 'dgate in place');
  assertBitwise(t, read(u2), read(dup), 'dup in place');
});

t.test('bad arguments are Errors naming the argument', async (t) => {
  const a = f32(d, [8], randn(new Rng(23), 8)),
    b = f32(d, [8], randn(new Rng(24), 8));
  const big = f32(d, [2, 8], randn(new Rng(25), 16));
  await expectRefused(
    t,
    d,
    [{ op: 'swiglu_forward', h: d.alloc('f32', [8]), gate: a, up: d.alloc('f32', [7]) }],
    /argument 'up' has 7 elements/,
  );
  await expectRefused(
    t,
    d,
    [{ op: 'swiglu_forward', h: d.alloc('i32', [8]), gate: a, up: b }],
    /argument 'h' has dtype i32/,
  );
  await expectRefused(
    t,
    d,
    [{ op: 'swiglu_forward', h: big.reshape([16]).rows(4, 12), gate: big.reshape([16]).rows(0, 8), up: b }],
    /'h' and 'gate' overlap/,
  );
  await expectRefused(
    t,
    d,
    [{ op: 'swiglu_backward', dgate: a, dup: a, dh: b, gate: d.alloc('f32', [8]), up: d.alloc('f32', [8]) }],
    /'dgate' and 'dup' overlap/,
  );
  await expectRefused(
    t,
    d,
    [{ op: 'swiglu_backward', dgate: a, dup: b, dh: d.alloc('f32', [9]), gate: a, up: b }],
    /argument 'dh' has 9 elements/,
  );
});
