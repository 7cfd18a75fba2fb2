// A short pipelined training run on the GPU: two stage actors (worker threads) both on cuda:0,
// two adapters (dropout on, so the masks must line up), three optimizer steps of two
// micro-batches each, the adapters sharing BatchLoRA messages and then apart. Compared with
//   - the same run on one in-thread stage on cuda:0: bitwise (the argument of
//     test/actors/equivalence.test.ts: every kernel computes each row of a micro-batch
//     independently of the others, the GPU kernels use no floating-point atomics, and each
//     stage runs the same program on the same shapes, so the split changes no bit);
//   - the same run on one CPU stage: the loss of every row within 1e-5 relative, and
//     params / AdamW m / v within atol 2e-6, rtol 1e-3 (f32 summation orders differ; AdamW
//     divides by √v, so where a gradient is near 0 a rounding difference moves an update by
//     up to lr·1e-3; lr 1e-3, 3 steps).
// Skipped without a GPU; in a device-check rehearsal cpu:1 stands in (test/cuda/target.ts).
import t from 'tap';
import fs from 'node:fs';
import { openModelDir } from '../../lib/io/hf-model.js';
import { loadStageWeights } from '../../lib/model/weights.js';
import { StageProgram } from '../../lib/model/stage.js';
import { freshState, type AdapterState } from '../../lib/lora/state.js';
import type { LoraSpec } from '../../lib/lora/adapter.js';
import { openDevice } from '../../lib/tensor.js';
import { Rng } from '../../lib/rng.js';
import { LocalPipeline } from '../../actors/local.js';
import { ActorPipeline } from '../../actors/runtime.js';
import { assemble } from '../../actors/scheduler/assemble.js';
import type { Pipeline } from '../../actors/pipeline.js';
import type { SourceMicroBatch } from '../../actors/scheduler/job-types.js';
import { balanceSplit } from '../../lib/schedule/split.js';
import { STEP, syntheticMicroBatch } from '../../scripts/cli/bench-common.js';
import { assertClose } from '../support/helpers.js';
import { stateBitwiseEqual, stateMaxDiff } from '../support/compare.js';
import { tinyModelWithLayers } from '../support/models.js';
import { gpuLabel, gpuSpec, noGpu } from './target.js';

const SPECS: LoraSpec[] = [
  { r: 4, alpha: 8, dropout: 0.1, targets: ['q_proj', 'v_proj', 'o_proj', 'down_proj'], useRslora: false, seed: 11 },
  { r: 8, alpha: 8, dropout: 0.05, targets: ['k_proj', 'up_proj', 'gate_proj'], useRslora: false, seed: 5 },
];
const STEPS = 3,
  MICRO = 2,
  SEQS = 2,
  SEQ_LEN = 48;

/** Three steps of both adapters: step 0 in shared BatchLoRA messages, then one message each, all in flight. */
/** Micro-batch m of step s: the step's loss is the mean over the targets of its MICRO micro-batches. */
function step(mb: SourceMicroBatch, s: number, m: number): SourceMicroBatch {
  return {
    ...mb,
    step: s,
    microIndex: m,
    microCount: MICRO,
    stepTargetTokens: MICRO * mb.numTargetTokens,
    lastOfStep: m === MICRO - 1,
  };
}

async function train(p: Pipeline, model: string): Promise<{ states: AdapterState[]; losses: number[] }> {
  const c = openModelDir(model).config;
  for (const [i, s] of SPECS.entries()) await p.addAdapter(i + 1, s, freshState(c, s));
  const rng = new Rng(21);
  const data = SPECS.map(() => Array.from({ length: STEPS * MICRO }, () => syntheticMicroBatch(rng, c, SEQS, SEQ_LEN)));
  const losses: number[] = [];
  let mbId = 1;
  for (let s = 0; s < STEPS; s++) {
    for (let m = 0; m < MICRO; m++) {
      const parts = SPECS.map((_, i) => ({
        adapter: i + 1,
        serial: s * MICRO + m,
        mb: step(data[i]![s * MICRO + m]!, s, m),
      }));
      const out =
        s === 0
          ? [await p.train(assemble(mbId++, parts, SPECS.length * SEQS * SEQ_LEN))]
          : await Promise.all(parts.map((x) => p.train(assemble(mbId++, [x], SEQS * SEQ_LEN))));
      for (const l of out) losses.push(...l);
    }
    for (let i = 0; i < SPECS.length; i++) await p.step(i + 1, { ...STEP, lr: 1e-3, step: s + 1 });
  }
  const states = [];
  for (let i = 0; i < SPECS.length; i++) states.push(await p.exportAdapter(i + 1));
  return { states, losses };
}

async function inThread(model: string, spec: string): Promise<{ states: AdapterState[]; losses: number[] }> {
  const dir = openModelDir(model);
  const device = openDevice(spec, { threads: 1, budget: 2 ** 30 });
  const plan = { lo: 0, hi: dir.config.numLayers, first: true, last: true };
  const p = new LocalPipeline(dir.config, [
    new StageProgram(device, dir.config, plan, await loadStageWeights(device, dir, plan)),
  ]);
  try {
    return await train(p, model);
  } finally {
    await p.close();
  }
}

t.test(`2 stage actors on ${gpuLabel} vs 1 stage on it (bitwise) and vs the CPU`, { skip: noGpu }, async (t) => {
  const model = await tinyModelWithLayers(3);
  t.teardown(() => fs.rmSync(model, { recursive: true, force: true }));
  const c = openModelDir(model).config;
  const cpu = await inThread(model, 'cpu:0');
  const one = await inThread(model, gpuSpec);
  const plans = balanceSplit(c, [1, 1]).plans;
  t.same(
    plans.map((p) => p.hi - p.lo - (p.firstMlpOnly ? 0.5 : 0) - (p.lastAttnOnly ? 0.5 : 0)),
    [1.5, 1.5],
    'layer split 1.5 + 1.5 (layer 1 cut after its attention)',
  );
  const p = await ActorPipeline.start({
    modelDir: model,
    config: c,
    plans,
    devices: [gpuSpec, gpuSpec],
    threads: [1, 1],
    budgets: [2 ** 30, 2 ** 30],
    maxTokens: SPECS.length * SEQS * SEQ_LEN,
    inflight: 4,
  });
  let two;
  try {
    two = await train(p, model);
  } finally {
    await p.close();
  }
  t.equal(two.losses.length, STEPS * MICRO * SPECS.length * SEQS * SEQ_LEN, 'a loss per row of every micro-batch');
  for (const [i, st] of two.states.entries()) {
    t.equal(st.version, STEPS, `adapter ${i + 1}: ${STEPS} optimizer steps`);
    t.ok(
      stateBitwiseEqual(st, one.states[i]!),
      `adapter ${i + 1}: 2 stage actors vs 1 stage on ${gpuLabel}, params/m/v bitwise (max |diff| ${stateMaxDiff(st, one.states[i]!)})`,
    );
    for (const k of ['params', 'm', 'v'] as const)
      assertClose(
        t,
        st[k],
        cpu.states[i]![k],
        { atol: 2e-6, rtol: 1e-3 },
        `adapter ${i + 1}: ${k}, ${gpuLabel} pipeline vs cpu:0`,
      );
  }
  t.same(two.losses, one.losses, `losses: 2 stage actors vs 1 stage on ${gpuLabel}, bitwise`);
  assertClose(t, two.losses, cpu.losses, { atol: 0, rtol: 1e-5 }, `losses: ${gpuLabel} pipeline vs cpu:0`);
});
