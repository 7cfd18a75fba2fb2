// Causal varlen GQA attention: forward (out, lse) and backward (dq, dk, dv) against a naive
// float64 reference that materialises every score matrix, finite differences of that
// reference on a tiny case, thread counts, every instruction-set path, an extreme logit range,
// sequence isolation and bad arguments.
import t from 'tap';
import { Rng } from '../../lib/rng.js';
import { assertClose, cpuDevice } from '../support/helpers.js';
import { CPU_KERNELS, KERNEL_PATHS, skipUnless, withKernel } from './util.js';
import {
  attentionInputs,
  GRAD_REL,
  OUTPUTS,
  randomTensor,
  runAttention,
  scaled,
  TOL_LSE,
  TOL_OUT,
  type AttentionCase,
  type Inputs,
  type Outputs,
} from './attention-util.js';

interface Fwd {
  out: Float64Array;
  lse: Float64Array;
}

/** float64 forward: per sequence and head, the full causal score matrix and its softmax. */
function attnRef(
  s: AttentionCase,
  x: { q: ArrayLike<number>; k: ArrayLike<number>; v: ArrayLike<number> },
): Fwd & { probs: Float64Array[][] } {
  const { cu, hq, hkv, d } = s;
  const n = cu[cu.length - 1]!,
    group = hq / hkv,
    scale = s.scale ?? 1 / Math.sqrt(d);
  const out = new Float64Array(n * hq * d),
    lse = new Float64Array(hq * n);
  const probs: Float64Array[][] = [];
  for (let q = 0; q + 1 < cu.length; q++) {
    const r0 = cu[q]!,
      T = cu[q + 1]! - r0;
    const perHead: Float64Array[] = [];
    for (let h = 0; h < hq; h++) {
      const g = Math.floor(h / group);
      const P = new Float64Array(T * T);
      for (let i = 0; i < T; i++) {
        let mx = -Infinity;
        for (let j = 0; j <= i; j++) {
          let dot = 0;
          for (let c = 0; c < d; c++) dot += x.q[((r0 + i) * hq + h) * d + c]! * x.k[((r0 + j) * hkv + g) * d + c]!;
          P[i * T + j] = scale * dot;
          mx = Math.max(mx, scale * dot);
        }
        let sum = 0;
        for (let j = 0; j <= i; j++) sum += Math.exp(P[i * T + j]! - mx);
        lse[h * n + r0 + i] = mx + Math.log(sum);
        for (let j = 0; j <= i; j++) {
          const p = Math.exp(P[i * T + j]! - mx) / sum;
          P[i * T + j] = p;
          for (let c = 0; c < d; c++) out[((r0 + i) * hq + h) * d + c]! += p * x.v[((r0 + j) * hkv + g) * d + c]!;
        }
      }
      perHead.push(P);
    }
    probs.push(perHead);
  }
  return { out, lse, probs };
}

/** float64 analytic backward from the materialised probabilities: dS = P∘(dP − rowsum(P∘dP)). */
function attnBackRef(s: AttentionCase, x: Inputs) {
  const { cu, hq, hkv, d } = s;
  const n = cu[cu.length - 1]!,
    group = hq / hkv,
    scale = s.scale ?? 1 / Math.sqrt(d);
  const { probs } = attnRef(s, x);
  const dq = new Float64Array(n * hq * d),
    dk = new Float64Array(n * hkv * d),
    dv = new Float64Array(n * hkv * d);
  for (let q = 0; q + 1 < cu.length; q++) {
    const r0 = cu[q]!,
      T = cu[q + 1]! - r0;
    for (let h = 0; h < hq; h++) {
      const g = Math.floor(h / group),
        P = probs[q]![h]!;
      const qi = (i: number) => ((r0 + i) * hq + h) * d,
        kj = (j: number) => ((r0 + j) * hkv + g) * d;
      for (let i = 0; i < T; i++) {
        const dP = new Float64Array(i + 1);
        let rs = 0;
        for (let j = 0; j <= i; j++) {
          let dot = 0;
          for (let c = 0; c < d; c++) dot += x.dout[qi(i) + c]! * x.v[kj(j) + c]!;
          dP[j] = dot;
          rs += P[i * T + j]! * dot;
        }
        for (let j = 0; j <= i; j++) {
          const p = P[i * T + j]!,
            dS = p * (dP[j]! - rs);
          for (let c = 0; c < d; c++) {
            dv[kj(j) + c]! += p * x.dout[qi(i) + c]!;
            dq[qi(i) + c]! += scale * dS * x.k[kj(j) + c]!;
            dk[kj(j) + c]! += scale * dS * x.q[qi(i) + c]!;
          }
        }
      }
    }
  }
  return { dq, dk, dv };
}

