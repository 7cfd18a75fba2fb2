// What the scenarios of `mlora bench` share: the options the command line parses into, the bench
// model's shape the kernel scenarios time, the timing and random-tensor helpers, and what the
// training scenarios (batchlora, pipeline, head, recompute, precision, gpu) build on: the bench
// LoRA, the model cache, the FLOP count, the GEMM ceiling, synthetic micro-batches, mLoRA's
// grouping of adapters into messages. Apart from bench.ts so that each scenario file imports
// these without importing the dispatcher.
import path from 'node:path';
import os from 'node:os';
import type { Tensor } from '../../lib/native.js';
import type { LlamaConfig } from '../../lib/model/config.js';
import { LORA_TARGETS, projectionShape } from '../../lib/model/config.js';
import { openModelDir } from '../../lib/io/hf-model.js';
import { openDevice, type Device } from '../../lib/tensor.js';
import { loadStageWeights, type PackWeights } from '../../lib/model/weights.js';
import type { LoraSpec } from '../../lib/lora/adapter.js';
import type { StepParams } from '../../lib/lora/state.js';
import { assemble } from '../../actors/scheduler/assemble.js';
import type { SourceMicroBatch } from '../../actors/scheduler/job-types.js';
import type { Pipeline } from '../../actors/pipeline.js';
import { Rng } from '../../lib/rng.js';
import { ensureModel } from './make-model.js';

