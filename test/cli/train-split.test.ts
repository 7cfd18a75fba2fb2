// The split profile of `mlora train`: the data's shape sampled from the datasets (effective
// sequence length, targeted rows, sequences per micro-batch), and measured unit costs only where
// the split is 'auto' over local CPU stages with split_costs 'measured'. Only what is measured
// is checked, never how fast.
import fs from 'node:fs';
import path from 'node:path';
import t, { type Test } from 'tap';
import { parseTrainConfig } from '../../lib/config.js';
import { PRESETS } from '../../lib/model/config.js';
import type { ModelDir } from '../../lib/io/hf-model.js';
import { measureUnitCosts } from '../../lib/schedule/calibrate.js';
import { sampleDataShape, splitProfile } from '../../scripts/cli/train-split.js';
import { DEMO_MODEL } from '../../scripts/cli/train-demo.js';

function config(t: Test, pipeline: Record<string, unknown> = {}, devices: unknown = ['cpu:0', 'cpu:1']) {
  const dir = t.testdir();
  const file = (name: string, lengths: number[], masked: number) => {
    const f = path.join(dir, name);
    // pre-tokenized records: the first `masked` labels of each have no target (a prompt)
    const lines = lengths.map((n) =>
      JSON.stringify({
        input_ids: Array.from({ length: n }, (_, i) => 1 + (i % 100)),
        labels: Array.from({ length: n }, (_, i) => (i < masked ? -100 : 1 + (i % 100))),
      }),
    );
    fs.writeFileSync(f, lines.join('\n') + '\n');
    return f;
  };
  return parseTrainConfig(
    {
      model: DEMO_MODEL,
      output: path.join(dir, 'out'),
      devices,
      adapters: [
        { name: 'a', data: file('a.jsonl', [4, 8], 0), batch_size: 2, seq_len: 16 },
        { name: 'b', data: file('b.jsonl', [6, 6, 6], 2), batch_size: 4, seq_len: 16 },
      ],
      pipeline,
    },
    'test config',
  );
}

t.test('the data shape: lengths and targets of the first records, per sequence of each micro-batch', async (t) => {
  const s = sampleDataShape(config(t))!;
  // a: lengths 4, 8, weight 2/2 each; b: 6, 6, 6, weight 4/3 each
  const w = [1, 1, 4 / 3, 4 / 3, 4 / 3],
    len = [4, 8, 6, 6, 6];
  const sum = (f: (i: number) => number) => w.reduce((a, x, i) => a + x * f(i), 0);
  t.ok(Math.abs(s.meanLen - sum((i) => len[i]!) / sum(() => 1)) < 1e-9, `mean length ${s.meanLen}`);
  t.ok(Math.abs(s.seqLen - sum((i) => len[i]! ** 2) / sum((i) => len[i]!)) < 1e-9, `effective length ${s.seqLen}`);
  // targets: every position after the first, less b's 2 masked labels (the first is never one)
  const targets = sum((i) => (i < 2 ? len[i]! - 1 : len[i]! - 2));
  t.ok(Math.abs(s.targetFraction - targets / sum((i) => len[i]!)) < 1e-9, `targeted ${s.targetFraction}`);
  t.equal(s.sequences, 3, 'micro-batches of 2 and 4 sequences');
});

t.test('measured costs only for an auto split over local CPU stages', async (t) => {
  const measured = await splitProfile(config(t));
  const k = measured.profile.costs!;
  t.ok(k && k.attention > 0 && k.mlp > 0 && k.head > 0, `measured: ${JSON.stringify(k)}`);
  t.ok(measured.measuredTokens! > 0);
  t.equal(measured.profile.seqLen, measured.shape!.seqLen, 'the sampled effective length');
  for (const [why, cfg] of [
    ['split_costs: flops', config(t, { split_costs: 'flops' })],
    ['an explicit split', config(t, { split: [2.5, 2.5] })],
    ['one stage', config(t, {}, ['cpu:0'])],
  ] as const) {
    const p = await splitProfile(cfg);
    t.equal(p.profile.costs, undefined, `${why}: FLOP counts`);
    t.ok(p.shape, `${why}: still the data's shape`);
  }
  t.equal((await splitProfile(config(t), true)).profile.costs, undefined, 'cluster stages: FLOP counts');
});

t.test('a model too large to time on one sequence is left to the FLOP counts', async (t) => {
  const huge = { config: { ...PRESETS.bench, hiddenSize: 8192, intermediateSize: 28672 } } as ModelDir;
  t.equal(await measureUnitCosts(huge, { sequences: 4, seqLen: 4096, adapters: [] }), undefined);
});
