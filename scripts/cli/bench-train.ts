// Training benchmarks: "batchlora" (K adapters batched in one micro-batch vs the same K
// trained one after another by the same engine) and "pipeline" (2 stage actors vs 1 stage).
// Both report tokens/s and model FLOP utilisation against the GEMM ceiling measured in the
// same run.
import path from 'node:path';
import os from 'node:os';
import type { LlamaConfig } from '../../lib/model/config.js';
import { LORA_TARGETS, projectionShape } from '../../lib/model/config.js';
import { openModelDir } from '../../lib/io/hf-model.js';
import { openDevice } from '../../lib/tensor.js';
import type { OpTime } from '../../lib/native.js';
import { freeStageWeights, loadStageWeights, type BaseFormat } from '../../lib/model/weights.js';
import { activationBytes, StageProgram } from '../../lib/model/stage.js';
import type { LoraSpec } from '../../lib/lora/adapter.js';
import { freshState } from '../../lib/lora/state.js';
import { LocalPipeline } from '../../actors/local.js';
import { ActorPipeline } from '../../actors/runtime.js';
import { assemble } from '../../actors/scheduler/assemble.js';
import type { SourceMicroBatch } from '../../actors/scheduler/job-types.js';
import type { Pipeline } from '../../actors/pipeline.js';
import type { StepParams } from '../../lib/lora/state.js';
import { Rng } from '../../lib/rng.js';
import { ensureModel } from './make-model.js';
import { steadyWindow, utilisation } from '../../lib/schedule/grid.js';
import { adaptersPerMessage } from '../../lib/schedule/packing.js';
import { balanceSplit } from '../../lib/schedule/split.js';

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

/** Trains `steps` steps of K adapters, batched (one message of all K) or sequential (K messages, one at a time). */
async function runSteps(
  p: Pipeline,
  ids: number[],
  mbs: Map<number, SourceMicroBatch>,
  steps: number,
  batched: boolean,
  concurrent: boolean,
): Promise<number> {
  let mbId = 1;
  const t = performance.now();
  for (let s = 0; s < steps; s++) {
    if (batched) {
      const parts = ids.map((id) => ({ adapter: id, serial: s, mb: mbs.get(id)! }));
      await p.train(
        assemble(
          mbId++,
          parts,
          parts.reduce((a, x) => a + x.mb.numTokens, 0),
        ),
      );
    } else if (concurrent) {
      await Promise.all(
        ids.map((id) =>
          p.train(assemble(mbId++, [{ adapter: id, serial: s, mb: mbs.get(id)! }], mbs.get(id)!.numTokens)),
        ),
      );
    } else {
      for (const id of ids)
        await p.train(assemble(mbId++, [{ adapter: id, serial: s, mb: mbs.get(id)! }], mbs.get(id)!.numTokens));
    }
    for (const id of ids) await p.step(id, { ...STEP, step: s + 1 });
  }
  return performance.now() - t;
}

