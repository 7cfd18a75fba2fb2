// Loads the native addon (once per thread: it is context-aware) and gives it types.
// Every op the core runs is listed in `Op` below with its arguments; the C++ side checks
// them again (ops/*.cc) and throws an Error naming the op, its index and the argument.
import { createRequire } from 'node:module';
import { existsSync } from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

/** Element dtypes: each element has its own bytes. */
export type ElementDType = 'f32' | 'f16' | 'bf16' | 'i32';
/**
 * Quantized 2-D base weights [rows, cols], one blob each (layout: lib/io/bnb.ts quantLayout):
 * bitsandbytes NF4 (block 64), NF4 with double-quantized absmax, LLM.int8 row-wise int8 + SCB.
 */
export type QuantDType = 'nf4' | 'nf4dq' | 'int8';
export type DType = ElementDType | QuantDType;

export interface Tensor {
  readonly dtype: DType;
  readonly shape: number[];
  readonly bytes: number;
  readonly device: string;
  readonly freed: boolean;
  /** True when the tensor wraps JavaScript memory (e.g. a SharedArrayBuffer slot). */
  readonly borrowed: boolean;
  /** A copy of the contents: Float32Array (f32), Int32Array (i32), Uint16Array (f16/bf16 bits) or Uint8Array (a quantized blob). */
  read(): Float32Array | Int32Array | Uint16Array | Uint8Array;
  /**
   * `into.length` elements from `elementOffset` copied into `into` (the mirror of write), which
   * comes back: memory read again and again (an adapter's state after every step) is reused.
   */
  read<T extends Float32Array | Int32Array | Uint16Array>(into: T, elementOffset?: number): T;
  write(src: Float32Array | Int32Array | Uint16Array, elementOffset?: number): void;
  /** A view of rows [start, end) of dimension 0, sharing storage. */
  rows(start: number, end: number): Tensor;
  reshape(shape: number[]): Tensor;
  /** Gives the bytes back to the device budget once no view or running kernel holds them. */
  free(): void;
}

export interface MemoryInfo {
  budget: number;
  used: number;
  free: number;
  cached: number;
  peak: number;
}

export interface DeviceOptions {
  kind?: 'cpu' | 'cuda';
  index?: number;
  threads?: number;
  /** Byte budget; every allocation counts against it. */
  budget?: number;
  /** CPU devices: one CPU id per thread; the device's compute threads stay on these cores. */
  cores?: number[];
}

export interface NativeDevice {
  readonly name: string;
  readonly kind: 'cpu' | 'cuda';
  readonly threads: number;
  memory(): MemoryInfo;
  alloc(dtype: DType, shape: number[], options?: { zero?: boolean }): Tensor;
  fromArray(dtype: DType, shape: number[], data: Float32Array | Int32Array | Uint16Array | Uint8Array): Tensor;
  /** Zero-copy tensor over JS memory (CPU only). */
  wrap(data: Float32Array | Int32Array | Uint16Array, dtype: DType, shape: number[]): Tensor;
  /** Reads `shape` elements of `dtype` from a file at `byteOffset` straight into device memory. */
  loadFile(file: string, byteOffset: number, dtype: DType, shape: number[]): Promise<Tensor>;
  /** Checks all ops now (throws on bad arguments), runs them in order off the JS thread. */
  run(ops: Op[]): Promise<void>;
  runSync(ops: Op[]): void;
  trimCache(): void;
  resetPeak(): void;
  /** Time per op kind since the last reset, summed (only where MLORA_PROFILE_OPS was set when
   *  the device opened; then every op also synchronizes). reset: start a new sum. */
  opProfile(reset?: boolean): OpTime[];
  /** Where the time of run() calls went since the last reset (always counted). reset: start anew. */
  runStats(reset?: boolean): RunStats;
  /** CPU only: packs each frozen weight [out, in] once into the panels of its two GEMMs
   *  (linear_forward, linear_backward; bf16: those with bf16 compute), so they stop packing it per
   *  call. Resolves to the bytes the panels take (`gemmPanelBytes`). The weights become read-only. */
  packWeights(weights: Tensor[], options?: { bf16?: boolean }): Promise<number>;
}

