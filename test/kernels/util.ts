// Helpers shared by the kernel tests (not a test file itself).
import t, { type Test } from 'tap';
import type { Device, Tensor } from '../../lib/tensor.js';
import { native } from '../../lib/native.js';

export const f32 = (d: Device, shape: number[], data: ArrayLike<number>): Tensor =>
  d.fromArray('f32', shape, Float32Array.from(data));
export const i32 = (d: Device, shape: number[], data: ArrayLike<number>): Tensor =>
  d.fromArray('i32', shape, Int32Array.from(data));
export const read = (t: Tensor): Float32Array => t.read() as Float32Array;

/** A tensor of `dtype` holding `data` rounded to that dtype, and the rounded values as f32. */
export function stored(d: Device, dtype: 'f32' | 'bf16' | 'f16', shape: number[], data: Float32Array) {
  const src = f32(d, shape, data);
  if (dtype === 'f32') return { tensor: src, values: Float32Array.from(data) };
  const t = d.alloc(dtype, shape);
  const back = d.alloc('f32', shape);
  d.runSync([
    { op: 'copy', y: t, x: src },
    { op: 'copy', y: back, x: t },
  ]);
  const values = read(back);
  src.free();
  back.free();
  return { tensor: t, values };
}

/** Bitwise equality of two float arrays (NaN-aware), reporting the first difference. */
export function assertBitwise(t: Test, got: Float32Array, want: Float32Array, label: string) {
  const a = new Uint32Array(got.buffer, got.byteOffset, got.length);
  const b = new Uint32Array(want.buffer, want.byteOffset, want.length);
  if (a.length !== b.length) return t.fail(`${label}: length ${a.length} != ${b.length}`);
  for (let i = 0; i < a.length; i++)
    if (a[i] !== b[i]) return t.fail(`${label}: differs at ${i}: ${got[i]} vs ${want[i]}`);
  return t.pass(`${label}: bitwise equal`);
}

/** Central finite differences of a float64 scalar function at x, for every coordinate. */
export function finiteDiff(f: (x: Float64Array) => number, x: ArrayLike<number>, h = 1e-6): Float64Array {
  const p = Float64Array.from(x);
  const g = new Float64Array(p.length);
  for (let i = 0; i < p.length; i++) {
    const v = p[i]!;
    p[i] = v + h;
    const up = f(p);
    p[i] = v - h;
    const down = f(p);
    p[i] = v;
    g[i] = (up - down) / (2 * h);
  }
  return g;
}

export const dot = (a: ArrayLike<number>, b: ArrayLike<number>): number => {
  let s = 0;
  for (let i = 0; i < a.length; i++) s += a[i]! * b[i]!;
  return s;
};

/** Expects `ops` to be refused both synchronously (runSync) and as a rejected promise (run). */
export async function expectRefused(t: Test, d: Device, ops: unknown[], re: RegExp) {
  t.throws(() => d.runSync(ops as never), re, `runSync: ${re}`);
  await t.rejects(async () => d.run(ops as never), re, `run: ${re}`);
}

const cpu = native().info().cpu;

/** The instruction-set paths MLORA_GEMM_KERNEL can force, and whether this CPU has each. */
export const KERNEL_PATHS: ReadonlyArray<readonly [kernel: string, have: boolean]> = [
  ['scalar', true],
  ['avx2', cpu.avx2],
  ['avx512', cpu.avx512f],
];

/** The paths this CPU has. */
export const CPU_KERNELS: readonly string[] = KERNEL_PATHS.filter(([, have]) => have).map(([k]) => k);

/** The skip option of a test of path `kernel`: the reason where this CPU lacks it. */
export const skipUnless = (kernel: string, have: boolean) => ({ skip: have ? false : `this CPU has no ${kernel}` });

/** Runs fn with MLORA_GEMM_KERNEL=kernel (the kernels read it at each call), then unsets it. */
export async function withKernel<T>(kernel: string, fn: () => Promise<T>): Promise<T> {
  process.env.MLORA_GEMM_KERNEL = kernel;
  try {
    return await fn();
  } finally {
    delete process.env.MLORA_GEMM_KERNEL;
  }
}

/** The elementwise kernels' row loops are compiled for AVX-512, AVX2 and baseline and picked per
 *  call (MLORA_GEMM_KERNEL forces one): runs test `name` once on every path this CPU has. */
export function eachSimdKernel(name: string, fn: (t: Test) => Promise<void>): void {
  for (const kernel of CPU_KERNELS)
    t.test(`${name} (MLORA_GEMM_KERNEL=${kernel})`, (t) => withKernel(kernel, () => fn(t)));
}