/**
 * mLoRA scheduling, as the supervisor does it: each group of adapters is one BatchLoRA message,
 * all groups in flight at once; each adapter steps as soon as its own micro-batch is back (no
 * flush) while the other messages keep the stages busy. Returns the wall time (ms) of `steps`
 * steps of every group; optimizer versions continue from `versions` (kept across calls).
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
  await Promise.all(
    groups.map(async (g) => {
      for (let s = 0; s < steps; s++) {
        await p.train(
          assemble(
            mbId++,
            g.map((id) => ({ adapter: id, serial: s, mb: mbs.get(id)! })),
            g.reduce((a, id) => a + mbs.get(id)!.numTokens, 0),
          ),
        );
        await Promise.all(
          g.map((id) => {
            versions.set(id, (versions.get(id) ?? 0) + 1);
            return p.step(id, { ...STEP, step: versions.get(id)! });
          }),
        );
      }
    }),
  );
  return performance.now() - t0;
}

export async function batchloraScenario(
  o: {
    adapters: number[];
    rank: number;
    shapes: Array<{ micro: number; seqLen: number }>;
    steps: number;
    threads: number;
  },
  log: (s: string) => void,
): Promise<TrainBenchRecord[]> {
  const modelDir = await ensureModel(cacheModels(), 'bench', 0, log);
  const dir = openModelDir(modelDir);
  const c = dir.config;
  const ceiling = await gemmCeiling(o.threads);
  log(`GEMM ceiling (1536³ sgemm, ${o.threads} thread${o.threads > 1 ? 's' : ''}): ${ceiling.toFixed(1)} GFLOP/s`);
  const device = openDevice('cpu:0', { threads: o.threads });
  const plan = { lo: 0, hi: c.numLayers, first: true, last: true };
  const program = new StageProgram(device, c, plan, await loadStageWeights(device, dir, plan));
  const p = new LocalPipeline(c, [program]);
  const out: TrainBenchRecord[] = [];
  const maxK = Math.max(...o.adapters);
  const spec = benchLoraSpec(o.rank);
  for (let id = 1; id <= maxK; id++)
    await p.addAdapter(id, { ...spec, seed: id }, freshState(c, { ...spec, seed: id }));
  for (const shape of o.shapes) {
    const rng = new Rng(1, shape.micro, shape.seqLen);
    const mbs = new Map<number, SourceMicroBatch>();
    for (let id = 1; id <= maxK; id++) mbs.set(id, syntheticMicroBatch(rng, c, shape.micro, shape.seqLen));
    const flops = trainFlopsPerToken(c, spec, shape.seqLen);
    for (const K of o.adapters) {
      const ids = Array.from({ length: K }, (_, i) => i + 1);
      // warm-up (buffers, caches), then the two modes step by step in turn, so drifting
      // machine load hits both alike
      await runSteps(p, ids, mbs, 1, false, false);
      await runSteps(p, ids, mbs, 1, true, false);
      const ms = { sequential: 0, batched: 0 };
      const split = new Map<string, OpTime>();
      for (let s = 0; s < o.steps; s++) {
        ms.sequential += await runSteps(p, ids, mbs, 1, false, false);
        device.opProfile(true);
        ms.batched += await runSteps(p, ids, mbs, 1, true, false);
        for (const t of device.opProfile(true)) {
          const acc = split.get(t.op) ?? { op: t.op, calls: 0, ms: 0 };
          acc.calls += t.calls;
          acc.ms += t.ms;
          split.set(t.op, acc);
        }
      }
      if (split.size) logOpSplit(`batched K=${K} ${shape.micro}×${shape.seqLen}`, [...split.values()], ms.batched, log);
      for (const mode of ['sequential', 'batched'] as const) {
        const tokens = K * shape.micro * shape.seqLen * o.steps;
        const tps = tokens / (ms[mode] / 1000);
        const rec: TrainBenchRecord = {
          scenario: 'batchlora',
          mode,
          adapters: K,
          micro_batch: shape.micro,
          seq_len: shape.seqLen,
          stages: 1,
          threads: o.threads,
          tokens_per_s: Math.round(tps),
          mfu: (tps * flops) / (ceiling * 1e9),
          gemm_ceiling_gflops: Math.round(ceiling * 10) / 10,
          step_ms: Math.round(ms[mode] / o.steps),
        };
        out.push(rec);
        log(
          `batchlora ${mode.padEnd(10)} K=${K} ${shape.micro}×${shape.seqLen}: ${rec.tokens_per_s} tok/s, MFU ${(100 * rec.mfu).toFixed(1)}%, ${rec.step_ms} ms/step`,
        );
      }
    }
  }
  await p.close();
  return out;
}

/** The time split of MLORA_PROFILE_OPS=1 runs: each op kind's share of the measured wall time;
 *  what no op accounts for is the JS side (building op lists, messages, waiting on promises). */
export function logOpSplit(what: string, split: OpTime[], wallMs: number, log: (s: string) => void): void {
  const total = split.reduce((a, t) => a + t.ms, 0);
  log(`time split of ${what} (MLORA_PROFILE_OPS: every op synchronizes), ${wallMs.toFixed(0)} ms wall:`);
  for (const t of [...split].sort((a, b) => b.ms - a.ms))
    log(
      `  ${t.op.padEnd(40)} ${String(t.calls).padStart(6)} calls ${t.ms.toFixed(1).padStart(9)} ms ${((100 * t.ms) / wallMs).toFixed(1).padStart(5)}%`,
    );
  log(
    `  ${'(outside ops: JS, messages)'.padEnd(53)} ${(wallMs - total).toFixed(1).padStart(9)} ms ${((100 * (wallMs - total)) / wallMs).toFixed(1).padStart(5)}%`,
  );
}

