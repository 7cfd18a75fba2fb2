// stories260K (data/models/stories260K), a real pretrained LLaMA (tied embeddings, GQA 8/4,
// SentencePiece tokenizer): greedy decoding from <s> reproduces the text llama2.c publishes for
// it, through the library and the CLI; and on real held-out stories, the loss of a batch, the
// LoRA gradients of a training step and the AdamW step itself agree with the float64 JS model
// (./f64-llama.ts) and with AdamW written out in float64 here.
import t from 'tap';
import fs from 'node:fs';
import path from 'node:path';
import { spawnSync } from 'node:child_process';
import { openModelDir } from '../../lib/io/hf-model.js';
import { loadTokenizer } from '../../lib/data/tokenizer.js';
import { openSingleModel } from '../../lib/model/single.js';
import { generate } from '../../lib/model/generate.js';
import { loadStageWeights } from '../../lib/model/weights.js';
import { StageProgram } from '../../lib/model/stage.js';
import { loraScale, type LoraSpec } from '../../lib/lora/adapter.js';
import { LORA_TARGETS } from '../../lib/model/config.js';
import { Rng } from '../../lib/rng.js';
import { assertClose, cpuDevice } from '../support/helpers.js';
import { f64Forward, f64Lora, packedBatch } from './f64-llama.js';
import { REPO, STORIES260K as MODEL, STORY_DATA } from '../support/files.js';

const CLI = path.join(REPO, 'dist/scripts/mlora.js');
/** llama2.c's published greedy output of stories260K from <s> (its README; also an independent numpy forward). */
const PUBLISHED =
  'Once upon a time, there was a little girl named Lily. She loved to play outside in the park. One day, she saw a big, red ball.';

t.test(
  'the shipped copy is the real model: config, tied embeddings, 260,032 parameters, MIT license beside it',
  async (t) => {
    const dir = openModelDir(MODEL);
    const c = dir.config;
    t.same(
      [c.hiddenSize, c.numLayers, c.numHeads, c.numKvHeads, c.headDim, c.intermediateSize, c.vocabSize],
      [64, 5, 8, 4, 8, 172, 512],
    );
    t.equal(c.tieWordEmbeddings, true);
    t.equal(dir.stats().parameters, 260_032);
    t.match(fs.readFileSync(path.join(MODEL, 'LICENSE'), 'utf8'), /^MIT License/);
  },
);

t.test(
  'greedy generation from <s> gives the published text (library: tokenizer, openSingleModel, generate)',
  async (t) => {
    const tok = loadTokenizer(MODEL);
    const prompt = tok.encode('', { addSpecialTokens: true });
    t.same(prompt, [tok.bosId], 'the empty prompt is <s> alone');
    const n = tok.encode(PUBLISHED).length;
    const m = await openSingleModel(MODEL);
    try {
      const out = await generate(m, prompt, { maxNewTokens: n, eosId: tok.eosId! });
      t.equal(out.length, n, `${n} tokens, no early EOS`);
      t.equal(tok.decodeAfter(prompt, out, { skipSpecialTokens: true }), PUBLISHED);
      t.same(out, tok.encode(PUBLISHED), 'token for token');
      // a continuation keeps the space a SentencePiece piece starts with
      const p2 = tok.encode('Once upon a time,', { addSpecialTokens: true });
      const o2 = await generate(m, p2, { maxNewTokens: 10 });
      t.equal(
        'Once upon a time,' + tok.decodeAfter(p2, o2, { skipSpecialTokens: true }),
        'Once upon a time, there was a little girl named Lily.',
      );
    } finally {
      m.free();
    }
  },
);

t.test('mlora generate --prompt "" prints the published text', async (t) => {
  const r = spawnSync(
    process.execPath,
    [CLI, 'generate', '--model', MODEL, '--prompt', '', '--max-new-tokens', '44', '--json'],
    { encoding: 'utf8' },
  );
  t.equal(r.status, 0, r.stderr);
  const j = JSON.parse(r.stdout) as { completion: string; tokens: number[] };
  t.equal(j.completion.slice(0, PUBLISHED.length), PUBLISHED);
  const plain = spawnSync(
    process.execPath,
    [CLI, 'generate', '--model', MODEL, '--prompt', 'Once upon a time,', '--max-new-tokens', '10'],
    { encoding: 'utf8' },
  );
  t.equal(plain.status, 0, plain.stderr);
  t.equal(plain.stdout, 'Once upon a time, there was a little girl named Lily.\n');
});

