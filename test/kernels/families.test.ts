// The ops the model families add over plain LLaMA, each against a float64 reference:
//  - add_bias (Qwen2's frozen q/k/v biases): y[*, m] += b[m], f32/bf16/f16 biases; no backward
//    op (a frozen bias passes dy through unchanged), which the composed check below confirms.
//  - Qwen3's q_norm / k_norm: rmsnorm_forward / rmsnorm_backward over a [n, heads, head_dim]
//    view with a [head_dim] weight, then RoPE, forward and backward against a float64 per-head
//    RMSNorm + rotate_half RoPE, and finite differences of that reference.
import t from 'tap';
import { Rng } from '../../lib/rng.js';
import { ropeTables } from '../../lib/model/rope.js';
import { assertClose, cpuDevice, randn } from '../support/helpers.js';
import { expectRefused, f32, finiteDiff, i32, read, stored } from './util.js';

const d = cpuDevice(2);

t.test('add_bias vs float64, for f32, bf16 and f16 biases, with an extreme range', async (t) => {
  const rng = new Rng(31, 'add-bias');
  const n = 37,
    m = 72;
  for (const dtype of ['f32', 'bf16', 'f16'] as const) {
    for (const mag of [1, 1e30]) {
      const y0 = randn(rng, n * m, mag);
      const { tensor: b, values: bv } = stored(d, dtype, [m], randn(rng, m, dtype === 'f16' ? 100 : mag));
      const y = f32(d, [n, m], y0);
      await d.run([{ op: 'add_bias', y, b }]);
      const want = Float64Array.from(y0, (v, i) => v + bv[i % m]!);
      // one float32 rounding of the sum
      assertClose(t, read(y), want, { atol: 0, rtol: 6e-8 }, `${dtype} bias, |y| ~ ${mag}`);
      y.free();
      b.free();
    }
  }
  // a 3-D activation ([n, heads, d]) with the bias over its last dimension only
  const y3 = f32(d, [4, 2, 3], new Float32Array(24));
  await d.run([{ op: 'add_bias', y: y3, b: f32(d, [3], [1, 2, 3]) }]);
  t.same(
    Array.from(read(y3)),
    Array.from({ length: 24 }, (_, i) => (i % 3) + 1),
    'rows of a 3-D tensor: bias along the last dimension',
  );
  await expectRefused(
    t,
    d,
    [{ op: 'add_bias', y: f32(d, [4, 5], new Float32Array(20)), b: f32(d, [4], new Float32Array(4)) }],
    /argument 'y' has shape \[4,5\], expected \[\*, 4\] \(m from b\)/,
  );
  await expectRefused(
    t,
    d,
    [{ op: 'add_bias', y: f32(d, [4, 4], new Float32Array(16)), b: f32(d, [2, 2], new Float32Array(4)) }],
    /argument 'b' must be 1-D \[m\]/,
  );
});

/** float64 Qwen3 q path: per head y = rope(w · x / rms(x)); returns y for rows [n, heads·hd]. */
function qkNormRopeRef(
  x: ArrayLike<number>,
  w: ArrayLike<number>,
  pos: number[],
  inv: Float32Array,
  heads: number,
  hd: number,
  eps: number,
): Float64Array {
  const n = pos.length,
    half = hd / 2;
  const y = new Float64Array(n * heads * hd);
  for (let r = 0; r < n; r++)
    for (let h = 0; h < heads; h++) {
      const o = (r * heads + h) * hd;
      let ss = 0;
      for (let c = 0; c < hd; c++) ss += x[o + c]! ** 2;
      const rs = 1 / Math.sqrt(ss / hd + eps);
      const z = Array.from({ length: hd }, (_, c) => x[o + c]! * rs * w[c]!);
      for (let i = 0; i < half; i++) {
        // the angle as the tables round it (float32 product), then cos/sin in double
        const a = Math.fround(pos[r]! * inv[i]!),
          co = Math.cos(a),
          si = Math.sin(a);
        y[o + i] = z[i]! * co - z[i + half]! * si;
        y[o + i + half] = z[i + half]! * co + z[i]! * si;
      }
    }
  return y;
}

t.test('q/k norm (RMSNorm per head over head_dim) then RoPE: forward and backward vs float64', async (t) => {
  const rng = new Rng(32, 'qk-norm');
  const n = 19,
    heads = 3,
    hd = 32,
    eps = 1e-6,
    theta = 1e6;
  const pos = Array.from({ length: n }, (_, i) => (i * 7) % 50);
  const { cos, sin } = ropeTables(theta, hd, 64);
  const inv = Float32Array.from({ length: hd / 2 }, (_, i) =>
    Math.fround(1 / Math.fround(Math.pow(theta, Math.fround((2 * i) / hd)))),
  );
  for (const mag of [1, 1e-3, 1e4]) {
    const x = randn(rng, n * heads * hd, mag);
    const w = Float32Array.from(randn(rng, hd, 0.3), (v) => 1 + v);
    const dy = randn(rng, n * heads * hd);
    const xt = f32(d, [n, heads * hd], x),
      wt = f32(d, [hd], w),
      dyt = f32(d, [n, heads * hd], dy);
    const y = d.alloc('f32', [n, heads * hd]),
      rstd = d.alloc('f32', [n * heads]),
      dx = d.alloc('f32', [n, heads * hd]);
    const g = d.alloc('f32', [n, heads * hd]);
    const posT = i32(d, [n], pos),
      cosT = f32(d, [64, hd / 2], cos),
      sinT = f32(d, [64, hd / 2], sin);
    const x3 = xt.reshape([n, heads, hd]),
      y3 = y.reshape([n, heads, hd]),
      g3 = g.reshape([n, heads, hd]),
      dx3 = dx.reshape([n, heads, hd]);
    await d.run([
      { op: 'rmsnorm_forward', y: y3, rstd, x: x3, w: wt, eps },
      { op: 'rope_forward', y, x: y, pos: posT, cos: cosT, sin: sinT, heads },
      { op: 'copy', y: g, x: dyt },
      { op: 'rope_backward', dx: g, dy: g, pos: posT, cos: cosT, sin: sinT, heads },
      { op: 'rmsnorm_backward', dx: dx3, dy: g3, x: x3, w: wt, rstd },
    ]);
    const want = qkNormRopeRef(x, w, pos, inv, heads, hd, eps);
    assertClose(t, read(y), want, { atol: 1e-6, rtol: 2e-5 }, `forward, |x| ~ ${mag}`);
    // d(Σ dy·y)/dx by central differences of the float64 reference (on a copy in double)
    const L = (xx: Float64Array) =>
      qkNormRopeRef(xx, w, pos, inv, heads, hd, eps).reduce((a, v, i) => a + v * dy[i]!, 0);
    const fd = finiteDiff(L, x, 1e-6 * mag);
    let scale = 0;
    for (const v of fd) scale = Math.max(scale, Math.abs(v));
    // the gradient is O(1/|x|): compared relative to its largest element
    assertClose(t, read(dx), fd, { atol: 2e-5 * scale, rtol: 1e-4 }, `backward vs finite differences, |x| ~ ${mag}`);
    for (const tt of [xt, wt, dyt, y, rstd, dx, g, posT, cosT, sinT, x3, y3, g3, dx3]) tt.free();
  }
});