/** Micro-batches in one step of the single adapter in the A = 1 within-step pipelining run. */
const GPIPE_MICRO = 4;

export async function pipelineScenario(
  o: { adapters: number[]; rank: number; micro: number; seqLen: number; steps: number },
  log: (s: string) => void,
): Promise<TrainBenchRecord[]> {
  const modelDir = await ensureModel(cacheModels(), 'bench', 0, log);
  const dir = openModelDir(modelDir);
  const c = dir.config;
  const ceiling1 = await gemmCeiling(1);
  log(`GEMM ceiling (1 thread): ${ceiling1.toFixed(1)} GFLOP/s`);
  const spec = benchLoraSpec(o.rank);
  const flops = trainFlopsPerToken(c, spec, o.seqLen);
  const out: TrainBenchRecord[] = [];
  const layouts = [
    { name: '1 stage × 1 thread', devices: ['cpu:0'], threads: [1] },
    { name: '1 stage × 2 threads', devices: ['cpu:0'], threads: [2] },
    { name: '2 stages × 1 thread', devices: ['cpu:0', 'cpu:1'], threads: [1, 1] },
  ];
  const maxK = Math.max(...o.adapters);
  for (const L of layouts) {
    // every row of the synthetic data but the last of each sequence has a target
    const plans = balanceSplit(c, L.threads, { seqLen: o.seqLen, targetFraction: (o.seqLen - 1) / o.seqLen }).plans;
    const maxTokens = Math.ceil(maxK / plans.length) * o.micro * o.seqLen;
    const p = await ActorPipeline.start({
      modelDir,
      config: c,
      plans,
      devices: L.devices,
      threads: L.threads,
      budgets: L.devices.map(() => 8 * 2 ** 30),
      maxTokens: Math.max(maxTokens, maxK * o.micro * o.seqLen),
      inflight: 2 * plans.length,
    });
    try {
      for (let id = 1; id <= maxK; id++)
        await p.addAdapter(id, { ...spec, seed: id }, freshState(c, { ...spec, seed: id }));
      const rng = new Rng(2);
      const mbs = new Map<number, SourceMicroBatch>();
      for (let id = 1; id <= maxK; id++) mbs.set(id, syntheticMicroBatch(rng, c, o.micro, o.seqLen));
      for (const K of o.adapters) {
        const ids = Array.from({ length: K }, (_, i) => i + 1);
        // mLoRA scheduling, as the supervisor does it (lib/schedule/packing.ts): one device takes
        // every adapter in one message; a pipeline spreads them over about 2 messages per stage,
        // all in flight, each adapter stepping as soon as its own micro-batch is back (no flush)
        // while the other messages keep the stages busy
        const perMessage = adaptersPerMessage(K, plans.length);
        const groups: number[][] = Array.from({ length: Math.ceil(K / perMessage) }, () => []);
        ids.forEach((id, i) => groups[i % groups.length]!.push(id));
        const versions = new Map<number, number>();
        let gpipeSteps = 0;
        const run = async (steps: number, gpipe: boolean) => {
          if (!gpipe) return trainInGroups(p, groups, mbs, steps, versions);
          // one adapter whose step is GPIPE_MICRO micro-batches, all in flight at once (what the
          // scheduler does when the adapters are too few to fill the stages), then its step
          let mbId = 1;
          const t0 = performance.now();
          const id = ids[0]!;
          const sub = syntheticMicroBatch(new Rng(3), c, o.micro, o.seqLen);
          for (let s = 0; s < steps; s++) {
            await Promise.all(
              Array.from({ length: GPIPE_MICRO }, () =>
                p.train(assemble(mbId++, [{ adapter: id, serial: s, mb: sub }], sub.numTokens)),
              ),
            );
            await p.step(id, { ...STEP, step: (versions.get(id) ?? 0) + ++gpipeSteps });
          }
          return performance.now() - t0;
        };
        /**
         * Tokens/s and utilisation of `steps` steps in the steady state: one step before and one
         * after them run in the same go, and only the window between (steadyWindow) counts.
         */
        const measure = async (gpipe: boolean, adapters: number[], tokensPerStep: number) => {
          const from = p.schedule().at(-1)?.end ?? 0;
          const ms = await run(o.steps + 2, gpipe);
          const recs = p.schedule().filter((r) => r.start >= from);
          const w = steadyWindow(recs, adapters, 1, o.steps);
          if (!w) return { tps: (tokensPerStep * (o.steps + 2)) / (ms / 1000), u: utilisation(recs, plans.length) };
          return {
            tps: (tokensPerStep * o.steps) / ((w.to - w.from) / 1000),
            u: utilisation(recs, plans.length, w.from, w.to),
          };
        };
        await run(1, false);
        const { tps, u } = await measure(false, ids, K * o.micro * o.seqLen);
        const threads = L.threads.reduce((a, b) => a + b, 0);
        const rec: TrainBenchRecord = {
          scenario: 'pipeline',
          mode: L.name,
          adapters: K,
          micro_batch: o.micro,
          seq_len: o.seqLen,
          stages: plans.length,
          threads,
          tokens_per_s: Math.round(tps),
          mfu: (tps * flops) / (ceiling1 * threads * 1e9),
          gemm_ceiling_gflops: Math.round(ceiling1 * threads * 10) / 10,
          step_ms: Math.round((K * o.micro * o.seqLen * 1000) / tps),
          busy: u.busy.map((b) => Math.round(b * 1000) / 1000),
          bubble: Math.round(u.bubble * 1000) / 1000,
        };
        out.push(rec);
        log(
          `pipeline ${L.name.padEnd(20)} A=${K}: ${rec.tokens_per_s} tok/s, busy ${u.busy.map((b) => `${Math.round(100 * b)}%`).join('/')}, bubble ${(100 * u.bubble).toFixed(1)}%`,
        );
        if (K === 1 && plans.length > 1) {
          const { tps: tps2, u: u2 } = await measure(true, [ids[0]!], GPIPE_MICRO * o.micro * o.seqLen);
          out.push({
            ...rec,
            mode: `${L.name}, ${GPIPE_MICRO} micro-batches per step`,
            tokens_per_s: Math.round(tps2),
            mfu: (tps2 * flops) / (ceiling1 * threads * 1e9),
            step_ms: Math.round((GPIPE_MICRO * o.micro * o.seqLen * 1000) / tps2),
            busy: u2.busy,
            bubble: u2.bubble,
          });
          log(
            `pipeline ${L.name.padEnd(20)} A=1, ${GPIPE_MICRO} micro-batches per step: ${Math.round(tps2)} tok/s, busy ${u2.busy.map((b) => `${Math.round(100 * b)}%`).join('/')}, bubble ${(100 * u2.bubble).toFixed(1)}%`,
          );
        }
      }
    } finally {
      await p.close();
    }
  }
  return out;
}

