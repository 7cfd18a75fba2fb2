// Pipelined training over 1, 2 and 3 stage actors (worker threads, shared-memory slots) ends
// with the same adapter state as the in-thread single-device trainer, for the same data and
// seeds: LoRA weights and both AdamW moments.
//
// Tolerance: bitwise for an adapter without gradient clipping ('caps'). It holds because every kernel computes each row of a micro-batch
// independently of the other rows (the base GEMM, LoRA segments, attention per sequence,
// the loss), each stage runs exactly the same StageProgram code on the same layers, gradient
// accumulation happens in the same micro-batch order (several micro-batches of an adapter's
// step may be in flight, but every stage adds their gradients first in, first out), dropout masks are a function of (seed, micro-batch serial, layer, row), and the
// gradient norm for clipping is a sum over stages in stage order — so neither the stage
// split nor which adapters share a BatchLoRA message changes a single bit. (The grouping does
// differ: one stage packs both adapters in each message, two and three stages one each.)
// Two stages cut layer 1 after its attention (lib/schedule/split.ts): each half runs the whole
// layer's ops in their order, and the adapter's slices split at the same place of its flat layout.
// Three stages give stage 1 a share of the LM head (lib/schedule/split.ts): the head has no
// trainable weights and its rows are independent, so which stage computes a row changes no bit.
//
// With clipping ('arith', max_grad_norm 1 and gradient norms around 1-1.3, so it clips):
// each stage reduces Σg² over its own slice in float32, and the supervisor adds the stages'
// partial sums, so the norm depends on where the cuts are at the float32 rounding level
// (~3e-8 relative, seen: 0.95727330 vs 0.95727334). The clip factor, then every update,
// inherits that: after 4 AdamW steps the weights differ by ~5e-8. Tolerance: |diff| ≤ 1e-8 +
// 1e-5·|ref| per element of params, m and v, and 1e-5 relative on the step losses. The same
// split in-thread and in workers (3 in-thread stages vs 3 stage actors) stays bitwise.
import t from 'tap';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { PRESETS } from '../../lib/model/config.js';
import { writeRandomLlama } from '../../lib/io/random-model.js';
import { writeTokenizerFiles } from '../../lib/data/bpe.js';
import { assertClose } from '../support/helpers.js';
import { adapter, runJobs } from './util.js';
import { stateBitwiseEqual, stateMaxDiff } from '../support/compare.js';
import { tinyModelWithLayers } from '../support/models.js';

const model = await tinyModelWithLayers(3);
t.teardown(() => fs.rmSync(model, { recursive: true, force: true }));

const jobs = () => [
  adapter('arith', 'arithmetic'),
  adapter('caps', 'capitals', {
    seed: 5,
    max_grad_norm: undefined,
    lora: { r: 8, alpha: 8, dropout: 0.05, targets: ['k_proj', 'up_proj'] },
  }),
];

const ref = await runJobs({ model, devices: ['cpu:0'], threads: 1, inProcess: true }, jobs());
t.equal(ref.states.size, 2, 'the single-device trainer finished both adapters');
for (const [name, st] of ref.states) t.equal(st.version, 4, `${name}: 4 optimizer steps`);

