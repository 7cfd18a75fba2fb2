// Cross-entropy over the vocabulary with ignored labels (-100), fused with its weighted
// gradient, in place or not. Float64 reference, finite differences on the reference, extremes.
import t from 'tap';
import { Rng } from '../../lib/rng.js';
import { assertClose, cpuDevice, randn, randu } from '../support/helpers.js';
import { assertBitwise, eachSimdKernel, expectRefused, f32, finiteDiff, i32, read } from './util.js';

const d = cpuDevice(2);

function ref(logits: ArrayLike<number>, labels: Int32Array, weights: ArrayLike<number>, n: number, v: number) {
  const losses = new Float64Array(n),
    dlogits = new Float64Array(n * v);
  for (let i = 0; i < n; i++) {
    if (labels[i]! < 0) continue;
    let m = -Infinity;
    for (let j = 0; j < v; j++) m = Math.max(m, logits[i * v + j]!);
    let s = 0;
    for (let j = 0; j < v; j++) s += Math.exp(logits[i * v + j]! - m);
    losses[i] = m + Math.log(s) - logits[i * v + labels[i]!]!;
    for (let j = 0; j < v; j++) dlogits[i * v + j] = (weights[i]! * Math.exp(logits[i * v + j]! - m)) / s;
    dlogits[i * v + labels[i]!]! -= weights[i]!;
  }
  return { losses, dlogits };
}

// losses: lse formed in double from a float sum of exp_approx values (≈2e-7 relative each) →
// absolute error ~1e-6 on losses of a few nats. dlogits: probabilities ≤ 1 times weights ≤ 2,
// each a few float roundings: atol 1e-7 and rtol 1e-5 (tiny probabilities are relative).
const LOSS = { atol: 5e-6, rtol: 1e-6 };
const GRAD = { atol: 1e-7, rtol: 1e-5 };

function labelsFor(rng: Rng, n: number, v: number) {
  return Int32Array.from({ length: n }, (_, i) => (i % 5 === 2 ? -100 : rng.int(v)));
}

eachSimdKernel('forward and fused backward vs float64, ignored labels, weights', async (t) => {
  const rng = new Rng(40, 'ce');
  const n = 24,
    v = 1500; // spans the 1024-wide summation blocks
  const logits = randn(rng, n * v, 3),
    labels = labelsFor(rng, n, v),
    weights = randu(rng, n, 0.1, 2);
  const r = ref(logits, labels, weights, n, v);
  const lt = f32(d, [n, v], logits),
    lab = i32(d, [n], labels);
  const losses = d.alloc('f32', [n]),
    losses2 = d.alloc('f32', [n]),
    dlogits = d.alloc('f32', [n, v]);
  await d.run([
    { op: 'cross_entropy_forward', losses, logits: lt, labels: lab },
    { op: 'cross_entropy_backward', losses: losses2, dlogits, logits: lt, labels: lab, weights: f32(d, [n], weights) },
  ]);
  assertClose(t, read(losses), r.losses, LOSS, 'forward losses');
  assertClose(t, read(losses2), r.losses, LOSS, 'backward losses');
  assertClose(t, read(dlogits), r.dlogits, GRAD, 'dlogits');
  const lv = read(losses),
    dv = read(dlogits);
  const ignored = [...labels.keys()].filter((i) => labels[i]! < 0);
  t.ok(ignored.length > 0 && ignored.every((i) => lv[i] === 0), 'ignored rows have loss 0');
  t.ok(
    ignored.every((i) => dv.subarray(i * v, i * v + v).every((x) => x === 0)),
    'ignored rows have zero gradient',
  );
  // each non-ignored gradient row sums to 0 (softmax sums to 1)
  let worst = 0;
  for (let i = 0; i < n; i++)
    worst = Math.max(worst, Math.abs(dv.subarray(i * v, i * v + v).reduce((a, b) => a + b, 0)));
  t.ok(worst < 1e-5, `gradient rows sum to ~0 (worst ${worst.toExponential(2)})`);
});

eachSimdKernel('in place: dlogits over logits gives the same bits as out of place', async (t) => {
  const rng = new Rng(41, 'ce-inplace');
  const n = 10,
    v = 700;
  const logits = randn(rng, n * v, 2),
    labels = labelsFor(rng, n, v),
    weights = randu(rng, n, 0.5, 1.5);
  const lab = i32(d, [n], labels),
    w = f32(d, [n], weights);
  const out = d.alloc('f32', [n, v]),
    lossA = d.alloc('f32', [n]),
    lossB = d.alloc('f32', [n]);
  d.runSync([
    {
      op: 'cross_entropy_backward',
      losses: lossA,
      dlogits: out,
      logits: f32(d, [n, v], logits),
      labels: lab,
      weights: w,
    },
  ]);
  const inplace = f32(d, [n, v], logits);
  d.runSync([
    { op: 'cross_entropy_backward', losses: lossB, dlogits: inplace, logits: inplace, labels: lab, weights: w },
  ]);
  assertBitwise(t, read(inplace), read(out), 'dlogits');
  assertBitwise(t, read(lossB), read(lossA), 'losses');
});