export interface BenchOptions {
  threads: number;
  json: boolean;
  /** Training scenarios: adapter counts, LoRA rank, micro-batch shape (sequences × tokens), steps. */
  adapters?: number[];
  rank?: number;
  microBatch?: number;
  seqLen?: number;
  steps?: number;
  /** The pipeline scenario: measurements of each layout taken in turn per adapter count (the median is reported). */
  rounds?: number;
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
  /** Training scenarios: pack the frozen weights at load (BaseFormat.packWeights; default 'auto'). */
  packWeights?: PackWeights;
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

/** The LoRA every training benchmark uses: rank r on all seven targets, alpha 2r, no dropout. */
export function benchLoraSpec(r: number): LoraSpec {
  return { r, alpha: 2 * r, dropout: 0, targets: [...LORA_TARGETS], useRslora: false, seed: 0 };
}

export interface TrainBenchRecord {
  scenario: string;
  mode: string;
  adapters: number;
  micro_batch: number;
  seq_len: number;
  stages: number;
  threads: number;
  tokens_per_s: number;
  mfu: number;
  gemm_ceiling_gflops: number;
  step_ms: number;
  busy?: number[];
  bubble?: number;
  /** The pipeline scenario: where the run's time went (bench-pipeline.ts TimeAccount). */
  time_account?: unknown;
  /** The pipeline scenario, 1 stage × 1 thread: the same adapters at the 2-stage packing. */
  at_two_stage_packing?: { rows_per_message: number; tokens_per_s: number };
  /** The pipeline scenario, 2 stages: tokens/s ÷ 1 stage × 1 thread's, and the ceiling of that (2 × its tokens/s at the 2-stage packing ÷ at its own). */
  ratio_to_one_stage?: number;
  ceiling_ratio?: number;
}

export function cacheModels(): string {
  return path.join(
    process.env.MLORA_CACHE ?? path.join(process.env.XDG_CACHE_HOME ?? path.join(os.homedir(), '.cache'), 'mlora'),
    'models',
  );
}

/** Model FLOPs per trained token: frozen base forward + backward-dX, LoRA forward + backward, attention, head. */
export function trainFlopsPerToken(c: LlamaConfig, spec: LoraSpec, seqLen: number): number {
  const H = c.hiddenSize,
    q = c.numHeads * c.headDim,
    kv = c.numKvHeads * c.headDim,
    I = c.intermediateSize;
  const base = H * q + 2 * H * kv + q * H + 3 * H * I;
  let lora = 0;
  for (const t of spec.targets) {
    const [o, i] = projectionShape(c, t);
    lora += spec.r * (i + o);
  }
  const attnFwd = 2 * 2 * ((seqLen + 1) / 2) * q;
  return c.numLayers * (4 * base + 6 * lora + 3.5 * attnFwd) + 4 * H * c.vocabSize;
}

/** The GEMM ceiling on a device: a large square sgemm with our kernel (GFLOP/s). */
export async function gemmCeiling(threads: number, n = 1536): Promise<number> {
  const d = openDevice('cpu:0', { threads, budget: 2 ** 30 });
  const rng = new Rng(5);
  const a = d.fromArray('f32', [n, n], rng.fillNormal(new Float32Array(n * n)));
  const b = d.fromArray('f32', [n, n], rng.fillNormal(new Float32Array(n * n)));
  const c = d.alloc('f32', [n, n]);
  await d.run([{ op: 'gemm', c, a, b }]);
  let best = Infinity;
  for (let i = 0; i < 3; i++) {
    const t = performance.now();
    await d.run([{ op: 'gemm', c, a, b }]);
    best = Math.min(best, performance.now() - t);
  }
  for (const x of [a, b, c]) x.free();
  return (2 * n ** 3) / (best / 1000) / 1e9;
}

/** A micro-batch of `seqs` sequences of `seqLen` random tokens (ids ≥ 4), every token a target. */
export function syntheticMicroBatch(rng: Rng, c: LlamaConfig, seqs: number, seqLen: number): SourceMicroBatch {
  const N = seqs * seqLen;
  const ids = new Int32Array(N);
  for (let i = 0; i < N; i++) ids[i] = 4 + rng.int(c.vocabSize - 4);
  const cu = new Int32Array(seqs + 1);
  for (let s = 0; s <= seqs; s++) cu[s] = s * seqLen;
  const positions = new Int32Array(N);
  for (let i = 0; i < N; i++) positions[i] = i % seqLen;
  const targets = seqs * (seqLen - 1);
  return {
    step: 0,
    microIndex: 0,
    microCount: 1,
    inputIds: ids,
    labels: ids,
    cuSeqlens: cu,
    positions,
    numTokens: N,
    numTargetTokens: targets,
    stepTargetTokens: targets,
    lastOfStep: true,
  };
}

export const STEP: Omit<StepParams, 'step'> = {
  lr: 1e-4,
  beta1: 0.9,
  beta2: 0.999,
  eps: 1e-8,
  weightDecay: 0,
  gradScale: 1,
};

/**
 * mLoRA scheduling, as the supervisor does it: each group of adapters is one BatchLoRA message,
 * all groups in flight at once; each adapter steps as soon as its own micro-batch is back (no
 * flush) while the other messages keep the stages busy. A one-adapter group's next micro-batch
 * goes out with its step (Pipeline.trainAfterStep, as the scheduler's admission sends it on a
 * pipeline of several stages): it waits in the first stage's queue for the step, not for a round
 * trip through this thread. Returns the wall time (ms) of `steps` steps of every group; optimizer
 * versions continue from `versions` (kept across calls).
 */
export async function trainInGroups(
  p: Pipeline,
  groups: number[][],
  mbs: Map<number, SourceMicroBatch>,
  steps: number,
  versions = new Map<number, number>(),
): Promise<number> {
  let mbId = 1;
  const t0 = performance.now();
  const message = (g: number[], s: number) =>
    assemble(
      mbId++,
      g.map((id) => ({ adapter: id, serial: s, mb: mbs.get(id)! })),
      g.reduce((a, id) => a + mbs.get(id)!.numTokens, 0),
    );
  const ahead = p.plans.length > 1 && p.trainAfterStep !== undefined;
  await Promise.all(
    groups.map(async (g) => {
      let pending = p.train(message(g, 0));
      for (let s = 0; s < steps; s++) {
        await pending;
        const stepped = Promise.all(
          g.map((id) => {
            versions.set(id, (versions.get(id) ?? 0) + 1);
            return p.step(id, { ...STEP, step: versions.get(id)! });
          }),
        );
        if (s + 1 < steps) {
          const next = message(g, s + 1);
          pending = ahead && g.length === 1 ? p.trainAfterStep!(next) : stepped.then(() => p.train(next));
        }
        await stepped;
      }
      await pending;
    }),
  );
  return performance.now() - t0;
}

/** The bench model as one stage on cpu:0, and the adapter (rank 16, all seven targets) the one-device scenarios train. */
export async function oneStageBench(threads: number, log: (s: string) => void) {
  const dir = openModelDir(await ensureModel(cacheModels(), 'bench', 0, log));
  const c = dir.config;
  const device = openDevice('cpu:0', { threads });
  const plan = { lo: 0, hi: c.numLayers, first: true, last: true };
  const weights = await loadStageWeights(device, dir, plan);
  const spec: LoraSpec = { r: 16, alpha: 32, dropout: 0, targets: [...LORA_TARGETS], useRslora: false, seed: 0 };
  return { c, device, plan, weights, spec };
}

/**
 * Best time (ms) of each of two variants over `steps` rounds after a warm-up round (buffers,
 * caches), the order alternating each round so drifting machine load hits both alike.
 */
export async function bestOfAlternating<K extends string>(
  names: readonly [K, K],
  steps: number,
  run: (name: K) => Promise<void>,
): Promise<Record<K, number>> {
  const ms = { [names[0]]: Infinity, [names[1]]: Infinity } as Record<K, number>;
  for (let s = 0; s < steps + 1; s++) {
    for (const name of s % 2 ? names : ([names[1], names[0]] as const)) {
      const t = performance.now();
      await run(name);
      if (s > 0) ms[name] = Math.min(ms[name], performance.now() - t);
    }
  }
  return ms;
}
