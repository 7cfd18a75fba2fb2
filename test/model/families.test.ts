// The model families against independent float64 numbers (test/fixtures/families, made by a
// float64 PyTorch implementation of the transformers modeling code + PEFT; its README lists the
// semantics): Llama 3.x RoPE scaling, Qwen2 (q/k/v biases, tied embeddings, a switched-off
// window), Qwen3 (q/k norms, head_dim 32 != hidden / heads) and Mistral (sliding window 8 at
// length 48). Per family: the loss with and without the adapter, the logits of the first and
// last four positions, every LoRA gradient, and generation with the KV cache against the full
// forward. When a loss is off, the fixture's diagnostic losses (one feature deliberately wrong
// each) name the likely cause in the failure message.
import t, { type Test } from 'tap';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { openModelDir, type ModelDir } from '../../lib/io/hf-model.js';
import { loadStageWeights, stageWeightBytes } from '../../lib/model/weights.js';
import { StageProgram, type StageOptions } from '../../lib/model/stage.js';
import { addPeftAdapter, openSingleModel } from '../../lib/model/single.js';
import { KvCacheDecoder } from '../../lib/model/generate.js';
import { fullLogits } from '../support/logits.js';
import { assertClose, cpuDevice } from '../support/helpers.js';
import { assertLoraGrads, fixtureBatch, loraGrads } from './fixture.js';

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../../../test/fixtures/families');
export const FAMILIES = ['llama3-scaled', 'qwen2', 'qwen3', 'mistral-window'] as const;

interface Ref {
  input_ids: number[][];
  labels: number[][];
  loss: number;
  loss_base: number;
  logits_first4: number[][][];
  logits_last4: number[][][];
  logits_base_first4: number[][][];
  meta: { layer_windows: Array<number | null>; logits_last4_positions: number[] };
  diagnostic_losses: Record<string, { loss: number; what: string }>;
}
const readRef = (fam: string) => JSON.parse(fs.readFileSync(path.join(root, fam, 'ref.json'), 'utf8')) as Ref;

/** The diagnostic entry nearest a wrong loss: the likely cause. */
function nearestDiagnostic(ref: Ref, loss: number): string {
  const [name, d] = Object.entries(ref.diagnostic_losses).sort(
    (a, b) => Math.abs(a[1].loss - loss) - Math.abs(b[1].loss - loss),
  )[0]!;
  return `nearest diagnostic: ${name} (${d.what}, ${d.loss})`;
}

async function setup(dir: ModelDir, fam: string, options: StageOptions = { gatherTargets: false }) {
  const config = dir.config;
  const device = cpuDevice(1);
  const plan = { lo: 0, hi: config.numLayers, first: true, last: true };
  const used0 = device.memory().used;
  const weights = await loadStageWeights(device, dir, plan);
  const weightBytes = device.memory().used - used0;
  const program = new StageProgram(device, config, plan, weights, options);
  const { spec } = addPeftAdapter(program, path.join(root, fam, 'adapter'), 1);
  return {
    config,
    program,
    spec,
    weightBytes,
    expectedWeightBytes: stageWeightBytes(dir, plan, {}, device.memory().budget),
  };
}

/** Logits rows [b][p] of a [B·T, V] matrix, flattened, for the given positions. */
function pick(logits: Float32Array, B: number, T: number, V: number, positions: number[]): number[] {
  const out: number[] = [];
  for (let b = 0; b < B; b++)
    for (const p of positions) for (let v = 0; v < V; v++) out.push(logits[(b * T + p) * V + v]!);
  return out;
}

// Tolerances, float32 vs float64 (the fixture's own float32 run: loss <= 6e-7, logits <= 3e-6,
// gradients <= 2.4e-6 of their largest element; ours sums in other orders and uses exp_approx):
// the bounds of test/model/reference.test.ts, all far below the 3e-3 by which every diagnostic
// mistake moves the loss.
const TOL_LOGITS = { atol: 2e-5, rtol: 1e-4 };
const TOL_LOSS = { atol: 1e-6, rtol: 2e-6 };
const GRAD_REL = 2e-5;