/**
 * NativeDevice.runStats, in ms summed over `runs` calls: toLeader from the call until its op list
 * starts (libuv queue and the hand-off to the device's compute thread), wall and cpu the op list
 * itself in wall time and in the computing thread's CPU time (less: it was preempted), back from
 * the op list's end until the promise settles on the JS thread.
 */
export interface RunStats {
  runs: number;
  toLeaderMs: number;
  wallMs: number;
  cpuMs: number;
  backMs: number;
}

/** One line of NativeDevice.opProfile: an op name, "+lora" with LoRA segments, a linear op's weight shape. */
export interface OpTime {
  op: string;
  calls: number;
  ms: number;
}

/** One adapter's row segment in a segmented LoRA call. */
export interface LoraSegmentArg {
  rowStart: number;
  rowEnd: number;
  /** [r, in] */
  a: Tensor;
  /** [out, r] */
  b: Tensor;
  scale: number;
  dropout?: number;
  /** Dropout mask seed: the mask is a function of (seed, position + row, column). */
  seed?: number;
  /** Global position of rowStart, so a replay regenerates the same mask. */
  position?: number;
  /** [rows, r]: forward writes dropout(x)·Aᵀ, backward reads it. */
  xa: Tensor;
  /** [r, in], +=  (backward only) */
  da?: Tensor;
  /** [out, r], += (backward only) */
  db?: Tensor;
}

/** The head layout and masking every attention op takes. */
export interface AttentionHeads {
  heads: number;
  kvHeads: number;
  /** Default 1/√head_dim. */
  scale?: number;
  /** Sliding window: query i sees keys j with i − window < j ≤ i; 0 (default) = none. */
  window?: number;
}

/** One AdamW step's hyper-parameters: `step` is 1-based (bias correction), `gradScale` multiplies the gradients (clipping). */
export interface AdamwHyper {
  lr: number;
  beta1: number;
  beta2: number;
  eps: number;
  weightDecay: number;
  step: number;
  gradScale?: number;
}

export type Op =
  | { op: 'fill'; y: Tensor; value?: number }
  | { op: 'copy'; y: Tensor; x: Tensor }
  | { op: 'axpy'; y: Tensor; x: Tensor; alpha?: number }
  | { op: 'scale'; y: Tensor; alpha: number }
  | { op: 'sumsq'; out: Tensor; xs: Tensor[] }
  | { op: 'nonfinite'; out: Tensor; x: Tensor }
  | {
      op: 'gemm';
      c: Tensor;
      a: Tensor;
      b: Tensor;
      transA?: boolean;
      transB?: boolean;
      alpha?: number;
      beta?: number;
      bf16?: boolean;
    }
  | { op: 'quantize'; dst: Tensor; src: Tensor }
  | { op: 'dequantize'; dst: Tensor; src: Tensor }
  /** Benchmark ceiling: out[0] = the device's FP32 FMA throughput (GFLOP/s, all its threads). CPU only. */
  | { op: 'fma_peak'; out: Tensor; iterations?: number; bf16?: boolean }
  /** With `segments`: the projection's LoRA in the same call (as lora_forward; backward also needs x). */
  | {
      op: 'linear_forward';
      y: Tensor;
      x: Tensor;
      w: Tensor;
      accumulate?: boolean;
      bf16?: boolean;
      segments?: LoraSegmentArg[];
    }
  | {
      op: 'linear_backward';
      dx: Tensor;
      dy: Tensor;
      w: Tensor;
      accumulate?: boolean;
      bf16?: boolean;
      x?: Tensor;
      segments?: LoraSegmentArg[];
    }
  | { op: 'embedding_forward'; y: Tensor; ids: Tensor; table: Tensor }
  | { op: 'embedding_backward'; dtable: Tensor; dy: Tensor; ids: Tensor }
  | { op: 'rmsnorm_forward'; y: Tensor; rstd: Tensor; x: Tensor; w: Tensor; eps: number }
  | {
      op: 'rmsnorm_backward';
      dx: Tensor;
      dy: Tensor;
      x: Tensor;
      w: Tensor;
      rstd: Tensor;
      dw?: Tensor;
      accumulate?: boolean;
    }
  | { op: 'rope_forward'; y: Tensor; x: Tensor; pos: Tensor; cos: Tensor; sin: Tensor; heads: number }
  | { op: 'rope_backward'; dx: Tensor; dy: Tensor; pos: Tensor; cos: Tensor; sin: Tensor; heads: number }
  | ({
      op: 'attention_forward';
      out: Tensor;
      lse: Tensor;
      q: Tensor;
      k: Tensor;
      v: Tensor;
      cuSeqlens: Tensor;
    } & AttentionHeads)
  | ({
      op: 'attention_backward';
      dq: Tensor;
      dk: Tensor;
      dv: Tensor;
      dout: Tensor;
      q: Tensor;
      k: Tensor;
      v: Tensor;
      out: Tensor;
      lse: Tensor;
      cuSeqlens: Tensor;
    } & AttentionHeads)
  | ({
      op: 'attention_decode';
      out: Tensor;
      q: Tensor;
      kCache: Tensor;
      vCache: Tensor;
      length: number;
    } & AttentionHeads)
  /** y[*, m] += b[m] on every row (a frozen bias; no backward: dy passes through). */
  | { op: 'add_bias'; y: Tensor; b: Tensor }
  | { op: 'swiglu_forward'; h: Tensor; gate: Tensor; up: Tensor }
  | { op: 'swiglu_backward'; dgate: Tensor; dup: Tensor; dh: Tensor; gate: Tensor; up: Tensor }
  | { op: 'lora_forward'; y: Tensor; x: Tensor; segments: LoraSegmentArg[] }
  | { op: 'lora_backward'; dx: Tensor; dy: Tensor; x: Tensor; segments: LoraSegmentArg[] }
  | { op: 'cross_entropy_forward'; losses: Tensor; logits: Tensor; labels: Tensor }
  | { op: 'cross_entropy_backward'; losses: Tensor; dlogits: Tensor; logits: Tensor; labels: Tensor; weights: Tensor }
  | ({ op: 'adamw'; params: Tensor[]; grads: Tensor[]; m: Tensor[]; v: Tensor[] } & AdamwHyper);

