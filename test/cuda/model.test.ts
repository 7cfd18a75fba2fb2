// The whole model on the GPU: for the llama-tiny fixture and each family fixture (Llama 3 RoPE
// scaling, Qwen2 q/k/v biases, Qwen3 q/k norms, Mistral sliding window), one stage holding
// every layer runs the fixture batch with its PEFT adapter on cuda:0 and on the CPU. Checked:
// the logits, the loss with and without the adapter, and every LoRA gradient, each against
// the float64 fixture (the same tolerances the CPU backend meets in test/model/) and against
// the CPU model. Then the same with the base weights stored as bf16 on both devices.
//
// Tolerances:
//   f32 weights, vs float64: those of test/model/reference.test.ts and families.test.ts
//     (logits atol 2e-5 rtol 1e-4, loss atol 1e-6 rtol 2e-6, gradients 2e-5 of the tensor's
//     largest element + 1e-4 relative): cuBLAS computes f32 GEMMs in f32 (no TF32 unless
//     MLORA_CUDA_TF32=1), so only the summation order differs from the CPU's.
//   f32 weights, GPU vs CPU: logits atol 5e-5 rtol 2e-4 (two f32 summation orders, each within
//     the bound above of float64).
//   bf16 weights, GPU vs CPU: ‖gpu − cpu‖ / ‖cpu‖ ≤ 2e-2 for logits and each gradient, loss
//     within 1e-2 relative: cuBLAS rounds the f32 activations to bf16 before each base GEMM
//     (8 bits of mantissa, f32 accumulation), the CPU multiplies them in f32.
// Skipped without a GPU; in a device-check rehearsal cpu:1 stands in (test/cuda/target.ts).
import t, { type Test } from 'tap';
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { openModelDir } from '../../lib/io/hf-model.js';
import { loadStageWeights } from '../../lib/model/weights.js';
import { StageProgram } from '../../lib/model/stage.js';
import { openDevice } from '../../lib/tensor.js';
import { addPeftAdapter } from '../../lib/model/single.js';
import type { DType } from '../../lib/native.js';
import { assertClose } from '../support/helpers.js';
import { assertLoraGrads, fixtureBatch, loraGrads } from '../model/fixture.js';
import { gpuLabel, gpuSpec, noGpu } from './target.js';

const fixtures = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../../../test/fixtures');
const CASES = [
  { name: 'llama-tiny', dir: path.join(fixtures, 'llama-tiny') },
  ...['llama3-scaled', 'qwen2', 'qwen3', 'mistral-window'].map((f) => ({
    name: f,
    dir: path.join(fixtures, 'families', f),
  })),
];

interface Ref {
  input_ids: number[][];
  labels: number[][];
  loss: number;
  loss_base?: number;
  logits_first4: number[][][];
}

interface RunResult {
  logits: Float32Array;
  loss: number;
  lossBase: number;
  grads: Map<string, Float32Array>;
}

/** The fixture batch through the whole model on one device: logits, both losses, the LoRA gradients. */
async function runModel(spec: string, caseDir: string, ref: Ref, dtype?: DType): Promise<RunResult> {
  const dir = openModelDir(path.join(caseDir, 'model'));
  const config = dir.config;
  const device = openDevice(spec, { threads: 2, budget: 2 ** 31 });
  const plan = { lo: 0, hi: config.numLayers, first: true, last: true };
  const program = new StageProgram(
    device,
    config,
    plan,
    await loadStageWeights(device, dir, plan, dtype ? { dtype } : {}),
    { gatherTargets: false },
  );
  try {
    const { spec: lspec } = addPeftAdapter(program, path.join(caseDir, 'adapter'), 1);
    const withA = fixtureBatch(program, ref.input_ids, ref.labels);
    const base = fixtureBatch(program, ref.input_ids, ref.labels, false);
    const logits = await program.logits(withA.mb, withA.tokens);
    const lossBase = (await program.evaluate(base.mb, base.tokens))!.reduce((a, b) => a + b, 0) / base.count;
    const loss = (await program.trainLast(withA.mb, withA.tokens)).reduce((a, b) => a + b, 0) / withA.count;
    return { logits, loss, lossBase, grads: loraGrads(program, lspec) };
  } finally {
    program.free();
  }
}

