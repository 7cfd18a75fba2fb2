// The CUDA backend. Always: the build says whether it compiled CUDA (native/build/cuda.txt,
// written by CMake) and the addon agrees; opening a CUDA device with no GPU is a clear Error.
// On a GPU: every CUDA kernel against the CPU kernel (the oracle) on the same fresh random
// inputs, forward and backward, with stated tolerances per precision, plus cuBLAS against our
// fallback GEMM. Where no GPU is present those tests are skipped with the reason printed (in a
// device-check rehearsal a second CPU device stands in for the GPU: test/cuda/target.ts). And
// always: every op the addon exports is covered here or named as CPU-only, so a new kernel
// family cannot land without its CUDA-vs-CPU test. That coverage check is why this is one file
// though long: it compares the addon's op list with the cases written here.
//
// Tolerances (max |cuda - cpu| ≤ atol + rtol·|cpu|):
//   f32 elementwise kernels            atol 1e-6, rtol 1e-5 (same formula, maybe fused FMAs)
//   reductions (rmsnorm, softmax, ...)  atol 1e-5, rtol 1e-4 (different summation order)
//   f32 GEMM (exact f32 compute)       atol 1e-4·√k, rtol 1e-4
//   bf16/f16 weights through cuBLAS    atol 8e-3·√k·|a|·|b|, rtol 2e-2: cuBLAS rounds the f32
//                                      activations to the weights' 16-bit type (f32 accumulation)
import { existsSync, readFileSync } from 'node:fs';
import path from 'node:path';
import t from 'tap';
import type { Test } from 'tap';
import { addonPath, native, type DType, type NativeDevice, type Op, type Tensor } from '../../lib/native.js';
import { Rng } from '../../lib/rng.js';
import { openDevice } from '../../lib/tensor.js';
import { assertClose, type Tolerance } from '../support/helpers.js';
import { gpuLabel, gpuSpec, noGpu, realGpu } from './target.js';

const info = native().info();
if (noGpu) t.comment(`CUDA kernel tests skipped: ${noGpu}`);
else t.comment(`CUDA kernel tests: CPU vs ${gpuLabel}`);

const marker = path.resolve(path.dirname(addonPath()), '..', 'cuda.txt');
t.test(
  'the addon reports what the build compiled',
  { skip: existsSync(marker) ? false : `no build marker at ${marker} (addon built elsewhere)` },
  async (t) => {
    t.type(info.cuda.compiled, 'boolean');
    t.type(info.cuda.gemm, 'string');
    const text = readFileSync(marker, 'utf8');
    if (text.startsWith('compiled')) {
      t.equal(
        info.cuda.compiled,
        true,
        `nvcc was present at build time (${text.trim()}): the CUDA backend is compiled in`,
      );
      t.match(info.cuda.gemm, /^(cublas|fallback)/, `gemm: ${info.cuda.gemm}`);
    } else {
      t.equal(info.cuda.compiled, false, `the build had no CUDA (${text.trim()})`);
    }
  },
);

t.test(
  'a CUDA device without a GPU is a clear Error, never a crash',
  { skip: info.cuda.devices > 0 ? 'a GPU is present' : false },
  async (t) => {
    t.match(info.cuda.reason, /\w/, `reason: ${info.cuda.reason}`);
    t.throws(() => openDevice('cuda:0'), /device cuda:0 is not available: .+/);
    t.throws(() => openDevice('cuda:3'), /device cuda:3 is not available/);
    t.equal(info.cuda.devices, 0);
  },
);

// ------------------------------------------------------------------------------------------
// GPU branch: CUDA vs CPU

type Arr = Float32Array | Int32Array | Uint16Array | Uint8Array;
interface Input {
  dtype: DType;
  shape: number[];
  data: Arr;
}