/** Bitwise equality of two float arrays (t.same on large typed arrays is slow). */
function sameBits(a: Float32Array, b: Float32Array): boolean {
  return (
    a.length === b.length &&
    Buffer.from(a.buffer, a.byteOffset, a.byteLength).equals(Buffer.from(b.buffer, b.byteOffset, b.byteLength))
  );
}

const shapes: Array<[string, AttentionCase]> = [
  [
    'single sequence of 150 (three key blocks, the last partial), MHA 4 heads, d 32',
    { cu: [0, 150], hq: 4, hkv: 4, d: 32 },
  ],
  [
    'nine sequences of lengths 0..130 (one empty), GQA ratio 2, d 16',
    { cu: [0, 1, 8, 8, 72, 137, 267, 270, 271, 291], hq: 4, hkv: 2, d: 16 },
  ],
  ['four sequences incl. length 1 and 64, GQA ratio 4, d 64', { cu: [0, 33, 34, 134, 198], hq: 8, hkv: 2, d: 64 }],
  [
    'one kv head for all (MQA), explicit scale 0.3, d 20 (not a multiple of 8)',
    { cu: [0, 70, 75], hq: 3, hkv: 1, d: 20, scale: 0.3 },
  ],
];

for (const [name, s] of shapes) {
  t.test(`forward and backward vs float64: ${name}`, async (t) => {
    const x = attentionInputs(s, new Rng(11, 'attn', name));
    const ref = attnRef(s, x);
    const bref = attnBackRef(s, x);
    let first: Outputs | undefined;
    for (const threads of [1, 2]) {
      const got = await runAttention(cpuDevice(threads), s, x, new Rng(12, threads));
      assertClose(t, got.out, ref.out, TOL_OUT, `out (${threads} thread(s))`);
      assertClose(t, got.lse, ref.lse, TOL_LSE, `lse (${threads} thread(s))`);
      for (const g of ['dq', 'dk', 'dv'] as const)
        assertClose(t, got[g], bref[g], scaled(bref[g], GRAD_REL, 1e-3), `${g} (${threads} thread(s))`);
      if (!first) first = got;
      else {
        // Every element is computed by one work item in a fixed order, whatever the schedule,
        // so the thread count does not change a single bit.
        for (const key of OUTPUTS) t.ok(sameBits(got[key], first[key]), `${key}: 2 threads == 1 thread, bitwise`);
      }
    }
  });
}

// The kernel picks AVX-512, AVX2 or portable tile code per call (the widest whose vector width
// divides d, unless MLORA_GEMM_KERNEL, read at each call, asks for a narrower one). Every path
// this CPU has runs on shapes that exercise its micro-tile edges: partial tiles, rows not a
// multiple of the micro-tile height, head dims of one and several micro-tile widths.
const pathShapes: Array<[string, AttentionCase]> = [
  ['lengths 1, 69, 30, 129 (tile edges), GQA 2, d 48', { cu: [0, 1, 70, 100, 229], hq: 4, hkv: 2, d: 48 }],
  ['one sequence of 200, GQA 4, d 128', { cu: [0, 200], hq: 4, hkv: 1, d: 128 }],
];
for (const [kernel, have] of KERNEL_PATHS) {
  t.test(
    `MLORA_GEMM_KERNEL=${kernel}: forward and backward vs float64, 1 and 2 threads bitwise`,
    skipUnless(kernel, have),
    async (t) => {
      for (const [name, s] of pathShapes) {
        const x = attentionInputs(s, new Rng(18, 'attn-path', name));
        const ref = attnRef(s, x);
        const bref = attnBackRef(s, x);
        const one = await withKernel(kernel, () => runAttention(cpuDevice(1), s, x, new Rng(19)));
        assertClose(t, one.out, ref.out, TOL_OUT, `${name}: out`);
        assertClose(t, one.lse, ref.lse, TOL_LSE, `${name}: lse`);
        for (const g of ['dq', 'dk', 'dv'] as const)
          assertClose(t, one[g], bref[g], scaled(bref[g], GRAD_REL, 1e-3), `${name}: ${g}`);
        const two = await withKernel(kernel, () => runAttention(cpuDevice(2), s, x, new Rng(20)));
        for (const key of OUTPUTS) t.ok(sameBits(two[key], one[key]), `${name}: ${key} 2 threads == 1 thread, bitwise`);
      }
    },
  );
}