async function checkFamily(t: Test, fam: string, dir: ModelDir, label: string) {
  const ref = readRef(fam);
  const { config, program, spec, weightBytes, expectedWeightBytes } = await setup(dir, fam);
  t.equal(
    weightBytes,
    expectedWeightBytes,
    `${label}: the base weights take stageWeightBytes (${expectedWeightBytes}), biases and q/k norms included`,
  );
  const B = ref.input_ids.length,
    T = ref.input_ids[0]!.length,
    V = config.vocabSize;
  t.same(
    config.layerWindows ?? new Array(config.numLayers).fill(0),
    ref.meta.layer_windows.map((w) => w ?? 0),
    `${label}: the windows of the layers`,
  );
  const withA = fixtureBatch(program, ref.input_ids, ref.labels);
  const base = fixtureBatch(program, ref.input_ids, ref.labels, false);
  const logits = await program.logits(withA.mb, withA.tokens);
  assertClose(
    t,
    pick(logits, B, T, V, [0, 1, 2, 3]),
    ref.logits_first4.flat(2),
    TOL_LOGITS,
    `${label}: logits at positions 0..3`,
  );
  assertClose(
    t,
    pick(logits, B, T, V, ref.meta.logits_last4_positions),
    ref.logits_last4.flat(2),
    TOL_LOGITS,
    `${label}: logits at positions 44..47`,
  );
  const baseLogits = await program.logits(base.mb, base.tokens);
  assertClose(
    t,
    pick(baseLogits, B, T, V, [0, 1, 2, 3]),
    ref.logits_base_first4.flat(2),
    TOL_LOGITS,
    `${label}: base logits at positions 0..3`,
  );
  const lossBase = (await program.evaluate(base.mb, base.tokens))!.reduce((a, b) => a + b, 0) / base.count;
  assertClose(t, [lossBase], [ref.loss_base], TOL_LOSS, `${label}: loss without the adapter`);
  const loss = (await program.trainLast(withA.mb, withA.tokens)).reduce((a, b) => a + b, 0) / withA.count;
  assertClose(
    t,
    [loss],
    [ref.loss],
    TOL_LOSS,
    `${label}: loss ${loss} vs ${ref.loss}; ${nearestDiagnostic(ref, loss)}`,
  );
  const grads = loraGrads(program, spec);
  const refFile = path.join(root, fam, 'grads.safetensors');
  assertLoraGrads(t, grads, refFile, config.numLayers, { atol: GRAD_REL, rtol: 1e-4 }, `${label}: `);
  program.free();
  return { loss, logits };
}

for (const fam of FAMILIES) {
  t.test(`${fam}: loss, base loss, logits and every LoRA gradient vs float64`, async (t) => {
    const first = await checkFamily(t, fam, openModelDir(path.join(root, fam, 'model')), fam);
    if (fam !== 'llama3-scaled') return;
    // the transformers-5 spelling: rope_parameters with rope_theta inside; the same numbers, bitwise
    const alt = fs.mkdtempSync(path.join(os.tmpdir(), 'mlora-rope-parameters-'));
    t.teardown(() => fs.rmSync(alt, { recursive: true, force: true }));
    fs.copyFileSync(path.join(root, fam, 'config.rope_parameters.json'), path.join(alt, 'config.json'));
    fs.symlinkSync(path.join(root, fam, 'model/model.safetensors'), path.join(alt, 'model.safetensors'));
    const json = JSON.parse(fs.readFileSync(path.join(alt, 'config.json'), 'utf8')) as Record<string, unknown>;
    t.ok(
      json.rope_parameters && json.rope_theta === undefined && json.rope_scaling === undefined,
      'the alternative config has only rope_parameters',
    );
    const second = await checkFamily(t, fam, openModelDir(alt), `${fam} (rope_parameters)`);
    t.equal(second.loss, first.loss, 'rope_parameters: the same loss, bitwise');
    t.ok(
      Buffer.from(second.logits.buffer).equals(Buffer.from(first.logits.buffer)),
      'rope_parameters: the same logits, bitwise',
    );
  });
}

