// A layer cut between two stages after its attention (StagePlan.lastAttnOnly / firstMlpOnly):
// the stage programs of a split, run in turn (forward down the stages, the last stage's loss and
// backward, backward up), give bitwise the losses and adapter gradients of the
// whole model on one stage, for cuts at every kind of place (first stage attention only, last
// stage MLP only, a middle stage with halves at both ends), with and without recomputation, in
// training and in evaluation, on LLaMA and on the Qwen2 (q/k/v biases) and Qwen3 (q/k norms)
// layer variants. It holds because each half runs exactly the ops of the whole layer
// in its order, and the adapter slices partition the full flat layout (checked too).
import t from 'tap';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { openModelDir } from '../../lib/io/hf-model.js';
import { freeStageWeights, loadStageWeights, stageWeightBytes } from '../../lib/model/weights.js';
import { StageProgram, type MicroBatch, type StagePlan } from '../../lib/model/stage.js';
import { isAttentionTarget, layerPart } from '../../lib/model/batch.js';
import { sliceLayout, type LoraSpec } from '../../lib/lora/adapter.js';
import { freshState, joinSlices, stageSliceRange, type AdapterState } from '../../lib/lora/state.js';
import { explicitSplit } from '../../lib/schedule/split.js';
import { LORA_TARGETS, PRESETS } from '../../lib/model/config.js';
import { writeRandomLlama } from '../../lib/io/random-model.js';
import { writeTokenizerFiles } from '../../lib/data/bpe.js';
import { Rng } from '../../lib/rng.js';
import { cpuDevice, randn } from '../support/helpers.js';
import { bitwiseEqual, maxDiff } from '../support/compare.js';
import { tinyModelWithLayers } from '../support/models.js';
import type { Tensor } from '../../lib/tensor.js';

const modelDir = await tinyModelWithLayers(3, 11);
t.teardown(() => fs.rmSync(modelDir, { recursive: true, force: true }));
const dir = openModelDir(modelDir);
const config = dir.config;
const H = config.hiddenSize;
const device = cpuDevice(1);

const spec: LoraSpec = { r: 4, alpha: 8, dropout: 0.1, targets: [...LORA_TARGETS], useRslora: false, seed: 3 };
// B = 0 at PEFT init would leave A's gradients zero: random A and B, so every module's gradient is nonzero
const state: AdapterState = freshState(config, spec);
state.params.set(randn(new Rng(5, 'half-layer'), state.params.length, 0.05));

// two sequences of 24 and 16 tokens of adapter 1, every row but each sequence's last targeted
const lens = [24, 16];
const N = lens.reduce((a, b) => a + b, 0);
const rng = new Rng(9, 'half-layer-data');
const tokens = Int32Array.from({ length: N }, () =>
  rng.int(Math.min(config.vocabSize, PRESETS['tiny-qwen2'].vocabSize, PRESETS['tiny-qwen3'].vocabSize)),
);
const positions = Int32Array.from(lens.flatMap((n) => Array.from({ length: n }, (_, i) => i)));
const cuSeqlens = Int32Array.from([0, 24, 40]);
const targets = Int32Array.from({ length: N }, (_, i) =>
  i === 23 || i === 39
    ? -100
    : rng.int(Math.min(config.vocabSize, PRESETS['tiny-qwen2'].vocabSize, PRESETS['tiny-qwen3'].vocabSize)),
);
const weights = Float32Array.from(targets, (x) => (x < 0 ? 0 : 1 / (N - 2)));
const mb = (id: number): MicroBatch => ({
  id,
  numTokens: N,
  segments: [{ adapter: 1, rowStart: 0, rowEnd: N, serial: 4 }],
  tensors: {
    positions: device.fromArray('i32', [N], positions),
    cuSeqlens: device.fromArray('i32', [3], cuSeqlens),
    targets: device.fromArray('i32', [N], targets),
    weights: device.fromArray('f32', [N], weights),
  },
});

async function programs(plans: StagePlan[], recompute: boolean): Promise<StageProgram[]> {
  const out: StageProgram[] = [];
  for (const plan of plans) {
    const p = new StageProgram(device, config, plan, await loadStageWeights(device, dir, plan), { recompute });
    p.addAdapterState(1, spec, state);
    out.push(p);
  }
  return out;
}