function f32(shape: number[], rng: Rng, std = 1): Input {
  const n = shape.reduce((a, b) => a * b, 1);
  return { dtype: 'f32', shape, data: rng.fillNormal(new Float32Array(n), std) };
}
function i32(shape: number[], values: number[]): Input {
  return { dtype: 'i32', shape, data: Int32Array.from(values) };
}
function toBits(x: Float32Array, dtype: 'bf16' | 'f16'): Uint16Array {
  const out = new Uint16Array(x.length);
  const f = new Float32Array(1);
  const u = new Uint32Array(f.buffer);
  for (let i = 0; i < x.length; i++) {
    f[0] = x[i]!;
    if (dtype === 'bf16') {
      const v = u[0]!;
      out[i] = (v + 0x7fff + ((v >>> 16) & 1)) >>> 16;
    } else {
      out[i] = f16bits(x[i]!);
    }
  }
  return out;
}
function f16bits(v: number): number {
  // Round to nearest f16 through a Float32 (values in the tests are well inside f16 range).
  const f = new Float32Array([v]);
  const u = new Uint32Array(f.buffer)[0]!;
  const sign = (u >>> 16) & 0x8000;
  const exp = ((u >>> 23) & 0xff) - 127 + 15;
  const mant = u & 0x7fffff;
  if (exp <= 0) return sign;
  if (exp >= 31) return sign | 0x7c00;
  let h = sign | (exp << 10) | (mant >>> 13);
  const rem = mant & 0x1fff;
  if (rem > 0x1000 || (rem === 0x1000 && h & 1)) h++;
  return h;
}
function weight(shape: number[], rng: Rng, dtype: DType, std = 1): Input {
  const x = f32(shape, rng, std);
  if (dtype === 'f32') return x;
  return { dtype, shape, data: toBits(x.data as Float32Array, dtype as 'bf16' | 'f16') };
}

const opened: { cpu?: NativeDevice; cuda?: NativeDevice; fallback?: NativeDevice } = {};
function devices() {
  opened.cpu ??= openDevice('cpu:0', { threads: 2, budget: 2 ** 31 });
  opened.cuda ??= openDevice(gpuSpec, { threads: 2, budget: 2 ** 32 });
  return opened as { cpu: NativeDevice; cuda: NativeDevice };
}
function fallbackDevice(): NativeDevice {
  if (!opened.fallback) {
    const prev = process.env.MLORA_CUDA_GEMM;
    process.env.MLORA_CUDA_GEMM = 'fallback'; // read when the device is opened
    try {
      opened.fallback = openDevice('cuda:0', { budget: 2 ** 31 });
    } finally {
      if (prev === undefined) delete process.env.MLORA_CUDA_GEMM;
      else process.env.MLORA_CUDA_GEMM = prev;
    }
  }
  return opened.fallback;
}

function upload(dev: NativeDevice, inputs: Record<string, Input>): Record<string, Tensor> {
  const out: Record<string, Tensor> = {};
  for (const [k, v] of Object.entries(inputs)) out[k] = dev.fromArray(v.dtype, v.shape, v.data.slice());
  return out;
}

/** Runs the same ops on two devices from the same inputs; returns the named outputs of both. */
async function runOn(
  devs: NativeDevice[],
  inputs: Record<string, Input>,
  ops: (x: Record<string, Tensor>) => Op[],
  outputs: string[],
): Promise<Arr[][]> {
  const res: Arr[][] = [];
  for (const d of devs) {
    const x = upload(d, inputs);
    await d.run(ops(x));
    res.push(outputs.map((o) => x[o]!.read()));
    for (const v of Object.values(x)) v.free();
  }
  return res;
}

async function compare(
  t: Test,
  inputs: Record<string, Input>,
  ops: (x: Record<string, Tensor>) => Op[],
  outputs: Record<string, Tolerance>,
  label: string,
  devs?: NativeDevice[],
) {
  const { cpu, cuda } = devices();
  const names = Object.keys(outputs);
  const [want, got] = await runOn(devs ?? [cpu, cuda], inputs, ops, names);
  names.forEach((n, i) => assertClose(t, got![i]!, want![i]!, outputs[n]!, `${label}: ${n}`));
}