t.test('finite differences of the float64 forward agree with both backward passes', async (t) => {
  const s: AttentionCase = { cu: [0, 3, 4, 7], hq: 2, hkv: 1, d: 4 };
  const rng = new Rng(13, 'attn-fd');
  const x = attentionInputs(s, rng);
  const n = 7;
  // L = Σ dout ∘ out, so ∂L/∂θ is exactly what backward computes from dout.
  const loss = (xx: Inputs) => {
    const o = attnRef(s, xx).out;
    let l = 0;
    for (let i = 0; i < o.length; i++) l += o[i]! * xx.dout[i]!;
    return l;
  };
  const fd = (which: 'q' | 'k' | 'v') => {
    const g = new Float64Array(x[which].length);
    const eps = 1e-3; // on float32 inputs; the loss is evaluated in float64, the error is O(eps²)
    for (let i = 0; i < g.length; i++) {
      const orig = x[which][i]!;
      const probe = (val: number) => {
        const arr = Float64Array.from(x[which]);
        arr[i] = val;
        return loss({ ...x, [which]: arr } as unknown as Inputs);
      };
      g[i] = (probe(orig + eps) - probe(orig - eps)) / (2 * eps);
    }
    return g;
  };
  const bref = attnBackRef(s, x);
  const got = await runAttention(cpuDevice(1), s, x, rng);
  for (const [which, gk] of [
    ['q', 'dq'],
    ['k', 'dk'],
    ['v', 'dv'],
  ] as const) {
    const num = fd(which);
    // Central differences with eps 1e-3 on O(1) inputs: truncation error ~eps²·|f'''| ≈ 1e-6.
    assertClose(t, bref[gk], num, { atol: 1e-5, rtol: 1e-4 }, `${gk}: f64 analytic vs finite differences`);
    // The kernel is float32: the same bound as the reference comparisons above.
    assertClose(t, got[gk], num, { atol: 1e-4, rtol: 1e-3 }, `${gk}: kernel vs finite differences`);
  }
  t.equal(n, s.cu[s.cu.length - 1]);
});

t.test('extreme range: q and k scaled by 30 (logits in the hundreds) stay finite and accurate', async (t) => {
  const s: AttentionCase = { cu: [0, 1, 50, 130], hq: 4, hkv: 2, d: 16 };
  const x = attentionInputs(s, new Rng(14, 'attn-extreme'), 30);
  const ref = attnRef(s, x);
  const bref = attnBackRef(s, x);
  let maxLse = 0;
  for (const l of ref.lse) maxLse = Math.max(maxLse, Math.abs(l));
  t.ok(maxLse > 200, `the case really is extreme: max |lse| ${maxLse.toFixed(0)}`);
  for (const kernel of CPU_KERNELS) {
    for (const threads of [1, 2]) {
      const got = await withKernel(kernel, () => runAttention(cpuDevice(threads), s, x, new Rng(15)));
      const at = `(${kernel}, ${threads} thread(s))`;
      for (const key of OUTPUTS) t.ok(got[key].every(Number.isFinite), `${key} finite ${at}`);
      // A score of magnitude ~1000 carries a float32 rounding error of ~1e-4·√d absolute, which
      // becomes a relative error of that size in its probability: out within 2e-3 of |v| ~ 1,
      // lse within 1e-5 relative, gradients within 2e-3 of their largest magnitude.
      assertClose(t, got.out, ref.out, { atol: 2e-3, rtol: 2e-3 }, `out ${at}`);
      assertClose(t, got.lse, ref.lse, { atol: 1e-4, rtol: 1e-5 }, `lse ${at}`);
      for (const g of ['dq', 'dk', 'dv'] as const)
        assertClose(t, got[g], bref[g], scaled(bref[g], 2e-3, 2e-3), `${g} ${at}`);
    }
  }
});

t.test('no cross-sequence leakage: changing one sequence leaves the others bitwise unchanged', async (t) => {
  const s: AttentionCase = { cu: [0, 40, 110, 150], hq: 4, hkv: 2, d: 32 };
  const rng = new Rng(16, 'attn-leak');
  const x = attentionInputs(s, rng);
  const dev = cpuDevice(2);
  const a = await runAttention(dev, s, x, rng);
  const y: Inputs = { q: x.q.slice(), k: x.k.slice(), v: x.v.slice(), dout: x.dout.slice() };
  for (const key of ['q', 'k', 'v', 'dout'] as const) {
    const width = y[key].length / 150;
    for (let i = 40 * width; i < 110 * width; i++) y[key][i] = y[key][i]! * -1.5 + 0.25;
  }
  const b = await runAttention(dev, s, y, rng);
  for (const key of ['out', 'dq', 'dk', 'dv'] as const) {
    const width = a[key].length / 150;
    const [lo, hi] = [40 * width, 110 * width];
    t.ok(
      sameBits(b[key].subarray(0, lo), a[key].subarray(0, lo)) && sameBits(b[key].subarray(hi), a[key].subarray(hi)),
      `${key}: rows outside sequence 1 unchanged, bitwise`,
    );
    t.notOk(sameBits(b[key].subarray(lo, hi), a[key].subarray(lo, hi)), `${key}: sequence 1 did change`);
  }
  const lseOutside = (arr: Float32Array) =>
    Float32Array.from(Array.from(arr).filter((_, i) => i % 150 < 40 || i % 150 >= 110));
  t.ok(sameBits(lseOutside(b.lse), lseOutside(a.lse)), 'lse outside sequence 1 unchanged, bitwise');
});