interface Result {
  losses: Float32Array;
  evalLosses: Float32Array;
  grads: Float32Array;
}

/** Training forward/backward and an evaluation forward of the micro-batch through the stages in turn. */
async function run(stages: StageProgram[], hidden = H): Promise<Result> {
  const S = stages.length;
  const ids = device.fromArray('i32', [N], tokens);
  const acts: Tensor[] = stages.slice(0, -1).map(() => device.alloc('f32', [N, hidden]));
  const grad = device.alloc('f32', [N, hidden]);
  const m = mb(1);
  for (let s = 0; s < S - 1; s++) await stages[s]!.forward(m, s === 0 ? ids : acts[s - 1]!, acts[s]!);
  const losses = await stages[S - 1]!.trainLast(m, S === 1 ? ids : acts[S - 2]!, S === 1 ? undefined : grad);
  for (let s = S - 2; s >= 0; s--) await stages[s]!.backward(m, grad);
  const e = mb(2);
  for (let s = 0; s < S - 1; s++) await stages[s]!.evaluate(e, s === 0 ? ids : acts[s - 1]!, acts[s]!);
  const evalLosses = (await stages[S - 1]!.evaluate(e, S === 1 ? ids : acts[S - 2]!))!;
  const grads = joinSlices(
    stages.map((p) => {
      const a = p.adapter(1);
      const g = (a.grads.read() as Float32Array).slice(0, a.size);
      return { params: g, m: g, v: g, version: 0 };
    }),
  ).params;
  for (const x of [ids, grad, ...acts]) x.free();
  for (const p of stages) p.free();
  return { losses, evalLosses, grads };
}

const whole = await run(await programs(explicitSplit(config, [3]), false));
t.ok(
  whole.grads.every((g) => Number.isFinite(g)) && whole.grads.filter((g) => g !== 0).length > 0.9 * whole.grads.length,
  'the reference gradients are finite and nonzero almost everywhere',
);

const splits = [
  [1.5, 1.5],
  [0.5, 2.5],
  [2.5, 0.5],
  [0.5, 2, 0.5],
  [1, 1.5, 0.5],
];
for (const layers of splits) {
  for (const recompute of [false, true]) {
    await t.test(`split ${JSON.stringify(layers)}${recompute ? ', recompute' : ''} vs one stage`, async (t) => {
      const plans = explicitSplit(config, layers);
      const got = await run(await programs(plans, recompute));
      t.ok(
        bitwiseEqual(got.losses, whole.losses),
        `training losses bitwise (max |diff| ${maxDiff(got.losses, whole.losses)})`,
      );
      t.ok(
        bitwiseEqual(got.grads, whole.grads),
        `adapter gradients bitwise (max |diff| ${maxDiff(got.grads, whole.grads)})`,
      );
      t.ok(
        bitwiseEqual(got.evalLosses, whole.evalLosses),
        `evaluation losses bitwise (max |diff| ${maxDiff(got.evalLosses, whole.evalLosses)})`,
      );
    });
  }
}

t.test(
  'adapter slices of a split partition the full layout, each holding the modules of the halves it runs',
  async (t) => {
    const full = sliceLayout(config, spec, 0, config.numLayers);
    for (const layers of splits) {
      const plans = explicitSplit(config, layers);
      let at = 0;
      const seen: string[] = [];
      for (const p of plans) {
        const [b, e] = stageSliceRange(config, spec, p);
        t.equal(b, at, `${JSON.stringify(layers)}: stage [${p.lo}, ${p.hi}) starts where the previous one ended`);
        const mine = sliceLayout(config, spec, p.lo, p.hi, p);
        t.equal(e - b, mine.size, 'its range is its slice');
        for (const m of mine.modules) {
          const part = layerPart(p, m.layer);
          const attn = isAttentionTarget(m.target);
          if (part !== 'all' && attn !== (part === 'attn'))
            t.fail(`layer ${m.layer} ${m.target} on a stage that runs its other half`);
          seen.push(`${m.layer}/${m.target}`);
        }
        at = e;
      }
      t.equal(at, full.size, 'the slices cover the layout');
      t.same(
        seen,
        full.modules.map((m) => `${m.layer}/${m.target}`),
        'every module once, in layout order',
      );
    }
  },
);

