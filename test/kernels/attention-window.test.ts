// Sliding-window attention (Mistral, windowed Qwen layers): the trailing `window` argument of
// attention_forward, attention_backward and attention_decode. Query i of a sequence sees keys
// j with i - W < j <= i (transformers' sliding-window mask). Checked against a float64
// reference that builds each row's visible keys from that definition, with windows shorter
// than, equal to and longer than the 64-row key tiles (so whole tiles are skipped), both
// backward schedules (many short sequences / few long ones), an extreme logit range, window 0
// = no window bitwise, and the decode op against the full forward.
import t from 'tap';
import { Rng } from '../../lib/rng.js';
import { readF32, type Device } from '../../lib/tensor.js';
import { assertClose, cpuDevice, randn } from '../support/helpers.js';
import { assertBitwise, CPU_KERNELS, expectRefused, withKernel } from './util.js';
import {
  attentionInputs,
  GRAD_REL,
  OUTPUTS,
  randomTensor,
  runAttention,
  scaled,
  TOL_OUT,
  TOL_LSE,
  type AttentionCase,
  type Inputs,
} from './attention-util.js';

type Case = AttentionCase & { window: number };

/** Keys row i of a sequence sees: [lo, i]. */
const visibleFrom = (i: number, w: number) => (w > 0 ? Math.max(0, i - w + 1) : 0);

/** float64 forward and analytic backward, one (sequence, head, query row) at a time. */
function reference(c: Case, x: Inputs) {
  const { cu, hq, hkv, d, window } = c;
  const n = cu[cu.length - 1]!,
    group = hq / hkv,
    scale = 1 / Math.sqrt(d);
  const out = new Float64Array(n * hq * d),
    lse = new Float64Array(hq * n);
  const dq = new Float64Array(n * hq * d),
    dk = new Float64Array(n * hkv * d),
    dv = new Float64Array(n * hkv * d);
  const dotq = (a: Float32Array, ai: number, b: Float32Array, bi: number) => {
    let s = 0;
    for (let e = 0; e < d; e++) s += a[ai + e]! * b[bi + e]!;
    return s;
  };
  for (let s = 0; s + 1 < cu.length; s++) {
    const r0 = cu[s]!,
      T = cu[s + 1]! - r0;
    for (let h = 0; h < hq; h++) {
      const g = Math.floor(h / group);
      for (let i = 0; i < T; i++) {
        const qi = ((r0 + i) * hq + h) * d,
          lo = visibleFrom(i, window);
        const kj = (j: number) => ((r0 + j) * hkv + g) * d;
        const sc: number[] = [];
        for (let j = lo; j <= i; j++) sc.push(scale * dotq(x.q, qi, x.k, kj(j)));
        const mx = Math.max(...sc);
        const sum = sc.reduce((a, v) => a + Math.exp(v - mx), 0);
        lse[h * n + r0 + i] = mx + Math.log(sum);
        const p = sc.map((v) => Math.exp(v - mx) / sum);
        for (let j = lo; j <= i; j++) for (let e = 0; e < d; e++) out[qi + e]! += p[j - lo]! * x.v[kj(j) + e]!;
        // dS_j = p_j (dP_j − Σ p dP), dP_j = dout·v_j
        const dP = p.map((_, jj) => dotq(x.dout, qi, x.v, kj(lo + jj)));
        const rs = p.reduce((a, pj, jj) => a + pj * dP[jj]!, 0);
        for (let j = lo; j <= i; j++) {
          const pj = p[j - lo]!,
            ds = pj * (dP[j - lo]! - rs);
          for (let e = 0; e < d; e++) {
            dv[kj(j) + e]! += pj * x.dout[qi + e]!;
            dq[qi + e]! += scale * ds * x.k[kj(j) + e]!;
            dk[kj(j) + e]! += scale * ds * x.q[qi + e]!;
          }
        }
      }
    }
  }
  return { out, lse, dq, dk, dv };
}

