// AdamW against a hand-written float64 reference of torch.optim.AdamW's update (decoupled weight
// decay, bias correction), over several steps, several tensors in one call, with gradScale.
import t, { type Test } from 'tap';
import { Rng } from '../../lib/rng.js';
import { assertClose, cpuDevice, randn } from '../support/helpers.js';
import { expectRefused, f32, read } from './util.js';

const d = cpuDevice(2);

interface Hyper {
  lr: number;
  beta1: number;
  beta2: number;
  eps: number;
  weightDecay: number;
  gradScale?: number;
}

/** One PyTorch AdamW step in float64, in place. The kernel takes its hyper-parameters in double,
 *  as PyTorch takes Python floats, so 1 − β is exact here and there (f32 β would put 1.3e-5 into v). */
function stepRef(p: Float64Array, g: ArrayLike<number>, m: Float64Array, v: Float64Array, hd: Hyper, step: number) {
  const h = { ...hd, gradScale: Math.fround(hd.gradScale ?? 1) };
  const bc1 = 1 - h.beta1 ** step,
    bc2 = 1 - h.beta2 ** step;
  for (let i = 0; i < p.length; i++) {
    const gi = g[i]! * (h.gradScale ?? 1);
    p[i] = p[i]! * (1 - h.lr * h.weightDecay);
    m[i] = h.beta1 * m[i]! + (1 - h.beta1) * gi;
    v[i] = h.beta2 * v[i]! + (1 - h.beta2) * gi * gi;
    p[i] = p[i]! - (h.lr / bc1) * (m[i]! / (Math.sqrt(v[i]! / bc2) + h.eps));
  }
}

async function run(
  t: Test,
  sizes: number[],
  h: Hyper,
  steps: number,
  gradStd: number[],
  seed: number,
  tol: { atol: number; rtol: number },
) {
  const rng = new Rng(seed, 'adamw');
  const p0 = sizes.map((n) => randn(rng, n));
  const pRef = p0.map((a) => Float64Array.from(a));
  const mRef = sizes.map((n) => new Float64Array(n)),
    vRef = sizes.map((n) => new Float64Array(n));
  const params = p0.map((a, i) => f32(d, [sizes[i]!], a));
  const m = sizes.map((n) => d.alloc('f32', [n], { zero: true })),
    v = sizes.map((n) => d.alloc('f32', [n], { zero: true }));
  for (let s = 1; s <= steps; s++) {
    const gs = sizes.map((n, i) => randn(rng, n, gradStd[i % gradStd.length]!)); // fresh gradients each step
    const grads = gs.map((g, i) => f32(d, [sizes[i]!], g));
    await d.run([{ op: 'adamw', params, grads, m, v, step: s, ...h }]);
    gs.forEach((g, i) => stepRef(pRef[i]!, g, mRef[i]!, vRef[i]!, h, s));
  }
  sizes.forEach((n, i) => {
    assertClose(t, read(params[i]!), pRef[i]!, tol, `params[${i}] (${n}) after ${steps} steps`);
    // m is an average of random-sign gradients and can cancel to near 0: absolute error in units of
    // the gradient's scale; v is a sum of positive terms, so relative error alone.
    assertClose(t, read(m[i]!), mRef[i]!, { atol: 1e-7 * gradStd[i % gradStd.length]!, rtol: 1e-5 }, `m[${i}]`);
    assertClose(t, read(v[i]!), vRef[i]!, { atol: 0, rtol: 1e-5 }, `v[${i}]`);
  });
}

// The update is a few float operations per element per step on O(1) params; over 5 steps the
// float result drifts from float64 by ~1e-7 relative: atol 1e-6 on |p| ~ 1.
const TOL = { atol: 1e-6, rtol: 1e-6 };

t.test('several steps over several tensors in one call, weight decay and gradScale', async (t) => {
  // 20001 elements span thread chunks that start and end inside a tensor
  await run(
    t,
    [7, 1000, 20001],
    { lr: 1e-2, beta1: 0.9, beta2: 0.999, eps: 1e-8, weightDecay: 0.1, gradScale: 0.5 },
    5,
    [1],
    50,
    TOL,
  );
});

t.test('defaults: gradScale 1, no weight decay, one step (the update is lr·sign(g))', async (t) => {
  await run(t, [33, 4], { lr: 3e-4, beta1: 0.8, beta2: 0.95, eps: 1e-6, weightDecay: 0 }, 1, [1], 51, TOL);
});

t.test('extreme gradients: ~1e19 and ~1e-15 (eps dominates), no overflow', async (t) => {
  // g² ≈ 1e38..1e39 would overflow a float; (1-β2)·g·g evaluated left to right does not
  await run(
    t,
    [64, 64],
    { lr: 1e-3, beta1: 0.9, beta2: 0.999, eps: 1e-8, weightDecay: 0.01 },
    4,
    [1e19, 1e-15],
    52,
    TOL,
  );
});

t.test('empty tensors in the list are fine', async (t) => {
  const p = f32(d, [3], [1, 2, 3]),
    e = d.alloc('f32', [0]);
  await d.run([
    {
      op: 'adamw',
      params: [e, p],
      grads: [d.alloc('f32', [0]), f32(d, [3], [1, -1, 2])],
      m: [d.alloc('f32', [0]), d.alloc('f32', [3], { zero: true })],
      v: [d.alloc('f32', [0]), d.alloc('f32', [3], { zero: true })],
      lr: 0.1,
      beta1: 0.9,
      beta2: 0.999,
      eps: 1e-8,
      weightDecay: 0,
      step: 1,
    },
  ]);
  // step 1: m̂ = g, v̂ = g², update = lr·g/(|g| + eps) ≈ ±lr
  assertClose(t, read(p), [0.9, 2.1, 2.9], { atol: 1e-6, rtol: 0 }, 'params');
});

t.test('bad arguments are Errors naming the argument', async (t) => {
  const mk = (n: number) => f32(d, [n], randn(new Rng(n), n));
  const base = () => ({
    op: 'adamw',
    params: [mk(4)],
    grads: [mk(4)],
    m: [mk(4)],
    v: [mk(4)],
    lr: 1e-3,
    beta1: 0.9,
    beta2: 0.999,
    eps: 1e-8,
    weightDecay: 0,
    step: 1,
  });
  const p = mk(4);
  const cases: Array<[Record<string, unknown>, RegExp]> = [
    [{ grads: [mk(4), mk(4)] }, /argument 'grads' has 2 tensors, 'params' has 1/],
    [{ m: [mk(5)] }, /argument 'm\[0\]' has 5 elements/],
    [{ params: [p], v: [p] }, /'params\[0\]' and 'v\[0\]' overlap/],
    [{ step: 0 }, /argument 'step' must be an integer >= 1/],
    [{ step: 1.5 }, /argument 'step' must be an integer/],
    [{ beta1: 1 }, /argument 'beta1' must be in \[0, 1\)/],
    [{ beta2: -0.1 }, /argument 'beta2' must be in \[0, 1\)/],
    [{ eps: 0 }, /argument 'eps' must be > 0/],
    [{ lr: -1 }, /argument 'lr' must be >= 0/],
    [{ weightDecay: undefined }, /argument 'weightDecay' must be a number/],
    [{ gradScale: Infinity }, /argument 'gradScale' must be finite/],
    [{ params: [d.alloc('bf16', [4])] }, /argument 'params\[0\]' has dtype bf16, expected f32/],
    [{ grads: mk(4) }, /argument 'grads' must be an array of Tensors/],
  ];
  for (const [patch, re] of cases) await expectRefused(t, d, [{ ...base(), ...patch }], re);
});