t.test('each half of a cut layer loads and counts only its own weights', async (t) => {
  const total = stageWeightBytes(dir, explicitSplit(config, [3])[0]!);
  for (const layers of splits) {
    const plans = explicitSplit(config, layers);
    const sum = plans.reduce((a, p) => a + stageWeightBytes(dir, p), 0);
    t.equal(sum, total, `${JSON.stringify(layers)}: the stages' weights add up to the model's`);
    for (const p of plans) {
      const w = await loadStageWeights(device, dir, p);
      for (let i = p.lo; i < p.hi; i++) {
        const part = layerPart(p, i);
        const L = w.layers[i - p.lo]!;
        t.equal(!!L.q && !!L.attnNorm, part !== 'mlp', `layer ${i} (${part}): attention weights iff it runs that half`);
        t.equal(!!L.down && !!L.mlpNorm, part !== 'attn', `layer ${i} (${part}): MLP weights iff it runs that half`);
      }
      freeStageWeights(w);
    }
  }
});

t.test('plans with halves that cannot run are refused with the reason', async (t) => {
  const w = await loadStageWeights(device, dir, { lo: 0, hi: 1, first: true, last: false });
  t.throws(
    () => new StageProgram(device, config, { lo: 0, hi: 1, first: true, last: false, firstMlpOnly: true }, w),
    /firstMlpOnly on the first stage/,
  );
  const w2 = await loadStageWeights(device, dir, { lo: 2, hi: 3, first: false, last: true });
  t.throws(
    () => new StageProgram(device, config, { lo: 2, hi: 3, first: false, last: true, lastAttnOnly: true }, w2),
    /lastAttnOnly on the last stage/,
  );
  const w3 = await loadStageWeights(device, dir, { lo: 1, hi: 2, first: false, last: false });
  t.throws(
    () =>
      new StageProgram(
        device,
        config,
        { lo: 1, hi: 2, first: false, last: false, firstMlpOnly: true, lastAttnOnly: true },
        w3,
      ),
    /on a stage of one layer/,
  );
});

// The layer variants' fields live in the attention half: q/k/v biases (Qwen2) and q/k norms (Qwen3).
for (const family of ['tiny-qwen2', 'tiny-qwen3'] as const) {
  await t.test(`${family}: a cut after a layer's attention vs one stage`, async (t) => {
    const d = fs.mkdtempSync(path.join(os.tmpdir(), 'mlora-half-'));
    t.teardown(() => fs.rmSync(d, { recursive: true, force: true }));
    const c = { ...PRESETS[family], numLayers: 2 };
    await writeTokenizerFiles(d, { vocabSize: c.vocabSize, modelMaxLength: c.maxPositionEmbeddings });
    writeRandomLlama(d, c, { seed: 2 });
    const fdir = openModelDir(d);
    const fstate = freshState(fdir.config, spec);
    fstate.params.set(randn(new Rng(6, 'half-layer', family), fstate.params.length, 0.05));
    const build = async (plans: StagePlan[]) => {
      const out: StageProgram[] = [];
      for (const plan of plans) {
        const p = new StageProgram(device, fdir.config, plan, await loadStageWeights(device, fdir, plan));
        p.addAdapterState(1, spec, fstate);
        out.push(p);
      }
      return out;
    };
    const want = await run(await build(explicitSplit(fdir.config, [2])), fdir.config.hiddenSize);
    for (const layers of [
      [0.5, 1.5],
      [1.5, 0.5],
    ]) {
      const got = await run(await build(explicitSplit(fdir.config, layers)), fdir.config.hiddenSize);
      t.ok(bitwiseEqual(got.losses, want.losses), `${JSON.stringify(layers)}: training losses bitwise`);
      t.ok(
        bitwiseEqual(got.grads, want.grads),
        `${JSON.stringify(layers)}: adapter gradients bitwise (max |diff| ${maxDiff(got.grads, want.grads)})`,
      );
      t.ok(bitwiseEqual(got.evalLosses, want.evalLosses), `${JSON.stringify(layers)}: evaluation losses bitwise`);
    }
  });
}