/** Forward + backward with the case's window (undefined: the argument left out). */
const run = (dev: Device, c: Case, x: Inputs, window: number | undefined, rng: Rng) =>
  runAttention(dev, { ...c, window }, x, rng);

/**
 * The floor 2e-6 is for window 1, where dq = dk = 0 exactly (p = 1, dS = p·(dP − D) with D =
 * dP) and float32 leaves the rounding of dP − D, ~d·ε·|dout|·|v| ≈ 1e-6.
 */
const gradTol = (want: Float64Array, rel: number) => scaled(want, rel, 1e-3, 2e-6);

const cases: Array<[string, Case]> = [
  ['window 8 < tile, one sequence of 150, GQA 2', { cu: [0, 150], hq: 4, hkv: 2, d: 16, window: 8 }],
  ['window 64 = tile, sequences 0..200 long', { cu: [0, 1, 65, 65, 265, 330], hq: 2, hkv: 1, d: 32, window: 64 }],
  ['window 100 (spans two tiles, whole tiles skipped), d 20', { cu: [0, 300, 310], hq: 3, hkv: 3, d: 20, window: 100 }],
  ['window 1 (each row sees itself only)', { cu: [0, 5, 80], hq: 2, hkv: 2, d: 8, window: 1 }],
  ['window longer than every sequence', { cu: [0, 40, 100], hq: 4, hkv: 2, d: 16, window: 500 }],
];

for (const [name, c] of cases) {
  t.test(`forward and backward vs float64: ${name}`, async (t) => {
    const x = attentionInputs(c, new Rng(21, 'attn-window', name));
    const ref = reference(c, x);
    // 1 thread: one item per (sequence, kv head); 8 threads and few long sequences: the two-pass
    // schedule. Every instruction-set path this CPU has (MLORA_GEMM_KERNEL, read at each call).
    for (const kernel of CPU_KERNELS) {
      let first: Awaited<ReturnType<typeof run>> | undefined;
      for (const threads of [1, 8]) {
        const got = await withKernel(kernel, () => run(cpuDevice(threads), c, x, c.window, new Rng(22, threads)));
        const at = `(${kernel}, ${threads} threads)`;
        assertClose(t, got.out, ref.out, TOL_OUT, `out ${at}`);
        assertClose(t, got.lse, ref.lse, TOL_LSE, `lse ${at}`);
        for (const g of ['dq', 'dk', 'dv'] as const)
          assertClose(t, got[g], ref[g], gradTol(ref[g], GRAD_REL), `${g} ${at}`);
        if (!first) first = got;
        else for (const key of OUTPUTS) assertBitwise(t, got[key], first[key], `${key}: 8 threads == 1 thread ${at}`);
      }
    }
  });
}

t.test('window 0 and a window past every sequence are the plain causal attention, bitwise', async (t) => {
  const c: Case = { cu: [0, 70, 200], hq: 4, hkv: 2, d: 16, window: 0 };
  const x = attentionInputs(c, new Rng(23, 'attn-window-0'));
  const dev = cpuDevice(2);
  const none = await run(dev, c, x, undefined, new Rng(1));
  const zero = await run(dev, c, x, 0, new Rng(2));
  const wide = await run(dev, c, x, 130, new Rng(3));
  for (const key of OUTPUTS) {
    assertBitwise(t, zero[key], none[key], `${key}: window 0 == no window argument`);
    assertBitwise(t, wide[key], none[key], `${key}: window 130 >= the longest sequence == no window`);
  }
});