const hasOp = (name: string) => info.ops.includes(name);
const covered = new Set<string>();
function gpuTest(name: string, ops: string[], fn: (t: Test) => Promise<void>, extraSkip: string | false = false) {
  for (const o of ops) covered.add(o);
  const missing = ops.filter((o) => !hasOp(o));
  const skip = noGpu || (missing.length ? `op(s) ${missing.join(', ')} not in this build yet` : false) || extraSkip;
  t.test(name, { skip }, fn);
}

const EW: Tolerance = { atol: 1e-6, rtol: 1e-5 };
const RED: Tolerance = { atol: 1e-5, rtol: 1e-4 };
const gemmTol = (k: number, dtype: DType, scale = 1): Tolerance =>
  dtype === 'f32'
    ? { atol: 1e-4 * Math.sqrt(k) * scale, rtol: 1e-4 }
    : { atol: 8e-3 * Math.sqrt(k) * scale, rtol: 2e-2 };

gpuTest(
  'util: fill, copy with casts, axpy, scale, sumsq, nonfinite',
  ['fill', 'copy', 'axpy', 'scale', 'sumsq', 'nonfinite'],
  async (t) => {
    const rng = new Rng(801);
    const x = f32([1000, 37], rng, 3);
    const y = f32([1000, 37], rng);
    await compare(
      t,
      { x, y },
      (T) => [
        { op: 'axpy', y: T.y!, x: T.x!, alpha: -0.75 },
        { op: 'scale', y: T.y!, alpha: 1.5 },
      ],
      { y: EW },
      'axpy+scale',
    );
    for (const dt of ['bf16', 'f16', 'i32'] as DType[]) {
      const dst: Input =
        dt === 'i32'
          ? i32([1000, 37], new Array(37000).fill(0))
          : { dtype: dt, shape: [1000, 37], data: new Uint16Array(37000) };
      await compare(
        t,
        { x, dst },
        (T) => [{ op: 'copy', y: T.dst!, x: T.x! }],
        { dst: { atol: 0, rtol: 0 } },
        `copy f32->${dt} (bit-exact)`,
      );
    }
    const w = weight([333], rng, 'bf16');
    await compare(
      t,
      { w, y: f32([333], rng) },
      (T) => [{ op: 'copy', y: T.y!, x: T.w! }],
      { y: { atol: 0, rtol: 0 } },
      'copy bf16->f32',
    );
    await compare(
      t,
      { w, y: f32([333], rng) },
      (T) => [{ op: 'fill', y: T.y!, value: 0.3 }],
      { y: { atol: 0, rtol: 0 } },
      'fill',
    );
    const big = f32([1 << 20], rng);
    const out = { dtype: 'f32' as DType, shape: [1], data: new Float32Array([2.5]) };
    await compare(
      t,
      { a: x, b: big, c: f32([5], rng), out },
      (T) => [{ op: 'sumsq', out: T.out!, xs: [T.a!, T.b!, T.c!] }],
      { out: { atol: 0, rtol: 1e-5 } },
      'sumsq over 3 tensors (+=)',
    );
    const bad = f32([5000], rng);
    (bad.data as Float32Array)[17] = NaN;
    (bad.data as Float32Array)[4000] = -Infinity;
    (bad.data as Float32Array)[4999] = Infinity;
    await compare(
      t,
      { bad, out },
      (T) => [{ op: 'nonfinite', out: T.out!, x: T.bad! }],
      { out: { atol: 0, rtol: 0 } },
      'nonfinite counts NaN/Inf',
    );
  },
);