export interface NativeInfo {
  cpu: {
    avx2: boolean;
    avx512f: boolean;
    avx512bf16: boolean;
    amxBf16: boolean;
    f16c: boolean;
    hardwareThreads: number;
    /** CPU ids this process may run on (its affinity mask), ascending. */
    allowedCores: number[];
    gemmKernel: string;
    gemmBf16Kernel: string;
  };
  cuda: {
    compiled: boolean;
    devices: number;
    reason: string;
    /** The GEMM the CUDA kernels use: "cublas X.Y.Z (path)" or "fallback (tiled kernel; why)". */
    gemm: string;
  };
  ops: string[];
}

export interface NativeAddon {
  Device: new (options: DeviceOptions) => NativeDevice;
  info(): NativeInfo;
  /** Names the calling thread in /proc (15 characters kept): per-thread CPU accounts read it. */
  nameThread(name: string): void;
  /** The calling thread may run only on these CPU ids; false when the kernel refused (it then stays unpinned). */
  pinThread(cores: number[]): boolean;
  /** The slot checksum of `words` (cpu/checksum.h: FNV-1a in 32 lanes), as an int32; seed an int32. */
  checksum(words: Int32Array, seed: number): number;
  /** The bytes NativeDevice.packWeights takes for a weight [out, in] on a CPU device of this process. */
  gemmPanelBytes(out: number, inp: number, bf16?: boolean): number;
  /** B operand words the CPU GEMM has packed per call in this process (weights with panels add none). */
  gemmPackedBWords(): number;
}

const here = path.dirname(fileURLToPath(import.meta.url));

/** Where the built addon is: MLORA_ADDON overrides; else native/build/Release under the package. */
export function addonPath(): string {
  if (process.env.MLORA_ADDON) return process.env.MLORA_ADDON;
  // here is dist/lib (compiled) or lib (sources run directly)
  for (const up of ['../..', '..']) {
    const p = path.resolve(here, up, 'native/build/Release/mlora.node');
    if (existsSync(p)) return p;
  }
  return path.resolve(here, '../..', 'native/build/Release/mlora.node');
}

let cached: NativeAddon | undefined;

export function native(): NativeAddon {
  if (cached) return cached;
  const p = addonPath();
  if (!existsSync(p)) {
    throw new Error(
      `mlora: the native addon is not built (${p} is missing). Run \`npm install\` or \`npm run build:native\`.`,
    );
  }
  const require = createRequire(import.meta.url);
  cached = require(p) as NativeAddon;
  return cached;
}