for (const S of [1, 2, 3]) {
  await t.test(`${S} stage actor(s) vs the single-device trainer`, async (t) => {
    const devices = Array.from({ length: S }, (_, i) => `cpu:${i}`);
    const run = await runJobs({ model, devices, threads: 1 }, jobs());
    // layers per stage; 2 stages cut layer 1 after its attention (StagePlan.lastAttnOnly / firstMlpOnly)
    t.same(
      run.sup.pipeline.plans.map((p) => p.hi - p.lo - (p.firstMlpOnly ? 0.5 : 0) - (p.lastAttnOnly ? 0.5 : 0)),
      S === 1 ? [3] : S === 2 ? [1.5, 1.5] : [1, 1, 1],
      'layer split',
    );
    for (const [name, want] of ref.states) {
      const got = run.states.get(name);
      if (!got) {
        t.fail(`${name}: did not finish`);
        continue;
      }
      if (name === 'caps' || S === 1) {
        t.ok(
          stateBitwiseEqual(got, want),
          `${name}: params, m, v bitwise equal (max |diff| ${stateMaxDiff(got, want)})`,
        );
      } else {
        for (const k of ['params', 'm', 'v'] as const)
          assertClose(t, got[k], want[k], { atol: 1e-8, rtol: 1e-5 }, `${name} (clipped): ${k}`);
        t.equal(got.version, want.version, `${name}: same optimizer version`);
      }
    }
    // the losses reported along the way match too
    const losses = (evs: typeof ref.events, name: string) =>
      evs.flatMap((e) => (e.type === 'step' && e.adapter === name ? [e.loss] : []));
    t.same(losses(run.events, 'caps'), losses(ref.events, 'caps'), 'caps: per-step losses identical');
    const [a, b] = [losses(run.events, 'arith'), losses(ref.events, 'arith')];
    t.equal(a.length, 4, 'arith: 4 step events');
    assertClose(t, a, b, { atol: 0, rtol: 1e-5 }, 'arith: per-step losses');
  });
}

// One adapter on two stages: alone it cannot keep both busy, so the scheduler sends the 4
// micro-batches of each step at once (GPipe/1F1B within the step). They read the same weights
// and every stage adds their gradients in issue order, so the result stays bitwise.
await t.test('one adapter, 4 micro-batches per step, over 2 stage actors vs the single-device trainer', async (t) => {
  const job = () => [
    adapter('solo', 'capitals', { seed: 9, batch_size: 8, micro_batch_size: 2, max_grad_norm: undefined }),
  ];
  const one = await runJobs({ model, devices: ['cpu:0'], threads: 1, inProcess: true }, job());
  const two = await runJobs({ model, devices: ['cpu:0', 'cpu:1'], threads: 1 }, job());
  const [want, got] = [one.states.get('solo'), two.states.get('solo')];
  t.ok(want && got, 'both runs finished the adapter');
  if (!want || !got) return;
  t.equal(got.version, 4, '4 optimizer steps');
  t.ok(stateBitwiseEqual(got, want), `params, m, v bitwise equal (max |diff| ${stateMaxDiff(got, want)})`);
  t.equal(two.sup.peakInflight, 4, 'all 4 micro-batches of a step were in flight at once');
  t.equal(one.sup.peakInflight, 1, 'the single-device trainer runs them one at a time');
  const losses = (evs: typeof one.events) => evs.flatMap((e) => (e.type === 'step' ? [e.loss] : []));
  t.same(losses(two.events), losses(one.events), 'per-step losses identical');
});

// A head larger than the layers (vocab 2048 on the tiny shape): whole layers cannot balance 2
// stages, stage 0 takes a share of the head, whose scratch is then larger than its layers'.
await t.test('a head share on the first stage vs the single-device trainer', async (t) => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'mlora-share-'));
  t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }));
  const config = { ...PRESETS.tiny, vocabSize: 2048 };
  await writeTokenizerFiles(dir, { vocabSize: config.vocabSize, modelMaxLength: config.maxPositionEmbeddings });
  writeRandomLlama(dir, config, { seed: 3 });
  const job = () => [adapter('wide', 'capitals', { seed: 4, max_steps: 2, max_grad_norm: undefined })];
  const one = await runJobs({ model: dir, devices: ['cpu:0'], threads: 1, inProcess: true }, job());
  const two = await runJobs({ model: dir, devices: ['cpu:0', 'cpu:1'], threads: 1 }, job());
  t.ok(
    two.sup.pipeline.plans[0]!.headShare,
    `stage 0 runs a share of the head (${two.sup.pipeline.plans[0]!.headShare})`,
  );
  const [want, got] = [one.states.get('wide'), two.states.get('wide')];
  t.ok(want && got, 'both runs finished the adapter');
  if (!want || !got) return;
  t.ok(stateBitwiseEqual(got, want), `params, m, v bitwise equal (max |diff| ${stateMaxDiff(got, want)})`);
  const losses = (evs: typeof one.events) => evs.flatMap((e) => (e.type === 'step' ? [e.loss] : []));
  t.same(losses(two.events), losses(one.events), 'per-step losses identical');
});
