// What the attention tests (attention.test.ts, attention-window.test.ts) share: the problem
// shape, seeded inputs, one forward + backward on a device, the tolerances of a float32
// kernel against a float64 reference (not a test file itself).
import type { Rng } from '../../lib/rng.js';
import { readF32, type Device, type Tensor } from '../../lib/tensor.js';
import { randn, type Tolerance } from '../support/helpers.js';

/** Varlen GQA attention: sequence boundaries `cu`, query and kv heads, head dim; optional scale and window. */
export interface AttentionCase {
  cu: number[];
  hq: number;
  hkv: number;
  d: number;
  scale?: number;
  /** undefined: the argument is left out (0 also means no sliding window). */
  window?: number;
}

export type Inputs = Record<'q' | 'k' | 'v' | 'dout', Float32Array>;
export type Outputs = Record<'out' | 'lse' | 'dq' | 'dk' | 'dv', Float32Array>;
export const OUTPUTS = ['out', 'lse', 'dq', 'dk', 'dv'] as const;

/** N(0, 1) inputs; q and k scaled by `qkScale` (a large one makes the logits extreme). */
export function attentionInputs(c: AttentionCase, rng: Rng, qkScale = 1): Inputs {
  const n = c.cu[c.cu.length - 1]!;
  return {
    q: randn(rng, n * c.hq * c.d, qkScale),
    k: randn(rng, n * c.hkv * c.d, qkScale),
    v: randn(rng, n * c.hkv * c.d),
    dout: randn(rng, n * c.hq * c.d),
  };
}

/** An f32 tensor of N(0, std²) values. */
export function randomTensor(dev: Device, rng: Rng, shape: number[], std = 1): Tensor {
  return dev.fromArray(
    'f32',
    shape,
    randn(
      rng,
      shape.reduce((a, b) => a * b, 1),
      std,
    ),
  );
}

/** Forward then backward on the device. The outputs start as random junk: they must be written (=). */
export async function runAttention(dev: Device, c: AttentionCase, x: Inputs, rng: Rng): Promise<Outputs> {
  const n = c.cu[c.cu.length - 1]!;
  const { hq, hkv, d } = c;
  const f = (shape: number[], data: Float32Array) => dev.fromArray('f32', shape, data);
  const junk = (shape: number[]) => randomTensor(dev, rng, shape, 3);
  const q = f([n, hq * d], x.q),
    k = f([n, hkv, d], x.k),
    v = f([n, hkv * d], x.v),
    dout = f([n, hq, d], x.dout);
  const cuSeqlens = dev.fromArray('i32', [c.cu.length], Int32Array.from(c.cu));
  const out = junk([n, hq * d]),
    lse = junk([hq, n]);
  const dq = junk([n, hq * d]),
    dk = junk([n, hkv * d]),
    dv = junk([n, hkv * d]);
  const common = {
    cuSeqlens,
    heads: hq,
    kvHeads: hkv,
    ...(c.scale !== undefined ? { scale: c.scale } : {}),
    ...(c.window !== undefined ? { window: c.window } : {}),
  };
  await dev.run([
    { op: 'attention_forward', out, lse, q, k, v, ...common },
    { op: 'attention_backward', dq, dk, dv, dout, q, k, v, out, lse, ...common },
  ]);
  const res = { out: readF32(out), lse: readF32(lse), dq: readF32(dq), dk: readF32(dk), dv: readF32(dv) };
  for (const tt of [q, k, v, dout, cuSeqlens, out, lse, dq, dk, dv] as Tensor[]) tt.free();
  return res;
}

/**
 * A tolerance relative to the reference's largest magnitude (gradients sum many terms of mixed
 * sign, so a per-element relative error means nothing where a sum cancels), at least `floor`.
 */
export function scaled(want: Float64Array, rel: number, rtol: number, floor = 0): Tolerance {
  let mx = 0;
  for (const w of want) mx = Math.max(mx, Math.abs(w));
  return { atol: Math.max(rel * mx, floor), rtol };
}

// Tolerances (float32 kernel vs float64 reference, inputs N(0,1)):
//  out: a convex combination of v rows; error is a few ulps of the exp (~2 ulp polynomial)
//       times |v| plus float32 accumulation over ≤ 150 keys: ~1e-6, bound 2e-5 abs + 1e-4 rel.
//  lse: float32 rounding of a value ~1..5: bound 1e-5 abs + 1e-5 rel.
//  dq/dk/dv: sums of up to T·group float32 products of O(1) terms: bound GRAD_REL of the
//       tensor's largest magnitude plus 1e-3 relative.
export const TOL_OUT = { atol: 2e-5, rtol: 1e-4 };
export const TOL_LSE = { atol: 1e-5, rtol: 1e-5 };
export const GRAD_REL = 2e-5;
