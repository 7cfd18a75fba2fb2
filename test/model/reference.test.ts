// The whole model against two independent references:
//  1. test/fixtures/llama-tiny: float64 numbers from a separate PyTorch LLaMA + PEFT LoRA
//     implementation (loss, logits, every LoRA gradient);
//  2. a float64 LLaMA + LoRA forward in plain JavaScript (./f64-llama.ts), used for the loss of
//     a packed batch and for finite-difference checks of LoRA gradients.
import t from 'tap';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { StageProgram, type StageOptions } from '../../lib/model/stage.js';
import { assertLoraGrads, first4, fixtureBatch as packFixture, loraGrads, setupFixture } from './fixture.js';
import { assertClose } from '../support/helpers.js';
import { f64Forward, f64Lora, packedBatch } from './f64-llama.js';
import { readFileSync } from 'node:fs';

const here = path.dirname(fileURLToPath(import.meta.url));
const fixtures = path.resolve(here, '../../../test/fixtures/llama-tiny');

interface Ref {
  input_ids: number[][];
  labels: number[][];
  loss: number;
  logits_first4: number[][][];
}
const ref = JSON.parse(readFileSync(path.join(fixtures, 'ref.json'), 'utf8')) as Ref;

const setup = (threads = 1, options: StageOptions = {}) =>
  setupFixture(path.join(fixtures, 'model'), path.join(fixtures, 'adapter'), threads, options);

/** The fixture batch (2 rows of 24 tokens) packed as two sequences of one adapter. */
function fixtureBatch(program: StageProgram) {
  return packFixture(program, ref.input_ids, ref.labels);
}

t.test('loss, logits and every LoRA gradient match the independent float64 implementation', async (t) => {
  const { config, program, spec } = await setup();
  const { mb, tokens, count } = fixtureBatch(program);
  const { got, want } = first4(await program.logits(mb, tokens), ref, config.vocabSize);
  // f32 vs f64: that implementation's own f32 run is 7e-7 away; our kernels sum in other orders
  assertClose(t, got, want, { atol: 2e-5, rtol: 1e-4 }, 'logits of the first 4 positions');
  const losses = await program.trainLast(mb, tokens);
  const loss = losses.reduce((a, b) => a + b, 0) / count;
  assertClose(t, [loss], [ref.loss], { atol: 1e-6, rtol: 2e-6 }, 'loss');
  const grads = loraGrads(program, spec);
  assertLoraGrads(t, grads, path.join(fixtures, 'grads.safetensors'), config.numLayers, { atol: 2e-5, rtol: 1e-4 });
  program.free();
});

t.test('the LM head on the targeted rows only (gathered) equals the head on every row, bitwise', async (t) => {
  const gather = await setup(1, { headBlockRows: 16 });
  const every = await setup(1, { headBlockRows: 16, gatherTargets: false });
  const { mb, tokens } = fixtureBatch(gather.program);
  const { mb: mbE, tokens: tokensE } = fixtureBatch(every.program);
  const labels = mb.tensors.targets!.read() as Int32Array;
  const N = labels.length;
  // the fixture's own labels (prompt rows masked), every row targeted, none, and a random third
  const masks: Array<[string, (i: number) => boolean]> = [
    ['fixture labels', () => true],
    ['no target at all', () => false],
    ['every row', () => true],
    ['a random third', (i) => (i * 2654435761) % 3 === 0],
  ];
  for (const [what, keep] of masks) {
    const lab = labels.map((l, i) => (what === 'every row' ? (l >= 0 ? l : i % 50) : keep(i) ? l : -100));
    mb.tensors.targets!.write(lab);
    mbE.tensors.targets!.write(lab);
    const gl = await gather.program.trainLast(mb, tokens);
    const el = await every.program.trainLast(mbE, tokensE);
    t.same(
      Array.from(gl),
      Array.from(el),
      `${what} (${lab.filter((l) => l >= 0).length}/${N} rows targeted): per-row losses`,
    );
    const gg = gather.program.adapter(1).grads.read() as Float32Array;
    const eg = every.program.adapter(1).grads.read() as Float32Array;
    let diff = -1;
    for (let i = 0; i < gg.length && diff < 0; i++)
      if (!Object.is(gg[i], eg[i]) && !(gg[i] === 0 && eg[i] === 0)) diff = i;
    t.equal(diff, -1, `${what}: LoRA gradients`);
    t.same(
      Array.from((await gather.program.evaluate(mb, tokens))!),
      Array.from((await every.program.evaluate(mbE, tokensE))!),
      `${what}: evaluation losses`,
    );
    await gather.program.zeroGrads(1);
    await every.program.zeroGrads(1);
  }
  gather.program.free();
  every.program.free();
});

t.test(
  'packed variable-length batch: loss and LoRA gradients vs the float64 JS model (finite differences)',
  async (t) => {
    const { config, dir, program, spec, flat } = await setup(2);
    const W = (n: string) => Float64Array.from(dir.readF32(n));
    // three sequences of different lengths in one packed micro-batch
    const seqs: Array<{ ids: number[]; labels: number[] }> = [];
    let s = 11;
    for (const L of [9, 5, 14]) {
      const q = { ids: [] as number[], labels: [] as number[] };
      for (let i = 0; i < L; i++) {
        s = (s * 1103515245 + 12345) % 2147483648;
        q.ids.push(s % config.vocabSize);
        q.labels.push(i < 2 ? -100 : s % config.vocabSize);
      }
      seqs.push(q);
    }
    const b = packedBatch(program.device, 3, seqs);
    const losses = await program.trainLast(b.mb, b.tokens);
    const loss = losses.reduce((a, b) => a + b, 0) / b.count;
    const base = Float64Array.from(flat);
    const f = (vals: Float64Array) =>
      f64Forward(config, W, f64Lora(config, spec, vals), spec.alpha / spec.r, b.ids, b.seqs, b.targets);
    const refLoss = f(base);
    assertClose(t, [loss], [refLoss], { atol: 1e-6, rtol: 5e-6 }, 'packed batch loss vs the float64 JS model');
    const grads = program.adapter(1).grads.read() as Float32Array;
    // central differences on a spread of parameters (A and B of several modules and layers)
    const picks = [0, 17, 301, 1200, 2500, 4000, 6100, base.length - 1].filter((i) => i < base.length);
    const h = 1e-4;
    const fd: number[] = [];
    for (const i of picks) {
      const p = base.slice();
      p[i]! += h;
      const m = base.slice();
      m[i]! -= h;
      fd.push((f(p) - f(m)) / (2 * h));
    }
    assertClose(
      t,
      picks.map((i) => grads[i]!),
      fd,
      { atol: 2e-5, rtol: 2e-3 },
      'LoRA gradients vs central differences of the float64 model',
    );
    program.free();
  },
);
