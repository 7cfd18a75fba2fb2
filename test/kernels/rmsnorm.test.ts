// RMSNorm (LLaMA): forward y = x·rstd·w with rstd saved, backward dx (= or +=) and dw (+=),
// against a float64 reference, with finite differences validating the reference's gradient.
import t from 'tap';
import { Rng } from '../../lib/rng.js';
import { assertClose, cpuDevice, randn } from '../support/helpers.js';
import { dot, eachSimdKernel, expectRefused, f32, finiteDiff, read, stored } from './util.js';

const d = cpuDevice(2);

function fwdRef(x: ArrayLike<number>, w: ArrayLike<number>, n: number, h: number, eps: number) {
  const y = new Float64Array(n * h),
    rstd = new Float64Array(n);
  for (let i = 0; i < n; i++) {
    let ss = 0;
    for (let j = 0; j < h; j++) ss += x[i * h + j]! ** 2;
    rstd[i] = 1 / Math.sqrt(ss / h + eps);
    for (let j = 0; j < h; j++) y[i * h + j] = x[i * h + j]! * rstd[i]! * w[j]!;
  }
  return { y, rstd };
}

function bwdRef(dy: ArrayLike<number>, x: ArrayLike<number>, w: ArrayLike<number>, n: number, h: number, eps: number) {
  const { rstd } = fwdRef(x, w, n, h, eps);
  const dx = new Float64Array(n * h),
    dw = new Float64Array(h);
  for (let i = 0; i < n; i++) {
    const r = rstd[i]!;
    let c = 0;
    for (let j = 0; j < h; j++) c += dy[i * h + j]! * w[j]! * x[i * h + j]!;
    c /= h;
    for (let j = 0; j < h; j++) {
      dx[i * h + j] = r * w[j]! * dy[i * h + j]! - r ** 3 * x[i * h + j]! * c;
      dw[j]! += dy[i * h + j]! * x[i * h + j]! * r;
    }
  }
  return { dx, dw };
}

/** A norm weight 1 + N(0, std²) of `h` elements stored as `dtype`, and the values it holds. */
const normWeight = (rng: Rng, dtype: 'f32' | 'bf16' | 'f16', h: number, std: number) =>
  stored(
    d,
    dtype,
    [h],
    randn(rng, h, std).map((v) => 1 + v),
  );

// y and dx are a handful of float roundings of O(|x|·rstd·|w|) values (rstd in double): a few ulps.
const TOL = { atol: 1e-6, rtol: 2e-5 };

eachSimdKernel('forward vs float64 for f32, bf16 and f16 weights', async (t) => {
  const rng = new Rng(10, 'rmsnorm-forward');
  const n = 33,
    h = 96,
    eps = 1e-5;
  const x = randn(rng, n * h, 1.5);
  for (const dtype of ['f32', 'bf16', 'f16'] as const) {
    const { tensor: w, values: wv } = normWeight(rng, dtype, h, 0.5);
    const y = d.alloc('f32', [n, h]),
      rstd = d.alloc('f32', [n]);
    await d.run([{ op: 'rmsnorm_forward', y, rstd, x: f32(d, [n, h], x), w, eps }]);
    const ref = fwdRef(x, wv, n, h, eps);
    assertClose(t, read(y), ref.y, TOL, `${dtype} w: y`);
    assertClose(t, read(rstd), ref.rstd, { atol: 0, rtol: 1e-6 }, `${dtype} w: rstd (one rounding of a double)`);
  }
});

eachSimdKernel('forward at extreme magnitudes (sums of squares past the float range) and in place', async (t) => {
  const rng = new Rng(11, 'rmsnorm-extreme');
  const n = 4,
    h = 96;
  // Rows at 3e18 (Σx² ≈ 8e38 would overflow a float accumulator), 1e-18 (eps dominates) and mixed.
  const x = randn(rng, n * h).map((v, i) => {
    const row = Math.floor(i / h);
    return row === 0 ? v * 3e18 : row === 1 ? v * 1e-18 : row === 2 ? v * (i % 2 ? 1e10 : 1e-10) : v;
  });
  const w = randn(rng, h);
  const ref = fwdRef(x, w, n, h, 1e-6);
  const xt = f32(d, [n, h], x),
    rstd = d.alloc('f32', [n]);
  d.runSync([{ op: 'rmsnorm_forward', y: xt, rstd, x: xt, w: f32(d, [h], w), eps: 1e-6 }]); // in place
  const got = read(xt);
  t.ok(got.every(Number.isFinite), 'all finite');
  assertClose(t, got, ref.y, TOL, 'y (in place over x)');
  assertClose(t, read(rstd), ref.rstd, { atol: 0, rtol: 1e-6 }, 'rstd');
});