eachSimdKernel('extreme logits: huge spreads, large offsets, near-one-hot rows', async (t) => {
  const rng = new Rng(42, 'ce-extreme');
  const v = 300,
    rows: Float32Array[] = [];
  rows.push(randn(rng, v, 1e4)); // softmax is one-hot up to float underflow
  rows.push(randn(rng, v, 1).map((x) => x + 1e6)); // large common offset
  rows.push(randn(rng, v, 1).map((x) => x - 1e6));
  rows.push(new Float32Array(v).fill(85)); // uniform; exp(85) alone would be near float's top
  rows.push(randn(rng, v, 30)); // moderate spread: many tiny probabilities
  const n = rows.length,
    logits = new Float32Array(n * v);
  rows.forEach((r, i) => logits.set(r, i * v));
  const labels = Int32Array.from([7, 100, 299, 0, 42]);
  const weights = Float32Array.from([1, 0.5, 2, 1, 1e-3]);
  const r = ref(logits, labels, weights, n, v);
  const losses = d.alloc('f32', [n]),
    dlogits = d.alloc('f32', [n, v]);
  d.runSync([
    {
      op: 'cross_entropy_backward',
      losses,
      dlogits,
      logits: f32(d, [n, v], logits),
      labels: i32(d, [n], labels),
      weights: f32(d, [n], weights),
    },
  ]);
  t.ok(read(losses).every(Number.isFinite) && read(dlogits).every(Number.isFinite), 'all finite');
  // loss of the 1e4-spread row is ~1e4: relative tolerance matters there
  assertClose(t, read(losses), r.losses, { atol: 5e-6, rtol: 1e-6 }, 'losses');
  assertClose(t, read(dlogits), r.dlogits, GRAD, 'dlogits');
});

t.test('the reference gradient agrees with finite differences of the weighted loss', async (t) => {
  const rng = new Rng(43, 'ce-fd');
  const n = 3,
    v = 6;
  const logits = randn(rng, n * v, 2),
    labels = Int32Array.from([2, -100, 5]),
    weights = Float32Array.from([0.7, 1.3, 1.9]);
  const wl = (x: Float64Array) => ref(x, labels, weights, n, v).losses.reduce((s, l, i) => s + weights[i]! * l, 0);
  assertClose(
    t,
    ref(logits, labels, weights, n, v).dlogits,
    finiteDiff(wl, logits),
    { atol: 1e-8, rtol: 1e-6 },
    'dlogits vs finite differences',
  );
});

t.test('bad arguments are Errors naming the argument', async (t) => {
  const n = 4,
    v = 10;
  const logits = f32(d, [n, v], randn(new Rng(44), n * v)),
    losses = d.alloc('f32', [n]),
    w = f32(d, [n], [1, 1, 1, 1]);
  const labels = (l: number[]) => i32(d, [l.length], l);
  const fwd = (o: Record<string, unknown>) => ({ op: 'cross_entropy_forward', losses, logits, ...o });
  const bwd = (o: Record<string, unknown>) => ({
    op: 'cross_entropy_backward',
    losses,
    dlogits: d.alloc('f32', [n, v]),
    logits,
    labels: labels([1, 2, 3, 4]),
    weights: w,
    ...o,
  });
  const big = f32(d, [n + 1, v], randn(new Rng(45), (n + 1) * v));
  const cases: Array<[object, RegExp]> = [
    [fwd({ labels: labels([1, 2, 10, 3]) }), /argument 'labels': label 10 at row 2 is out of range \[0, 10\)/],
    [bwd({ labels: labels([99, 2, 1, 3]) }), /label 99 at row 0/],
    [fwd({ labels: f32(d, [n], [1, 2, 3, 4]) }), /argument 'labels' has dtype f32, expected i32/],
    [fwd({ labels: labels([1, 2, 3]) }), /argument 'labels' has 3 elements/],
    [fwd({ logits: logits.reshape([n * v]), labels: labels([1, 2, 3, 4]) }), /argument 'logits' must be 2-D/],
    [bwd({ dlogits: d.alloc('f32', [n, v + 1]) }), /argument 'dlogits' has shape \[4,11\], expected \[4,10\]/],
    [bwd({ weights: f32(d, [2], [1, 1]) }), /argument 'weights' has 2 elements/],
    [bwd({ dlogits: big.rows(1, n + 1), logits: big.rows(0, n) }), /'dlogits' and 'logits' overlap/],
  ];
  for (const [op, re] of cases) await expectRefused(t, d, [op], re);
});