gpuTest('gemm: every transpose, f32/bf16/f16 B, alpha/beta, odd shapes', ['gemm'], async (t) => {
  const rng = new Rng(802);
  for (const dtype of ['f32', 'bf16', 'f16'] as DType[])
    for (const [ta, tb] of [
      [false, false],
      [false, true],
      [true, false],
      [true, true],
    ] as const) {
      const m = 67,
        n = 45,
        k = 130;
      const a = f32(ta ? [k, m] : [m, k], rng);
      const b = weight(tb ? [n, k] : [k, n], rng, dtype);
      const c = f32([m, n], rng);
      await compare(
        t,
        { a, b, c },
        (T) => [{ op: 'gemm', c: T.c!, a: T.a!, b: T.b!, transA: ta, transB: tb, alpha: 0.7, beta: 0.5 }],
        { c: gemmTol(k, dtype) },
        `gemm ${dtype} transA=${ta} transB=${tb}`,
      );
    }
  // beta = 0 must not read C (NaN in C is overwritten)
  const c = f32([64, 64], rng);
  (c.data as Float32Array).fill(NaN);
  await compare(
    t,
    { a: f32([64, 256], rng), b: f32([256, 64], rng), c },
    (T) => [{ op: 'gemm', c: T.c!, a: T.a!, b: T.b! }],
    { c: gemmTol(256, 'f32') },
    'gemm beta=0 ignores C',
  );
});

gpuTest(
  'gemm: cuBLAS against our fallback kernel',
  ['gemm'],
  async (t) => {
    const rng = new Rng(803);
    const { cuda } = devices();
    const fb = fallbackDevice();
    for (const dtype of ['f32', 'bf16'] as DType[]) {
      const m = 512,
        n = 384,
        k = 1024;
      await compare(
        t,
        { a: f32([m, k], rng), b: weight([n, k], rng, dtype), c: f32([m, n], rng) },
        (T) => [{ op: 'gemm', c: T.c!, a: T.a!, b: T.b!, transB: true }],
        { c: gemmTol(k, dtype) },
        `cublas vs fallback ${dtype}`,
        [fb, cuda],
      );
    }
  },
  !realGpu
    ? 'needs a real GPU (cuBLAS and the fallback GEMM are both CUDA)'
    : info.cuda.gemm.startsWith('fallback')
      ? `cuBLAS is not in use here: ${info.cuda.gemm}`
      : false,
);

gpuTest('linear forward/backward, accumulate, bf16 weights', ['linear_forward', 'linear_backward'], async (t) => {
  const rng = new Rng(804);
  for (const dtype of ['f32', 'bf16'] as DType[]) {
    const m = 200,
      n = 96,
      k = 160;
    const inputs = {
      x: f32([m, k], rng),
      w: weight([n, k], rng, dtype),
      y: f32([m, n], rng),
      dy: f32([m, n], rng),
      dx: f32([m, k], rng),
    };
    await compare(
      t,
      inputs,
      (T) => [
        { op: 'linear_forward', y: T.y!, x: T.x!, w: T.w!, accumulate: true },
        { op: 'linear_backward', dx: T.dx!, dy: T.dy!, w: T.w! },
      ],
      { y: gemmTol(k, dtype), dx: gemmTol(n, dtype) },
      `linear ${dtype}`,
    );
  }
});

gpuTest('embedding forward/backward; a bad id is an Error', ['embedding_forward', 'embedding_backward'], async (t) => {
  const rng = new Rng(805);
  const vocab = 301,
    h = 70,
    n = 257;
  const ids = i32(
    [n],
    Array.from({ length: n }, (_, i) => (i % 7 === 0 ? 5 : rng.int(vocab))),
  );
  for (const dtype of ['f32', 'bf16'] as DType[]) {
    await compare(
      t,
      { ids, table: weight([vocab, h], rng, dtype), y: f32([n, h], rng) },
      (T) => [{ op: 'embedding_forward', y: T.y!, ids: T.ids!, table: T.table! }],
      { y: { atol: 0, rtol: 0 } },
      `embedding_forward ${dtype}`,
    );
  }
  await compare(
    t,
    { ids, dtable: f32([vocab, h], rng), dy: f32([n, h], rng) },
    (T) => [{ op: 'embedding_backward', dtable: T.dtable!, dy: T.dy!, ids: T.ids! }],
    { dtable: RED },
    'embedding_backward (+=, repeated ids)',
  );
  const { cuda } = devices();
  const x = upload(cuda, { ids: i32([3], [1, vocab + 4, 2]), table: f32([vocab, h], rng), y: f32([3, h], rng) });
  await t.rejects(
    cuda.run([{ op: 'embedding_forward', y: x.y!, ids: x.ids!, table: x.table! }]),
    /vocabulary|out of range|outside/,
  );
});