t.test(
  "config variants land on the fixture's diagnostic losses (other windows, no scaling, another theta)",
  async (t) => {
    // each diagnostic loss is the float64 loss of the same weights with one feature changed; the
    // config changes below make mlora compute exactly those models
    const variants: Array<[string, Record<string, unknown>, string]> = [
      ['llama3-scaled', { rope_scaling: null }, 'rope_scaling_ignored'],
      ['llama3-scaled', { rope_theta: 10000 }, 'rope_theta_10000'],
      ['qwen2', { use_sliding_window: true, max_window_layers: 0 }, 'sliding_window_applied_although_off'],
      [
        'qwen2',
        { use_sliding_window: true, layer_types: ['sliding_attention', 'sliding_attention'] },
        'sliding_window_applied_although_off',
      ],
      ['qwen2', { rope_theta: 10000 }, 'rope_theta_10000'],
      ['qwen3', { rope_theta: 10000 }, 'rope_theta_10000'],
      ['mistral-window', { sliding_window: null }, 'sliding_window_ignored'],
      ['mistral-window', { sliding_window: 9 }, 'sliding_window_one_wider'],
    ];
    const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'mlora-family-variants-'));
    t.teardown(() => fs.rmSync(tmp, { recursive: true, force: true }));
    for (const [i, [fam, patch, diag]] of variants.entries()) {
      const ref = readRef(fam);
      const dir = path.join(tmp, String(i));
      fs.mkdirSync(dir);
      const json = JSON.parse(fs.readFileSync(path.join(root, fam, 'model/config.json'), 'utf8')) as Record<
        string,
        unknown
      >;
      fs.writeFileSync(path.join(dir, 'config.json'), JSON.stringify({ ...json, ...patch }));
      fs.symlinkSync(path.join(root, fam, 'model/model.safetensors'), path.join(dir, 'model.safetensors'));
      const { program } = await setup(openModelDir(dir), fam);
      const b = fixtureBatch(program, ref.input_ids, ref.labels);
      const loss = (await program.evaluate(b.mb, b.tokens))!.reduce((a, x) => a + x, 0) / b.count;
      program.free();
      assertClose(
        t,
        [loss],
        [ref.diagnostic_losses[diag]!.loss],
        TOL_LOSS,
        `${fam} with ${JSON.stringify(patch)}: the '${diag}' loss`,
      );
    }
  },
);

t.test('activation recomputation gives the same losses and gradients, bitwise, for every family', async (t) => {
  for (const fam of FAMILIES) {
    const ref = readRef(fam);
    const dir = openModelDir(path.join(root, fam, 'model'));
    const runs = [];
    for (const recompute of [false, true]) {
      const { program } = await setup(dir, fam, { recompute });
      const b = fixtureBatch(program, ref.input_ids, ref.labels);
      const losses = await program.trainLast(b.mb, b.tokens);
      runs.push({ losses, grads: program.adapter(1).grads.read() as Float32Array });
      program.free();
    }
    const same = (a: Float32Array, b: Float32Array) =>
      Buffer.from(a.buffer, a.byteOffset, a.byteLength).equals(Buffer.from(b.buffer, b.byteOffset, b.byteLength));
    t.ok(
      same(runs[0]!.losses, runs[1]!.losses) && same(runs[0]!.grads, runs[1]!.grads),
      `${fam}: recompute == saved activations`,
    );
  }
});

t.test('generation with the KV cache equals the full forward, for every family', async (t) => {
  for (const fam of FAMILIES) {
    const ref = readRef(fam);
    const m = await openSingleModel(path.join(root, fam, 'model'), path.join(root, fam, 'adapter'));
    const ids = ref.input_ids[0]!;
    const full = await fullLogits(m, ids);
    const V = m.config.vocabSize;
    const dec = new KvCacheDecoder(m, ids.length);
    // a 5-token prefill, then one token at a time past the window (mistral: 8) and llama3's original context (16)
    const got: number[] = [];
    const want: number[] = [];
    let at = 0;
    for (const chunk of [5, ...new Array(ids.length - 5).fill(1)] as number[]) {
      const lg = await dec.feed(ids.slice(at, at + chunk));
      at += chunk;
      got.push(...lg);
      want.push(...full.subarray((at - 1) * V, at * V));
    }
    dec.free();
    m.free();
    // the same ops on one row instead of many: GEMM blocking and attention's summation order differ
    assertClose(
      t,
      got,
      want,
      { atol: 2e-5, rtol: 1e-4 },
      `${fam}: KV-cache logits at positions 4..${ids.length - 1} vs full recompute`,
    );
  }
});