function relNorm(got: ArrayLike<number>, want: ArrayLike<number>): number {
  let d = 0,
    w = 0;
  for (let i = 0; i < want.length; i++) {
    d += (got[i]! - want[i]!) ** 2;
    w += want[i]! ** 2;
  }
  return Math.sqrt(d) / Math.sqrt(w);
}

function firstLogits(logits: Float32Array, B: number, T: number, V: number): number[] {
  const out: number[] = [];
  for (let b = 0; b < B; b++)
    for (let p = 0; p < 4; p++) for (let v = 0; v < V; v++) out.push(logits[(b * T + p) * V + v]!);
  return out;
}

async function checkCase(t: Test, c: (typeof CASES)[number]) {
  const ref = JSON.parse(fs.readFileSync(path.join(c.dir, 'ref.json'), 'utf8')) as Ref;
  const V = openModelDir(path.join(c.dir, 'model')).config.vocabSize;
  const B = ref.input_ids.length,
    T = ref.input_ids[0]!.length;
  const cpu = await runModel('cpu:0', c.dir, ref);
  const gpu = await runModel(gpuSpec, c.dir, ref);
  // against float64
  assertClose(
    t,
    firstLogits(gpu.logits, B, T, V),
    ref.logits_first4.flat(2),
    { atol: 2e-5, rtol: 1e-4 },
    `${c.name}: ${gpuLabel} logits at positions 0..3 vs float64`,
  );
  assertClose(t, [gpu.loss], [ref.loss], { atol: 1e-6, rtol: 2e-6 }, `${c.name}: ${gpuLabel} loss vs float64`);
  if (ref.loss_base !== undefined)
    assertClose(
      t,
      [gpu.lossBase],
      [ref.loss_base],
      { atol: 1e-6, rtol: 2e-6 },
      `${c.name}: ${gpuLabel} loss without the adapter vs float64`,
    );
  const layers = openModelDir(path.join(c.dir, 'model')).config.numLayers;
  const refFile = path.join(c.dir, 'grads.safetensors');
  assertLoraGrads(t, gpu.grads, refFile, layers, { atol: 2e-5, rtol: 1e-4 }, `${c.name}: ${gpuLabel} `);
  // against the CPU model, every logit
  assertClose(
    t,
    gpu.logits,
    cpu.logits,
    { atol: 5e-5, rtol: 2e-4 },
    `${c.name}: ${gpuLabel} vs cpu:0, all ${gpu.logits.length} logits`,
  );
  assertClose(
    t,
    [gpu.lossBase, gpu.loss],
    [cpu.lossBase, cpu.loss],
    { atol: 1e-6, rtol: 2e-6 },
    `${c.name}: ${gpuLabel} vs cpu:0, both losses`,
  );
}

for (const c of CASES) {
  t.test(
    `${c.name}: logits, losses and every LoRA gradient on ${gpuLabel} vs float64 and vs the CPU`,
    { skip: noGpu },
    (t) => checkCase(t, c),
  );
}

t.test(`bf16 base weights: ${gpuLabel} vs cpu:0 (llama-tiny, qwen3)`, { skip: noGpu }, async (t) => {
  for (const c of CASES.filter((x) => x.name === 'llama-tiny' || x.name === 'qwen3')) {
    const ref = JSON.parse(fs.readFileSync(path.join(c.dir, 'ref.json'), 'utf8')) as Ref;
    const cpu = await runModel('cpu:0', c.dir, ref, 'bf16');
    const gpu = await runModel(gpuSpec, c.dir, ref, 'bf16');
    const e = relNorm(gpu.logits, cpu.logits);
    t.ok(e <= 2e-2, `${c.name} bf16: logits ‖gpu−cpu‖/‖cpu‖ = ${e.toExponential(2)} (≤ 2e-2)`);
    assertClose(
      t,
      [gpu.loss, gpu.lossBase],
      [cpu.loss, cpu.lossBase],
      { atol: 0, rtol: 1e-2 },
      `${c.name} bf16: both losses`,
    );
    let worst = 0,
      worstName = '';
    for (const [name, g] of gpu.grads) {
      const r = relNorm(g, cpu.grads.get(name)!);
      if (!(r <= worst)) [worst, worstName] = [r, name];
    }
    t.ok(
      worst <= 2e-2,
      `${c.name} bf16: worst LoRA gradient ‖gpu−cpu‖/‖cpu‖ = ${worst.toExponential(2)} (${worstName}; ≤ 2e-2)`,
    );
  }
});