gpuTest('rmsnorm forward/backward with dw, extreme range', ['rmsnorm_forward', 'rmsnorm_backward'], async (t) => {
  const rng = new Rng(806);
  for (const [std, dtype] of [
    [1, 'f32'],
    [1e4, 'bf16'],
    [1e-3, 'f16'],
  ] as const) {
    const n = 133,
      h = 515;
    await compare(
      t,
      { x: f32([n, h], rng, std), w: weight([h], rng, dtype), y: f32([n, h], rng), rstd: f32([n], rng) },
      (T) => [{ op: 'rmsnorm_forward', y: T.y!, rstd: T.rstd!, x: T.x!, w: T.w!, eps: 1e-6 }],
      { y: RED, rstd: RED },
      `rmsnorm_forward x·${std} ${dtype}`,
    );
    const x = f32([n, h], rng, std);
    const ins = {
      x,
      w: weight([h], rng, dtype),
      y: f32([n, h], rng),
      rstd: f32([n], rng),
      dy: f32([n, h], rng),
      dx: f32([n, h], rng),
      dw: f32([h], rng),
    };
    await compare(
      t,
      ins,
      (T) => [
        { op: 'rmsnorm_forward', y: T.y!, rstd: T.rstd!, x: T.x!, w: T.w!, eps: 1e-6 },
        { op: 'rmsnorm_backward', dx: T.dx!, dy: T.dy!, x: T.x!, w: T.w!, rstd: T.rstd!, dw: T.dw!, accumulate: true },
      ],
      { dx: { atol: 1e-5 / std, rtol: 1e-4 }, dw: { atol: 1e-4, rtol: 1e-4 } },
      `rmsnorm_backward x·${std} ${dtype}`,
    );
  }
});

// Qwen3's q/k norms: one RMSNorm per head over head_dim (rows = tokens·heads, h = 32..128,
// far shorter than a hidden size), weights frozen, so backward runs without dw.
gpuTest(
  'rmsnorm per head (q/k norm): [n, heads, d] rows, d 32/64/128, no dw',
  ['rmsnorm_forward', 'rmsnorm_backward'],
  async (t) => {
    const rng = new Rng(813);
    for (const [n, heads, d, dtype] of [
      [61, 8, 32, 'f32'],
      [40, 4, 64, 'bf16'],
      [17, 6, 128, 'f32'],
    ] as const) {
      const sh = [n, heads, d];
      const ins = {
        x: f32(sh, rng, 3),
        w: weight([d], rng, dtype),
        y: f32(sh, rng),
        rstd: f32([n * heads], rng),
        dy: f32(sh, rng),
        dx: f32(sh, rng),
      };
      await compare(
        t,
        ins,
        (T) => [
          { op: 'rmsnorm_forward', y: T.y!, rstd: T.rstd!, x: T.x!, w: T.w!, eps: 1e-6 },
          { op: 'rmsnorm_backward', dx: T.dx!, dy: T.dy!, x: T.x!, w: T.w!, rstd: T.rstd! },
        ],
        { y: RED, rstd: RED, dx: RED },
        `q/k rmsnorm n=${n} heads=${heads} d=${d} ${dtype}`,
      );
    }
  },
);

/** Tries each argument layout until the CPU parser accepts one (2-D [n, heads·d] or 3-D). */
async function withLayout(t: Test, layouts: Array<() => Promise<void>>) {
  let last: unknown;
  for (const l of layouts) {
    try {
      await l();
      return;
    } catch (e) {
      if (!/shape|dimension|expected/.test(String(e))) throw e;
      last = e;
    }
  }
  t.fail(`no argument layout accepted: ${String(last)}`);
}