t.test('bad arguments are Errors naming the argument', async (t) => {
  const dev = cpuDevice(1);
  const rng = new Rng(17, 'attn-bad');
  const n = 6,
    hq = 4,
    hkv = 2,
    d = 8;
  const f = (shape: number[]) => randomTensor(dev, rng, shape);
  const q = f([n, hq * d]),
    k = f([n, hkv * d]),
    v = f([n, hkv * d]);
  const out = f([n, hq * d]),
    lse = f([hq, n]),
    dout = f([n, hq * d]);
  const dq = f([n, hq * d]),
    dk = f([n, hkv * d]),
    dv = f([n, hkv * d]);
  const cuSeqlens = dev.fromArray('i32', [3], new Int32Array([0, 2, 6]));
  const cu = (a: number[]) => dev.fromArray('i32', [a.length], Int32Array.from(a));
  const fwd = { op: 'attention_forward', out, lse, q, k, v, cuSeqlens, heads: hq, kvHeads: hkv } as const;
  const bwd = {
    op: 'attention_backward',
    dq,
    dk,
    dv,
    dout,
    q,
    k,
    v,
    out,
    lse,
    cuSeqlens,
    heads: hq,
    kvHeads: hkv,
  } as const;
  await dev.run([fwd, bwd]); // the good call works
  const cases: Array<[object, Record<string, unknown>, RegExp]> = [
    [fwd, { heads: 0 }, /argument 'heads' must be positive/],
    [fwd, { kvHeads: 3 }, /argument 'kvHeads' \(3\) must divide 'heads' \(4\)/],
    [fwd, { kvHeads: undefined }, /argument 'kvHeads' must be a number/],
    [fwd, { q: f([n, hq * d + 1]) }, /argument 'q' has shape \[6,33\]: its width is not a multiple of 4 heads/],
    [fwd, { k: f([n, hkv * d * 2]) }, /argument 'k' has shape \[6,32\], expected \[6, 2·8\]/],
    [fwd, { v: f([n - 1, hkv * d]) }, /argument 'v' has shape \[5,16\]/],
    [fwd, { v: dev.alloc('i32', [n, hkv * d]) }, /argument 'v' has dtype i32, expected f32/],
    [fwd, { lse: f([n, hq]) }, /argument 'lse' has shape \[6,4\], expected \[4,6\]/],
    [fwd, { out: f([n, hkv * d]) }, /argument 'out' has shape \[6,16\]/],
    [fwd, { out: q }, /arguments 'out' and 'q' overlap/],
    [fwd, { scale: -1 }, /argument 'scale' must be positive/],
    [
      fwd,
      { cuSeqlens: dev.fromArray('f32', [3], new Float32Array([0, 2, 6])) },
      /argument 'cuSeqlens' has dtype f32, expected i32/,
    ],
    [fwd, { cuSeqlens: dev.alloc('i32', [0]) }, /argument 'cuSeqlens' must be 1-D \[nseq\+1\]/],
    [fwd, { cuSeqlens: cu([0, 2, 5]) }, /argument 'cuSeqlens' must end at n = 6 \(the rows of q\), got 5/],
    [fwd, { cuSeqlens: cu([0, 4, 2, 6]) }, /argument 'cuSeqlens' must be non-decreasing/],
    [fwd, { cuSeqlens: cu([1, 6]) }, /argument 'cuSeqlens' must start at 0/],
    [bwd, { cuSeqlens: cu([0, 7]) }, /argument 'cuSeqlens' must end at n = 6/],
    [bwd, { dout: undefined }, /argument 'dout' is missing/],
    [bwd, { dq: q }, /arguments 'dq' and 'q' overlap/],
    [bwd, { dk: dv }, /arguments 'dk' and 'dv' overlap/],
    [bwd, { dv: f([n, hq * d]) }, /argument 'dv' has shape \[6,32\]/],
    [bwd, { lse: f([hq, n + 1]) }, /argument 'lse' has shape \[4,7\], expected \[4,6\]/],
  ];
  for (const [base, patch, re] of cases) {
    const op = { ...base, ...patch };
    t.throws(() => dev.runSync([op as never]), re, String(re));
    await t.rejects(async () => dev.run([op as never]), re); // parse errors throw synchronously inside run()
  }
});
