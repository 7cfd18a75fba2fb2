// What the scenarios of `mlora bench` share: the options the command line parses into, the bench
// model's shape the kernel scenarios time, and the timing and random-tensor helpers. Apart from
// bench.ts so that each scenario file imports these without importing the dispatcher.
import type { Tensor } from '../../lib/native.js';
import type { Device } from '../../lib/tensor.js';
import type { Rng } from '../../lib/rng.js';

export interface BenchOptions {
  threads: number;
  json: boolean;
  /** Training scenarios: adapter counts, LoRA rank, micro-batch shape (sequences × tokens), steps. */
  adapters?: number[];
  rank?: number;
  microBatch?: number;
  seqLen?: number;
  steps?: number;
  /** Fewer repetitions (smoke runs); the numbers are noisier. */
  quick: boolean;
  /** precision scenario: the preset and the base formats to run */
  preset?: 'bench' | '1b';
  modes?: string[];
  /** The gpu scenario: device, models (presets or directories), stage counts, ceiling GEMM size, PEFT baseline JSON. */
  device?: string;
  models?: string[];
  stages?: number[];
  ceilingN?: number;
  baseline?: string;
}

/** The bench model: 4 layers, hidden 512, 8 heads × 64 (4 KV heads), intermediate 1376, vocab 8192. */
export const BENCH_MODEL = {
  hidden: 512,
  heads: 8,
  kvHeads: 4,
  headDim: 64,
  intermediate: 1376,
  vocab: 8192,
  tokens: 2048,
};

/** Best wall time (ms) of fn over at least `minReps` runs and `minMs` total, after one warm-up. */
export function bestMs(fn: () => void, minReps: number, minMs: number): number {
  fn();
  let best = Infinity;
  let total = 0;
  for (let r = 0; r < minReps || total < minMs; r++) {
    const t0 = performance.now();
    fn();
    const dt = performance.now() - t0;
    best = Math.min(best, dt);
    total += dt;
    if (r > 50) break;
  }
  return best;
}

export function randomTensor(d: Device, rng: Rng, dtype: 'f32' | 'bf16', shape: number[], std = 1): Tensor {
  const n = shape.reduce((a, b) => a * b, 1);
  const x = rng.fillNormal(new Float32Array(n), std);
  if (dtype === 'f32') return d.fromArray('f32', shape, x);
  const bits = new Uint16Array(n);
  const u = new Uint32Array(x.buffer);
  for (let i = 0; i < n; i++) bits[i] = (u[i]! + 0x7fff + ((u[i]! >>> 16) & 1)) >>> 16; // round to nearest even
  return d.fromArray('bf16', shape, bits);
}