gpuTest('rope forward/backward (in place too)', ['rope_forward', 'rope_backward'], async (t) => {
  const rng = new Rng(807);
  const n = 77,
    heads = 6,
    d = 64,
    maxPos = 300;
  const pos = i32(
    [n],
    Array.from({ length: n }, () => rng.int(maxPos)),
  );
  const cos = new Float32Array((maxPos * d) / 2),
    sin = new Float32Array((maxPos * d) / 2);
  for (let p = 0; p < maxPos; p++)
    for (let i = 0; i < d / 2; i++) {
      const a = p / 10000 ** ((2 * i) / d);
      cos[p * (d / 2) + i] = Math.cos(a);
      sin[p * (d / 2) + i] = Math.sin(a);
    }
  const tables = {
    cos: { dtype: 'f32' as DType, shape: [maxPos, d / 2], data: cos },
    sin: { dtype: 'f32' as DType, shape: [maxPos, d / 2], data: sin },
  };
  await withLayout(
    t,
    [
      [n, heads * d],
      [n, heads, d],
    ].map((shape) => async () => {
      const ins = { ...tables, pos, x: f32(shape, rng), y: f32(shape, rng), dy: f32(shape, rng), dx: f32(shape, rng) };
      await compare(
        t,
        ins,
        (T) => [
          { op: 'rope_forward', y: T.y!, x: T.x!, pos: T.pos!, cos: T.cos!, sin: T.sin!, heads },
          { op: 'rope_backward', dx: T.dx!, dy: T.dy!, pos: T.pos!, cos: T.cos!, sin: T.sin!, heads },
          { op: 'rope_forward', y: T.x!, x: T.x!, pos: T.pos!, cos: T.cos!, sin: T.sin!, heads },
        ],
        { y: EW, dx: EW, x: EW },
        `rope ${JSON.stringify(shape)}`,
      );
    }),
  );
});

gpuTest(
  'attention forward/backward: varlen, GQA, head dims 40/64/128, sliding windows',
  ['attention_forward', 'attention_backward'],
  async (t) => {
    const rng = new Rng(808);
    const cases = [
      { seqs: [5, 32, 63], hq: 4, hkv: 2, d: 64, window: 0 },
      { seqs: [1, 70, 17, 40], hq: 6, hkv: 3, d: 40, window: 0 },
      { seqs: [129, 3], hq: 4, hkv: 1, d: 128, window: 0 },
      // windows shorter than a key tile, spanning tiles (whole tiles skipped), and of one key
      { seqs: [200, 9, 70], hq: 4, hkv: 2, d: 64, window: 8 },
      { seqs: [300, 40], hq: 2, hkv: 1, d: 40, window: 100 },
      { seqs: [33, 7], hq: 2, hkv: 2, d: 32, window: 1 },
    ];
    for (const c of cases) {
      const n = c.seqs.reduce((a, b) => a + b, 0);
      const cu = [0];
      for (const s of c.seqs) cu.push(cu[cu.length - 1]! + s);
      const scale = 1 / Math.sqrt(c.d);
      await withLayout(
        t,
        [2, 3].map((dims) => async () => {
          const sh = (h: number) => (dims === 2 ? [n, h * c.d] : [n, h, c.d]);
          const ins = {
            q: f32(sh(c.hq), rng),
            k: f32(sh(c.hkv), rng),
            v: f32(sh(c.hkv), rng),
            out: f32(sh(c.hq), rng),
            lse: f32([c.hq, n], rng),
            cu: i32([cu.length], cu),
            dout: f32(sh(c.hq), rng),
            dq: f32(sh(c.hq), rng),
            dk: f32(sh(c.hkv), rng),
            dv: f32(sh(c.hkv), rng),
          };
          await compare(
            t,
            ins,
            (T) => [
              {
                op: 'attention_forward',
                out: T.out!,
                lse: T.lse!,
                q: T.q!,
                k: T.k!,
                v: T.v!,
                cuSeqlens: T.cu!,
                heads: c.hq,
                kvHeads: c.hkv,
                scale,
                window: c.window,
              },
              {
                op: 'attention_backward',
                dq: T.dq!,
                dk: T.dk!,
                dv: T.dv!,
                dout: T.dout!,
                q: T.q!,
                k: T.k!,
                v: T.v!,
                out: T.out!,
                lse: T.lse!,
                cuSeqlens: T.cu!,
                heads: c.hq,
                kvHeads: c.hkv,
                scale,
                window: c.window,
              },
            ],
            {
              out: RED,
              lse: RED,
              dq: { atol: 1e-4, rtol: 1e-3 },
              dk: { atol: 1e-4, rtol: 1e-3 },
              dv: { atol: 1e-4, rtol: 1e-3 },
            },
            `attention seqs=${c.seqs} hq=${c.hq} hkv=${c.hkv} d=${c.d} window=${c.window}`,
          );
        }),
      );
    }
  },
);

