// The frozen base linear layer (cpu/linear.cc): forward y = x·Wᵀ and backward dx = dy·W (no
// weight gradient: the base is frozen), written (=) or accumulated (+=, the residual stream and
// the LoRA path adding into dX), for f32/bf16/f16 weights, against a float64 reference built
// from the exact values the rounded weight bits hold.
//
// Tolerance: as in gemm.test.ts, the error is measured relative to the sum of the absolute
// terms S = Σ|x||w| (+ |y0| when accumulating) and allowed to be 8·u·(√k + 1), u = 2⁻²⁴:
// float32 accumulation errs by ~√k·u of S in practice (at most ~k·u), a wrong element by O(1).
import t, { type Test } from 'tap';
import type { Device } from '../../lib/tensor.js';
import { Rng } from '../../lib/rng.js';
import { assertClose, cpuDevice, randn } from '../support/helpers.js';
import { toHalf } from '../support/half.js';

type WType = 'f32' | 'bf16' | 'f16';
const U = 2 ** -24;

const devices = new Map<number, Device>();
function device(threads: number): Device {
  let d = devices.get(threads);
  if (!d) devices.set(threads, (d = cpuDevice(threads, 2 ** 28)));
  return d;
}

function scaled(rng: Rng, n: number, scales?: number[]): Float32Array {
  const x = randn(rng, n);
  if (scales) for (let i = 0; i < n; i++) x[i]! *= scales[rng.int(scales.length)]!;
  return x;
}

function makeWeight(d: Device, dtype: WType, n: number, k: number, x: Float32Array) {
  if (dtype === 'f32') return { w: d.fromArray('f32', [n, k], x), values: x as ArrayLike<number> };
  const h = toHalf(x, dtype);
  return { w: d.fromArray(dtype, [n, k], h.bits), values: h.values as ArrayLike<number> };
}

/** Compares got with want in units of the terms' magnitude `scale`. */
function check(t: Test, got: Float32Array, want: Float64Array, scale: Float64Array, k: number, label: string) {
  const g = new Float64Array(got.length);
  const w = new Float64Array(got.length);
  for (let i = 0; i < got.length; i++) {
    const s = scale[i]! > 0 ? scale[i]! : 1;
    g[i] = got[i]! / s;
    w[i] = want[i]! / s;
  }
  assertClose(t, g, w, { atol: 8 * U * (Math.sqrt(k) + 1), rtol: 0 }, label);
}

interface Case {
  lead: number[]; // leading dimensions of x / dy (their product is m)
  n: number; // out features
  k: number; // in features
  dtype: WType;
  accumulate: boolean;
  threads: number;
  ranges?: [number[], number[]];
}

async function forward(t: Test, c: Case, seed: number) {
  const d = device(c.threads);
  const rng = new Rng(seed, 'linear_forward');
  const m = c.lead.reduce((a, b) => a * b, 1);
  const { n, k } = c;
  const x = scaled(rng, m * k, c.ranges?.[0]);
  const { w, values: wv } = makeWeight(d, c.dtype, n, k, scaled(rng, n * k, c.ranges?.[1]));
  // Written (=) output starts as NaN: the kernel must not read it.
  const y0 = c.accumulate ? randn(rng, m * n) : new Float32Array(m * n).fill(NaN);
  const X = d.fromArray('f32', [...c.lead, k], x);
  const Y = d.fromArray('f32', [...c.lead, n], y0);
  await d.run([{ op: 'linear_forward', y: Y, x: X, w, accumulate: c.accumulate }]);
  const got = Y.read() as Float32Array;
  X.free();
  Y.free();
  w.free();
  const want = new Float64Array(m * n);
  const scale = new Float64Array(m * n);
  for (let i = 0; i < m; i++)
    for (let j = 0; j < n; j++) {
      let s = 0;
      let a = 0;
      for (let p = 0; p < k; p++) {
        const v = x[i * k + p]! * wv[j * k + p]!;
        s += v;
        a += Math.abs(v);
      }
      const base = c.accumulate ? y0[i * n + j]! : 0;
      want[i * n + j] = s + base;
      scale[i * n + j] = a + Math.abs(base);
    }
  check(
    t,
    got,
    want,
    scale,
    k,
    `forward x[${c.lead},${k}] w[${n},${k}] ${c.dtype}${c.accumulate ? ' +=' : ''} threads=${c.threads}${c.ranges ? ' extreme' : ''}`,
  );
}