t.test('extreme range: q, k scaled by 30, window 24, stays finite and accurate', async (t) => {
  const c: Case = { cu: [0, 3, 140], hq: 4, hkv: 2, d: 16, window: 24 };
  const x = attentionInputs(c, new Rng(24, 'attn-window-extreme'), 30);
  const ref = reference(c, x);
  const got = await run(cpuDevice(2), c, x, c.window, new Rng(4));
  for (const key of OUTPUTS) t.ok(got[key].every(Number.isFinite), `${key} finite`);
  // scores ~1000 carry float32 rounding ~1e-4·√d: see attention.test.ts
  assertClose(t, got.out, ref.out, { atol: 2e-3, rtol: 2e-3 }, 'out');
  assertClose(t, got.lse, ref.lse, { atol: 1e-4, rtol: 1e-5 }, 'lse');
  for (const g of ['dq', 'dk', 'dv'] as const) assertClose(t, got[g], ref[g], gradTol(ref[g], 2e-3), g);
});

t.test('attention_decode with a window equals the windowed forward, row by row', async (t) => {
  const dev = cpuDevice(2);
  const rng = new Rng(25, 'attn-window-decode');
  const T = 90,
    hq = 4,
    hkv = 2,
    d = 16;
  for (const window of [0, 1, 7, 64, 200]) {
    const c: Case = { cu: [0, T], hq, hkv, d, window };
    const x = attentionInputs(c, rng);
    const ref = reference(c, x);
    const kc = dev.fromArray('f32', [T + 5, hkv * d], Float32Array.from([...x.k, ...randn(rng, 5 * hkv * d)]));
    const vc = dev.fromArray('f32', [T + 5, hkv * d], Float32Array.from([...x.v, ...randn(rng, 5 * hkv * d)]));
    // the last 3 positions at once (a prefill's tail), then position 40 alone
    for (const [from, to] of [
      [T - 3, T],
      [40, 41],
    ] as const) {
      const q = dev.fromArray('f32', [to - from, hq * d], x.q.subarray(from * hq * d, to * hq * d));
      const out = dev.fromArray('f32', [to - from, hq * d], randn(rng, (to - from) * hq * d, 3));
      await dev.run([
        { op: 'attention_decode', out, q, kCache: kc, vCache: vc, length: to, heads: hq, kvHeads: hkv, window },
      ]);
      assertClose(
        t,
        readF32(out),
        ref.out.subarray(from * hq * d, to * hq * d),
        TOL_OUT,
        `window ${window}: positions ${from}..${to - 1}`,
      );
      q.free();
      out.free();
    }
    kc.free();
    vc.free();
  }
});

t.test('a negative window is refused, naming the argument', async (t) => {
  const dev = cpuDevice(1);
  const rng = new Rng(26, 'attn-window-bad');
  const f = (shape: number[]) => randomTensor(dev, rng, shape);
  const q = f([6, 32]),
    k = f([6, 16]),
    v = f([6, 16]),
    out = f([6, 32]),
    lse = f([4, 6]),
    dout = f([6, 32]);
  const dq = f([6, 32]),
    dk = f([6, 16]),
    dv = f([6, 16]);
  const cuSeqlens = dev.fromArray('i32', [2], new Int32Array([0, 6]));
  const re = /argument 'window' must be >= 0 \(0 = no sliding window\), got -1/;
  await expectRefused(
    t,
    dev,
    [{ op: 'attention_forward', out, lse, q, k, v, cuSeqlens, heads: 4, kvHeads: 2, window: -1 }],
    re,
  );
  await expectRefused(
    t,
    dev,
    [{ op: 'attention_backward', dq, dk, dv, dout, q, k, v, out, lse, cuSeqlens, heads: 4, kvHeads: 2, window: -1 }],
    re,
  );
  await expectRefused(
    t,
    dev,
    [{ op: 'attention_decode', out, q, kCache: k, vCache: v, length: 6, heads: 4, kvHeads: 2, window: -1 }],
    re,
  );
  await expectRefused(
    t,
    dev,
    [{ op: 'attention_forward', out, lse, q, k, v, cuSeqlens, heads: 4, kvHeads: 2, window: 2.5 }],
    /window/,
  );
});