gpuTest('add_bias: f32, bf16, f16 biases, 2-D and 3-D activations', ['add_bias'], async (t) => {
  const rng = new Rng(812);
  for (const shape of [
    [37, 72],
    [5, 3, 40],
  ]) {
    const m = shape[shape.length - 1]!;
    for (const dtype of ['f32', 'bf16', 'f16'] as const) {
      const ins = { y: f32(shape, rng), b: weight([m], rng, dtype) };
      await compare(
        t,
        ins,
        (T) => [{ op: 'add_bias', y: T.y!, b: T.b! }],
        { y: EW },
        `add_bias ${JSON.stringify(shape)} ${dtype}`,
      );
    }
  }
});

gpuTest('swiglu forward/backward, extreme range', ['swiglu_forward', 'swiglu_backward'], async (t) => {
  const rng = new Rng(809);
  for (const std of [1, 30]) {
    const n = 10007;
    await compare(
      t,
      {
        gate: f32([n], rng, std),
        up: f32([n], rng),
        h: f32([n], rng),
        dh: f32([n], rng),
        dgate: f32([n], rng),
        dup: f32([n], rng),
      },
      (T) => [
        { op: 'swiglu_forward', h: T.h!, gate: T.gate!, up: T.up! },
        { op: 'swiglu_backward', dgate: T.dgate!, dup: T.dup!, dh: T.dh!, gate: T.gate!, up: T.up! },
      ],
      { h: RED, dgate: RED, dup: RED },
      `swiglu gate·${std}`,
    );
  }
});

gpuTest(
  'lora forward/backward: 3 adapters, ranks 4/8/16, dropout (same mask as the CPU)',
  ['lora_forward', 'lora_backward'],
  async (t) => {
    const rng = new Rng(810);
    const inDim = 96,
      out = 80;
    const segs = [
      { rowStart: 0, rowEnd: 37, r: 4, scale: 2, dropout: 0 },
      { rowStart: 37, rowEnd: 100, r: 8, scale: 0.5, dropout: 0.1 },
      { rowStart: 100, rowEnd: 131, r: 16, scale: 1, dropout: 0.3 },
    ];
    const n = 131;
    const ins: Record<string, Input> = {
      x: f32([n, inDim], rng),
      y: f32([n, out], rng),
      dy: f32([n, out], rng),
      dx: f32([n, inDim], rng),
    };
    segs.forEach((s, i) => {
      ins[`a${i}`] = f32([s.r, inDim], rng, 0.1);
      ins[`b${i}`] = f32([out, s.r], rng, 0.1);
      ins[`xa${i}`] = f32([s.rowEnd - s.rowStart, s.r], rng);
      ins[`da${i}`] = f32([s.r, inDim], rng);
      ins[`db${i}`] = f32([out, s.r], rng);
    });
    const segArgs = (T: Record<string, Tensor>) =>
      segs.map((s, i) => ({
        rowStart: s.rowStart,
        rowEnd: s.rowEnd,
        a: T[`a${i}`]!,
        b: T[`b${i}`]!,
        scale: s.scale,
        dropout: s.dropout,
        seed: 1234 + i,
        position: 1000 * i + 7,
        xa: T[`xa${i}`]!,
        da: T[`da${i}`]!,
        db: T[`db${i}`]!,
      }));
    const tol: Record<string, Tolerance> = { y: RED, dx: RED };
    segs.forEach((_, i) => {
      tol[`xa${i}`] = RED;
      tol[`da${i}`] = { atol: 1e-4, rtol: 1e-4 };
      tol[`db${i}`] = { atol: 1e-4, rtol: 1e-4 };
    });
    await compare(
      t,
      ins,
      (T) => [
        { op: 'lora_forward', y: T.y!, x: T.x!, segments: segArgs(T) },
        { op: 'lora_backward', dx: T.dx!, dy: T.dy!, x: T.x!, segments: segArgs(T) },
      ],
      tol,
      'lora',
    );
  },
);