eachSimdKernel('backward vs float64: dx written or accumulated, dw accumulated, bf16 w', async (t) => {
  const rng = new Rng(12, 'rmsnorm-backward');
  const n = 37,
    h = 80,
    eps = 1e-6;
  const x = randn(rng, n * h, 2);
  const dy = randn(rng, n * h);
  for (const dtype of ['f32', 'bf16'] as const) {
    const { tensor: w, values: wv } = normWeight(rng, dtype, h, 0.3);
    const xt = f32(d, [n, h], x),
      y = d.alloc('f32', [n, h]),
      rstd = d.alloc('f32', [n]);
    d.runSync([{ op: 'rmsnorm_forward', y, rstd, x: xt, w, eps }]);
    const ref = bwdRef(dy, x, wv, n, h, eps);
    const dx0 = randn(rng, n * h),
      dw0 = randn(rng, h);
    const dx = f32(d, [n, h], dx0),
      dw = f32(d, [h], dw0);
    const dyt = f32(d, [n, h], dy);
    await d.run([{ op: 'rmsnorm_backward', dx, dy: dyt, x: xt, w, rstd, dw }]);
    assertClose(t, read(dx), ref.dx, TOL, `${dtype}: dx (=)`);
    // dw sums n terms: float error ~ n·ulp of the partial sums
    assertClose(
      t,
      read(dw),
      ref.dw.map((v, j) => v + dw0[j]!),
      { atol: 2e-5, rtol: 2e-5 },
      `${dtype}: dw (+=)`,
    );
    const dwBefore = read(dw);
    const dxAcc = f32(d, [n, h], dx0);
    await d.run([{ op: 'rmsnorm_backward', dx: dxAcc, dy: dyt, x: xt, w, rstd, accumulate: true }]);
    assertClose(
      t,
      read(dxAcc),
      ref.dx.map((v, i) => v + dx0[i]!),
      TOL,
      `${dtype}: dx (+= with accumulate)`,
    );
    t.same(read(dw), dwBefore, 'dw left alone when not passed');
  }
});

t.test('the reference gradient agrees with finite differences', async (t) => {
  const rng = new Rng(13, 'rmsnorm-fd');
  const n = 3,
    h = 7,
    eps = 1e-5;
  const x = randn(rng, n * h),
    w = randn(rng, h),
    c = randn(rng, n * h);
  const ref = bwdRef(c, x, w, n, h, eps);
  // L = Σ c·y in float64: central differences with h=1e-6 are accurate to ~1e-9
  assertClose(
    t,
    ref.dx,
    finiteDiff((xx) => dot(c, fwdRef(xx, w, n, h, eps).y), x),
    { atol: 1e-7, rtol: 1e-6 },
    'dx',
  );
  assertClose(
    t,
    ref.dw,
    finiteDiff((ww) => dot(c, fwdRef(x, ww, n, h, eps).y), w),
    { atol: 1e-7, rtol: 1e-6 },
    'dw',
  );
  // and the kernel agrees with that reference on the same small case
  const xt = f32(d, [n, h], x),
    wt = f32(d, [h], w),
    y = d.alloc('f32', [n, h]),
    rstd = d.alloc('f32', [n]);
  const dx = d.alloc('f32', [n, h]),
    dw = d.alloc('f32', [h], { zero: true });
  d.runSync([
    { op: 'rmsnorm_forward', y, rstd, x: xt, w: wt, eps },
    { op: 'rmsnorm_backward', dx, dy: f32(d, [n, h], c), x: xt, w: wt, rstd, dw },
  ]);
  assertClose(t, read(dx), ref.dx, TOL, 'kernel dx');
  assertClose(t, read(dw), ref.dw, TOL, 'kernel dw');
});

t.test('bad arguments are Errors naming the argument', async (t) => {
  const x = f32(d, [4, 8], randn(new Rng(14), 32)),
    w = f32(d, [8], randn(new Rng(15), 8));
  const y = d.alloc('f32', [4, 8]),
    rstd = d.alloc('f32', [4]);
  await expectRefused(
    t,
    d,
    [{ op: 'rmsnorm_forward', y, rstd, x, w: f32(d, [2, 4], new Float32Array(8).fill(1)), eps: 1e-5 }],
    /argument 'w' must be 1-D/,
  );
  await expectRefused(
    t,
    d,
    [{ op: 'rmsnorm_forward', y, rstd: d.alloc('f32', [3]), x, w, eps: 1e-5 }],
    /argument 'rstd' has 3 elements/,
  );
  await expectRefused(
    t,
    d,
    [{ op: 'rmsnorm_forward', y, rstd, x: f32(d, [8, 4], new Float32Array(32).fill(1)), w, eps: 1e-5 }],
    /argument 'x' has shape \[8,4\], expected \[\*,8\]/,
  );
  await expectRefused(t, d, [{ op: 'rmsnorm_forward', y, rstd, x, w, eps: -1 }], /argument 'eps' must be >= 0/);
  await expectRefused(t, d, [{ op: 'rmsnorm_forward', y, rstd, x, w }], /argument 'eps' must be a number/);
  await expectRefused(
    t,
    d,
    [
      {
        op: 'rmsnorm_forward',
        y: x.rows(1, 4).reshape([3, 8]),
        rstd: d.alloc('f32', [3]),
        x: x.rows(0, 3),
        w,
        eps: 1e-5,
      },
    ],
    /'y' and 'x' overlap/,
  );
  await expectRefused(t, d, [{ op: 'rmsnorm_backward', dx: y, dy: y, x, w, rstd }], /'dx' and 'dy' overlap/);
  await expectRefused(
    t,
    d,
    [{ op: 'rmsnorm_backward', dx: y, dy: d.alloc('f32', [4, 8]), x, w, rstd, dw: d.alloc('f32', [9]) }],
    /argument 'dw' has 9 elements/,
  );
  await expectRefused(
    t,
    d,
    [{ op: 'rmsnorm_backward', dx: y, dy: d.alloc('f32', [4, 8]), x, w, rstd: d.alloc('i32', [4]) }],
    /argument 'rstd' has dtype i32/,
  );
});