export interface HeadBenchRecord {
  scenario: 'head';
  targeted: number;
  tokens: number;
  every_row_ms: number;
  targeted_rows_ms: number;
  speedup: number;
}

/**
 * "head": one training micro-batch through the whole bench model on one device, with the LM
 * head on every row (the plain computation) vs on the targeted rows only (gathered), for
 * several fractions of targeted rows: instruction data with masked prompts targets a
 * fraction of its rows. Both programs run in turn in the same process.
 */
/** The bench model as one stage on cpu:0, and the adapter (rank 16, all seven targets) the one-device scenarios train. */
async function oneStageBench(threads: number, log: (s: string) => void) {
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
async function bestOfAlternating<K extends string>(
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

export async function headScenario(
  o: { threads: number; steps: number; micro: number; seqLen: number; fractions: number[] },
  log: (s: string) => void,
): Promise<HeadBenchRecord[]> {
  const { c, device, plan, weights, spec } = await oneStageBench(o.threads, log);
  // one program, its gatherTargets switched between runs: both variants use the same memory
  const program = new StageProgram(device, c, plan, weights);
  const p = new LocalPipeline(c, [program]);
  await p.addAdapter(1, spec, freshState(c, spec));
  const out: HeadBenchRecord[] = [];
  log(
    `head: bench model, ${o.micro}×${o.seqLen} tokens per micro-batch, ${o.threads} thread(s); LM head ${c.vocabSize}×${c.hiddenSize}`,
  );
  for (const f of o.fractions) {
    const mb = syntheticMicroBatch(new Rng(4), c, o.micro, o.seqLen);
    // a prompt of (1 − f) of each sequence is masked, as train_on_inputs: false does
    const labels = mb.labels.slice();
    for (let i = 0; i < mb.numTokens; i++) if (i % o.seqLen < Math.round((1 - f) * o.seqLen)) labels[i] = -100;
    const src = { ...mb, labels };
    const data = assemble(1, [{ adapter: 1, serial: 0, mb: src }], src.numTokens);
    const targeted = data.targets.filter((x) => x >= 0).length;
    const ms = await bestOfAlternating(['every', 'gathered'] as const, o.steps, async (name) => {
      program.gatherTargets = name === 'gathered';
      await p.train(data);
    });
    const rec: HeadBenchRecord = {
      scenario: 'head',
      targeted: targeted / data.targets.length,
      tokens: data.targets.length,
      every_row_ms: Math.round(ms.every * 10) / 10,
      targeted_rows_ms: Math.round(ms.gathered * 10) / 10,
      speedup: Math.round((ms.every / ms.gathered) * 100) / 100,
    };
    out.push(rec);
    log(
      `head: ${(100 * rec.targeted).toFixed(0).padStart(3)}% of rows targeted: every row ${rec.every_row_ms} ms, targeted rows only ${rec.targeted_rows_ms} ms per micro-batch (${rec.speedup}×)`,
    );
  }
  await p.close();
  return out;
}

export interface RecomputeBenchRecord {
  scenario: 'recompute';
  tokens: number;
  plain_ms: number;
  recompute_ms: number;
  slowdown: number;
  /** Bytes a micro-batch keeps between its forward and backward on a stage of all the layers but not the head. */
  saved_bytes_plain: number;
  saved_bytes_recompute: number;
}

/**
 * "recompute": one training micro-batch through the whole bench model on one device, with and
 * without activation recomputation (two programs over the same weights, run in turn, the order
 * alternating), and what a micro-batch keeps between forward and backward either way.
 */
export async function recomputeScenario(
  o: { threads: number; steps: number; micro: number; seqLen: number },
  log: (s: string) => void,
): Promise<RecomputeBenchRecord> {
  const { c, device, plan, weights, spec } = await oneStageBench(o.threads, log);
  const pipes = {
    plain: new LocalPipeline(c, [new StageProgram(device, c, plan, weights)]),
    recompute: new LocalPipeline(c, [new StageProgram(device, c, plan, weights, { recompute: true })]),
  };
  for (const p of Object.values(pipes)) await p.addAdapter(1, spec, freshState(c, spec));
  const mb = syntheticMicroBatch(new Rng(4), c, o.micro, o.seqLen);
  const data = assemble(1, [{ adapter: 1, serial: 0, mb }], mb.numTokens);
  const ms = await bestOfAlternating(['plain', 'recompute'] as const, o.steps, async (name) => {
    await pipes[name].train(data);
  });
  const segs = [{ rows: mb.numTokens, spec }];
  const body = { ...plan, last: false };
  const rec: RecomputeBenchRecord = {
    scenario: 'recompute',
    tokens: mb.numTokens,
    plain_ms: Math.round(ms.plain * 10) / 10,
    recompute_ms: Math.round(ms.recompute * 10) / 10,
    slowdown: Math.round((ms.recompute / ms.plain) * 100) / 100,
    saved_bytes_plain: activationBytes(c, body, mb.numTokens, segs),
    saved_bytes_recompute: activationBytes(c, body, mb.numTokens, segs, true),
  };
  log(
    `recompute: bench model, ${o.micro}×${o.seqLen} tokens, ${o.threads} thread(s): ${rec.plain_ms} ms without, ${rec.recompute_ms} ms with recompute (${rec.slowdown}×); ` +
      `a micro-batch keeps ${(rec.saved_bytes_plain / 2 ** 20).toFixed(1)} MiB vs ${(rec.saved_bytes_recompute / 2 ** 20).toFixed(1)} MiB between forward and backward on a stage of all ${c.numLayers} layers`,
  );
  await pipes.plain.close();
  await pipes.recompute.close(); // the shared weights were freed by the first close; a second free is a no-op
  return rec;
}

export interface PrecisionBenchRecord {
  scenario: 'precision';
  model: string;
  mode: string;
  tokens: number;
  step_ms: number;
  tokens_per_s: number;
  /** bytes of the base weights on the device (the allocator's count) */
  base_bytes: number;
  /** the device's bytes in use while training (base, adapter, no micro-batch at rest) */
  device_bytes: number;
  /** the process's resident set after the steps */
  rss_bytes: number;
}

/** The base formats the precision scenario compares (mode name → BaseFormat). */
export const PRECISION_MODES: Record<string, BaseFormat> = {
  f32: {},
  bf16: { computeDtype: 'bf16' },
  int8: { quantize: 'int8' },
  nf4: { quantize: 'nf4' },
  'nf4+bf16': { quantize: 'nf4', computeDtype: 'bf16' },
};

/**
 * "precision": training throughput and resident memory of a preset (bench, or 1b) on one
 * device with its base in each format: the weights are loaded (quantized at load) for one mode
 * at a time, a rank-16 adapter on all seven projections trains `steps` micro-batches after one
 * warm-up, best step time counts. 1b on a small CPU: use few steps and short sequences.
 */
export async function precisionScenario(
  o: { preset: 'bench' | '1b'; threads: number; steps: number; micro: number; seqLen: number; modes: string[] },
  log: (s: string) => void,
): Promise<PrecisionBenchRecord[]> {
  const dir = openModelDir(await ensureModel(cacheModels(), o.preset, 0, log));
  const c = dir.config;
  const plan = { lo: 0, hi: c.numLayers, first: true, last: true };
  const spec: LoraSpec = { r: 16, alpha: 32, dropout: 0, targets: [...LORA_TARGETS], useRslora: false, seed: 0 };
  const out: PrecisionBenchRecord[] = [];
  log(
    `precision: ${o.preset} model (${c.numLayers} layers, hidden ${c.hiddenSize}, stored ${c.torchDtype}), ${o.micro}×${o.seqLen} tokens per micro-batch, ${o.threads} thread(s)`,
  );
  for (const mode of o.modes) {
    const fmt = PRECISION_MODES[mode];
    if (!fmt) throw new Error(`precision: unknown mode '${mode}' (known: ${Object.keys(PRECISION_MODES).join(', ')})`);
    const device = openDevice('cpu:0', { threads: o.threads });
    const u0 = device.memory().used;
    const weights = await loadStageWeights(device, dir, plan, fmt);
    const baseBytes = device.memory().used - u0;
    const program = new StageProgram(
      device,
      c,
      plan,
      weights,
      fmt.computeDtype ? { computeDtype: fmt.computeDtype } : {},
    );
    const p = new LocalPipeline(c, [program]);
    await p.addAdapter(1, spec, freshState(c, spec));
    const mb = syntheticMicroBatch(new Rng(4), c, o.micro, o.seqLen);
    const data = assemble(1, [{ adapter: 1, serial: 0, mb }], mb.numTokens);
    let best = Infinity;
    for (let s = 0; s < o.steps + 1; s++) {
      const t0 = performance.now();
      await p.train(data);
      if (s > 0) best = Math.min(best, performance.now() - t0);
    }
    const rec: PrecisionBenchRecord = {
      scenario: 'precision',
      model: o.preset,
      mode,
      tokens: mb.numTokens,
      step_ms: Math.round(best),
      tokens_per_s: Math.round((mb.numTokens / best) * 1000 * 10) / 10,
      base_bytes: baseBytes,
      device_bytes: device.memory().used - u0,
      rss_bytes: process.memoryUsage().rss,
    };
    out.push(rec);
    log(
      `precision: ${mode.padEnd(9)} ${String(rec.tokens_per_s).padStart(8)} tokens/s (${rec.step_ms} ms per ${rec.tokens}-token micro-batch); base ${(baseBytes / 1e9).toFixed(3)} GB, device ${(rec.device_bytes / 1e9).toFixed(3)} GB, process RSS ${(rec.rss_bytes / 1e9).toFixed(2)} GB`,
    );
    await p.close();
    freeStageWeights(weights);
    device.trimCache();
  }
  return out;
}