gpuTest(
  'cross-entropy forward and fused backward (in place, ignore -100, extreme logits)',
  ['cross_entropy_forward', 'cross_entropy_backward'],
  async (t) => {
    const rng = new Rng(811);
    for (const std of [1, 40]) {
      const n = 37,
        vocab = 5003;
      const labels = i32(
        [n],
        Array.from({ length: n }, (_, i) => (i % 5 === 3 ? -100 : rng.int(vocab))),
      );
      const ins = {
        logits: f32([n, vocab], rng, std),
        labels,
        losses: f32([n], rng),
        losses2: f32([n], rng),
        w: f32([n], rng),
      };
      await compare(
        t,
        ins,
        (T) => [
          { op: 'cross_entropy_forward', losses: T.losses!, logits: T.logits!, labels: T.labels! },
          {
            op: 'cross_entropy_backward',
            losses: T.losses2!,
            dlogits: T.logits!,
            logits: T.logits!,
            labels: T.labels!,
            weights: T.w!,
          },
        ],
        {
          losses: { atol: 1e-5 * std, rtol: 1e-5 },
          losses2: { atol: 1e-5 * std, rtol: 1e-5 },
          logits: { atol: 1e-6, rtol: 1e-4 },
        },
        `cross_entropy logits·${std}`,
      );
    }
  },
);

gpuTest('adamw: many tensors in one call', ['adamw'], async (t) => {
  const rng = new Rng(812);
  const sizes = [1, 100, 8192, 8193, 40000];
  const ins: Record<string, Input> = {};
  sizes.forEach((s, i) => {
    ins[`p${i}`] = f32([s], rng);
    ins[`g${i}`] = f32([s], rng);
    ins[`m${i}`] = f32([s], rng, 0.1);
    ins[`v${i}`] = {
      dtype: 'f32',
      shape: [s],
      data: Float32Array.from(f32([s], rng, 0.1).data as Float32Array, (x) => x * x),
    };
  });
  const L = (p: string, T: Record<string, Tensor>) => sizes.map((_, i) => T[`${p}${i}`]!);
  const tol: Record<string, Tolerance> = {};
  sizes.forEach((_, i) => {
    tol[`p${i}`] = { atol: 1e-6, rtol: 1e-5 };
    tol[`m${i}`] = EW;
    tol[`v${i}`] = EW;
  });
  await compare(
    t,
    ins,
    (T) => [
      {
        op: 'adamw',
        params: L('p', T),
        grads: L('g', T),
        m: L('m', T),
        v: L('v', T),
        lr: 1e-3,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weightDecay: 0.01,
        step: 3,
        gradScale: 0.5,
      },
    ],
    tol,
    'adamw',
  );
});

// Ops with no CUDA kernel (each refuses a CUDA device with an Error): the KV-cache decode step
// (generation runs on CPU devices), the CPU FMA-peak probe of the benchmarks, and (de)quantize
// (NF4 / int8 bases are CPU-only for now: docs/cuda.md).
const CPU_ONLY = ['attention_decode', 'fma_peak', 'quantize', 'dequantize'];

t.test('every op of the addon has a CUDA-vs-CPU test here (or is named CPU-only)', async (t) => {
  const untested = info.ops.filter((o) => !covered.has(o) && !CPU_ONLY.includes(o));
  t.same(
    untested,
    [],
    `ops without a CUDA-vs-CPU test in test/cuda/kernels.test.ts: ${untested.join(', ') || 'none'} (add a gpuTest, or name the op in CPU_ONLY with the reason)`,
  );
});
