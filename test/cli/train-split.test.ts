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
import { PROFILE_BYTES, sampleDataShape, splitProfile, type DataShape } from '../../scripts/cli/train-split.js';
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

t.test(
  'the data shape: lengths and targets of the first records; the profile weighs adapters by their tokens per step',
  async (t) => {
    const cfg = config(t);
    const [a, b] = cfg.adapters.map((x) => sampleDataShape(cfg.model, x)!) as [DataShape, DataShape];
    // a: lengths 4 and 8, every position after the first a target; b: three of 6, 2 labels masked
    t.same(a, { seqLen: (16 + 64) / 12, meanLen: 6, targetFraction: 10 / 12 });
    t.same(b, { seqLen: 6, meanLen: 6, targetFraction: 12 / 18 });
    const { profile, shapes } = await splitProfile(config(t, { split_costs: 'flops' }));
    t.same(shapes, [a, b]);
    // tokens per step: a 2 × 6, b 4 × 6
    t.ok(Math.abs(profile.seqLen! - (12 * a.seqLen + 24 * b.seqLen) / 36) < 1e-9, `effective length ${profile.seqLen}`);
    t.ok(Math.abs(profile.targetFraction! - (12 * a.targetFraction + 24 * b.targetFraction) / 36) < 1e-9);
    t.equal(profile.costs, undefined);
  },
);

t.test('measured costs only for an auto split over local CPU stages', async (t) => {
  const measured = await splitProfile(config(t));
  const k = measured.profile.costs!;
  t.ok(k && k.attention > 0 && k.mlp > 0 && k.head > 0, `measured: ${JSON.stringify(k)}`);
  t.same(measured.measured, { adapters: 2, microBatches: 2, tokens: 36 }, 'one step of each adapter');
  for (const [why, cfg] of [
    ['split_costs: flops', config(t, { split_costs: 'flops' })],
    ['an explicit split', config(t, { split: [2.5, 2.5] })],
    ['one stage', config(t, {}, ['cpu:0'])],
  ] as const) {
    const p = await splitProfile(cfg);
    t.equal(p.profile.costs, undefined, `${why}: FLOP counts`);
    t.ok(
      p.shapes.every((s) => s),
      `${why}: still the data's shape`,
    );
  }
  t.equal((await splitProfile(config(t), true)).profile.costs, undefined, 'cluster stages: FLOP counts');
});

t.test('a model too large to time on one sequence is left to the FLOP counts', async (t) => {
  const huge = { config: { ...PRESETS.bench, hiddenSize: 8192, intermediateSize: 28672 } } as ModelDir;
  const spec = { r: 8, alpha: 16, dropout: 0, targets: [], useRslora: false, seed: 1 };
  t.equal(await measureUnitCosts(huge, [{ sequences: 4, seqLen: 4096, adapter: spec }]), undefined);
  t.equal(await measureUnitCosts(huge, []), undefined, 'nothing to time');
});

t.test('a large JSONL dataset: only the records in its first PROFILE_BYTES are read', async (t) => {
  const cfg = config(t);
  const a = cfg.adapters[0]!;
  const line = JSON.stringify({ input_ids: Array.from({ length: 12 }, (_, i) => 1 + i) });
  const lines = Array.from({ length: Math.ceil((2 * PROFILE_BYTES) / line.length) }, () => line);
  // past the first MiB: a line that is no JSON (the run itself reports it; the profile never reads it)
  fs.writeFileSync(a.data, lines.join('\n') + '\n{"input_ids": [1, 2,\n');
  t.same(sampleDataShape(cfg.model, a), { seqLen: 12, meanLen: 12, targetFraction: 11 / 12 });
  fs.writeFileSync(a.data, '{"input_ids": [1, 2,\n' + lines.join('\n') + '\n');
  t.equal(sampleDataShape(cfg.model, a), undefined, 'a bad record among the first: no shape');
});