async function backward(t: Test, c: Case, seed: number) {
  const d = device(c.threads);
  const rng = new Rng(seed, 'linear_backward');
  const m = c.lead.reduce((a, b) => a * b, 1);
  const { n, k } = c;
  const dy = scaled(rng, m * n, c.ranges?.[0]);
  const { w, values: wv } = makeWeight(d, c.dtype, n, k, scaled(rng, n * k, c.ranges?.[1]));
  const dx0 = c.accumulate ? randn(rng, m * k) : new Float32Array(m * k).fill(NaN);
  const DY = d.fromArray('f32', [...c.lead, n], dy);
  const DX = d.fromArray('f32', [...c.lead, k], dx0);
  await d.run([{ op: 'linear_backward', dx: DX, dy: DY, w, accumulate: c.accumulate }]);
  const got = DX.read() as Float32Array;
  DY.free();
  DX.free();
  w.free();
  const want = new Float64Array(m * k);
  const scale = new Float64Array(m * k);
  for (let i = 0; i < m; i++)
    for (let j = 0; j < n; j++) {
      const g = dy[i * n + j]!;
      for (let p = 0; p < k; p++) {
        const v = g * wv[j * k + p]!;
        want[i * k + p]! += v;
        scale[i * k + p]! += Math.abs(v);
      }
    }
  if (c.accumulate)
    for (let i = 0; i < m * k; i++) {
      want[i]! += dx0[i]!;
      scale[i]! += Math.abs(dx0[i]!);
    }
  check(
    t,
    got,
    want,
    scale,
    n,
    `backward dy[${c.lead},${n}] w[${n},${k}] ${c.dtype}${c.accumulate ? ' +=' : ''} threads=${c.threads}${c.ranges ? ' extreme' : ''}`,
  );
}

const dtypes: WType[] = ['f32', 'bf16', 'f16'];
// [lead dims, n (out), k (in)]: odd sizes, a 3-D batch, a single row, and model-like shapes.
const shapes: Array<[number[], number, number]> = [
  [[1], 1, 1],
  [[3], 7, 17],
  [[1], 129, 33],
  [[2, 9], 33, 65],
  [[17], 64, 4],
  [[40], 8, 96],
  [[130], 96, 300],
];

t.test('forward y = x·Wᵀ: dtypes, odd shapes, = and +=, 1 and 2 threads', async (t) => {
  let seed = 1;
  for (const [lead, n, k] of shapes)
    for (const dtype of dtypes)
      for (const accumulate of [false, true])
        for (const threads of [1, 2]) await forward(t, { lead, n, k, dtype, accumulate, threads }, seed++);
});

t.test('backward dx = dy·W: dtypes, odd shapes, = and +=, 1 and 2 threads', async (t) => {
  let seed = 1;
  for (const [lead, n, k] of shapes)
    for (const dtype of dtypes)
      for (const accumulate of [false, true])
        for (const threads of [1, 2]) await backward(t, { lead, n, k, dtype, accumulate, threads }, seed++);
});

t.test('extreme range: activations and weights of size ~1e4 and ~1e-4 mixed', async (t) => {
  const ranges: [number[], number[]] = [
    [1e4, 1e-4, 1],
    [1e-4, 1e4, 1e-2],
  ];
  let seed = 500;
  for (const dtype of dtypes)
    for (const accumulate of [false, true]) {
      await forward(t, { lead: [21], n: 50, k: 270, dtype, accumulate, threads: 2, ranges }, seed++);
      await backward(t, { lead: [21], n: 50, k: 270, dtype, accumulate, threads: 2, ranges }, seed++);
    }
});

t.test('shape mismatches are Errors naming the argument', async (t) => {
  const d = device(1);
  const x = d.alloc('f32', [4, 8]);
  const w = d.alloc('bf16', [6, 8]);
  const y = d.alloc('f32', [4, 6]);
  t.throws(() => d.runSync([{ op: 'linear_forward', y, x, w: d.alloc('f32', [48]) }]), /argument 'w' must be 2-D/);
  t.throws(() => d.runSync([{ op: 'linear_forward', y, x: d.alloc('f32', [4, 7]), w }]), /argument 'x'.*in=8/);
  t.throws(() => d.runSync([{ op: 'linear_forward', y: d.alloc('f32', [4, 5]), x, w }]), /argument 'y' has shape/);
  t.throws(() => d.runSync([{ op: 'linear_backward', dx: x, dy: d.alloc('f32', [4, 5]), w }]), /argument 'dy'.*out=6/);
  t.throws(
    () => d.runSync([{ op: 'linear_backward', dx: d.alloc('f32', [4, 9]), dy: y, w }]),
    /argument 'dx' has shape/,
  );
  t.throws(() => d.runSync([{ op: 'linear_forward', y, x, w: d.alloc('i32', [6, 8]) }]), /argument 'w' has dtype i32/);
});