/** Three held-out demo stories, cut to `len` tokens each: <s> + text, every position a target. */
function realStories(len: number): Array<{ ids: number[]; labels: number[] }> {
  const tok = loadTokenizer(MODEL);
  const lines = fs.readFileSync(path.join(STORY_DATA, 'robot.eval.jsonl'), 'utf8').split('\n').filter(Boolean);
  return [0, 1, 2].map((i) => {
    const ids = tok
      .encode((JSON.parse(lines[i]!) as { text: string }).text, { addSpecialTokens: true })
      .slice(0, len - 5 * i);
    return { ids, labels: ids.slice() };
  });
}

t.test('eval, one training step and its AdamW update on real weights vs the float64 reference', async (t) => {
  const dir = openModelDir(MODEL);
  const config = dir.config;
  const device = cpuDevice(2);
  const plan = { lo: 0, hi: config.numLayers, first: true, last: true };
  const program = new StageProgram(device, config, plan, await loadStageWeights(device, dir, plan));
  const W = (n: string) => Float64Array.from(dir.readF32(n));
  const spec: LoraSpec = { r: 4, alpha: 8, dropout: 0, targets: [...LORA_TARGETS], useRslora: false, seed: 0 };
  const scale = loraScale(spec);
  // the PEFT init (B = 0: exactly the base model), then a random adapter large enough to move the loss
  const peft = program.addAdapter(1, spec);
  const size = peft.size;
  const b = packedBatch(device, 5, realStories(40));
  const ref = (vals: Float64Array) =>
    f64Forward(config, W, f64Lora(config, spec, vals), scale, b.ids, b.seqs, b.targets);
  const meanLoss = (l: Float32Array) => l.reduce((a, x) => a + x, 0) / b.count;
  // f32 kernels against float64 over 5 layers of real weights: the loss agrees to ~1e-6 relative
  const base = meanLoss((await program.evaluate(b.mb, b.tokens))!);
  assertClose(
    t,
    [base],
    [ref(Float64Array.from(peft.params.read() as Float32Array))],
    { atol: 1e-6, rtol: 5e-6 },
    'base model (PEFT init) eval loss',
  );
  t.ok(base > 0.5 && base < 4, `a trained model's loss on its own kind of text (${base.toFixed(4)})`);
  program.removeAdapter(1);

  const init = new Rng(3, 'stories-adapter').fillNormal(new Float32Array(size), 0.2);
  const ad = program.addAdapter(1, spec, init);
  const p0 = Float64Array.from(init);
  const evalLoss = meanLoss((await program.evaluate(b.mb, b.tokens))!);
  assertClose(t, [evalLoss], [ref(p0)], { atol: 1e-6, rtol: 5e-6 }, 'eval loss with a random adapter');
  t.ok(Math.abs(evalLoss - base) > 1e-3, 'the adapter changes the loss');

  const trainLoss = meanLoss(await program.trainLast(b.mb, b.tokens));
  assertClose(t, [trainLoss], [ref(p0)], { atol: 1e-6, rtol: 5e-6 }, 'training-step loss');
  const g = Float64Array.from(ad.grads.read() as Float32Array);
  // central differences on A and B of several modules and layers, first and last included
  const picks = [0, 37, 500, 1500, 3000, 4500, 6000, size - 1].filter((i) => i < size);
  const h = 1e-4;
  const fd = picks.map((i) => {
    const p = p0.slice();
    p[i]! += h;
    const m = p0.slice();
    m[i]! -= h;
    return (ref(p) - ref(m)) / (2 * h);
  });
  assertClose(
    t,
    picks.map((i) => g[i]!),
    fd,
    { atol: 2e-5, rtol: 2e-3 },
    'LoRA gradients vs central differences of the float64 model',
  );

  const hp = { lr: 1e-2, beta1: 0.9, beta2: 0.999, eps: 1e-8, weightDecay: 0.01, step: 1 };
  await program.step(1, hp);
  const p1 = Float64Array.from(ad.params.read() as Float32Array);
  // AdamW's first step in float64: m̂ = g, v̂ = g², p ← p(1 − lr·wd) − lr·g/(|g| + eps)
  const want = p0.map((p, i) => p * (1 - hp.lr * hp.weightDecay) - (hp.lr * g[i]!) / (Math.abs(g[i]!) + hp.eps));
  assertClose(t, p1, want, { atol: 1e-6, rtol: 1e-5 }, 'parameters after one AdamW step');
  t.ok(
    (ad.grads.read() as Float32Array).every((x) => x === 0),
    'the step zeroes the gradients',
  );
  const after = meanLoss((await program.evaluate(b.mb, b.tokens))!);
  assertClose(t, [after], [ref(p1)], { atol: 1e-6, rtol: 5e-6 }, 'eval loss after the step');
  t.ok(after < trainLoss, `the step lowers the batch's loss (${trainLoss.toFixed(4)} → ${after.toFixed(4)})`);
  program.free();
});
