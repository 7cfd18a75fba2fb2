// Resume equivalence: a run that stopped after a checkpoint (its later files gone, as after
// a crash) and is continued with `--resume` ends with bitwise the same adapter weights as the
// uninterrupted run. The schedule is deterministic: micro-batches of one adapter run one at a
// time in data order (inflight_per_adapter 1), dropout masks are a function of (seed, adapter,
// step, position), and every row's result is independent of which adapters share its batch.
// A partial checkpoint (no manifest) is ignored and the previous complete one is used.
import t from 'tap';
import fs from 'node:fs';
import path from 'node:path';
import { latestCheckpoint, listCheckpoints } from '../../lib/io/checkpoint.js';
import { mlora, readMetrics, sameWeights, smallConfig, writeJson } from './util.js';
import { tinyModelIn } from '../support/models.js';

t.test('an interrupted run resumed from its checkpoints ends where the uninterrupted one does', async (t) => {
  const dir = t.testdir();
  const model = await tinyModelIn(path.join(dir, 'model'));
  const full = path.join(dir, 'full');
  const cfgFull = writeJson(path.join(dir, 'full.json'), smallConfig(model, full, { steps: 6, saveEvery: 2 }));
  const a = mlora(['train', cfgFull]);
  t.equal(a.code, 0, `uninterrupted run: ${a.err}`);
  const names = ['capitals', 'arithmetic'];
  for (const n of names)
    t.same(
      listCheckpoints(path.join(full, n)).map((c) => [c.step, c.complete]),
      [
        [2, true],
        [4, true],
      ],
      `${n}: checkpoints at steps 2 and 4`,
    );

  // The "interrupted" run: the same output as it stood just after step 4's checkpoint of
  // capitals and step 2's of arithmetic, with a partial checkpoint-4 (no manifest) for
  // arithmetic, as a crash mid-write leaves it.
  const part = path.join(dir, 'part');
  fs.cpSync(full, part, { recursive: true });
  fs.rmSync(path.join(part, 'metrics.jsonl'));
  fs.rmSync(path.join(part, 'report.html'));
  for (const n of names) {
    fs.rmSync(path.join(part, n, 'adapter_model.safetensors'));
    fs.rmSync(path.join(part, n, 'adapter_config.json'));
  }
  fs.rmSync(path.join(part, 'arithmetic/checkpoint-4/manifest.json'));
  fs.truncateSync(path.join(part, 'arithmetic/checkpoint-4/optimizer.safetensors'), 100);
  t.equal(latestCheckpoint(path.join(part, 'arithmetic'))?.step, 2, 'the partial checkpoint is not taken as complete');
  t.equal(latestCheckpoint(path.join(part, 'capitals'))?.step, 4);

  const cfgPart = writeJson(path.join(dir, 'part.json'), smallConfig(model, part, { steps: 6, saveEvery: 2 }));
  const b = mlora(['train', cfgPart, '--resume']);
  t.equal(b.code, 0, `resumed run: ${b.err}`);
  const steps = readMetrics(part).filter((r) => r.type === 'step');
  t.same(
    steps.filter((r) => r.adapter === 'capitals').map((r) => r.step),
    [5, 6],
    'capitals continued from step 4',
  );
  t.same(
    steps.filter((r) => r.adapter === 'arithmetic').map((r) => r.step),
    [3, 4, 5, 6],
    'arithmetic continued from step 2, past its partial checkpoint',
  );
  // The losses of the redone steps equal the uninterrupted run's (same data, same weights).
  const fullSteps = readMetrics(full).filter((r) => r.type === 'step');
  for (const r of steps) {
    const ref = fullSteps.find((x) => x.adapter === r.adapter && x.step === r.step);
    t.equal(r.loss, ref?.loss, `${String(r.adapter)} step ${String(r.step)}: same loss as the uninterrupted run`);
    t.equal(
      r.tokens,
      ref?.tokens,
      `${String(r.adapter)} step ${String(r.step)}: same token count as the uninterrupted run (counted on from the checkpoint)`,
    );
  }
  for (const n of names)
    sameWeights(t, path.join(full, n, 'adapter_model.safetensors'), path.join(part, n, 'adapter_model.safetensors'), n);
  t.ok(
    listCheckpoints(path.join(part, 'arithmetic')).find((c) => c.step === 4)?.complete,
    'the partial checkpoint was rewritten complete',
  );
});

t.test('a resume with a changed data/LoRA config is refused, naming the checkpoint', async (t) => {
  const dir = t.testdir();
  const model = await tinyModelIn(path.join(dir, 'model'));
  const out = path.join(dir, 'out');
  const cfg = smallConfig(model, out, { steps: 2, saveEvery: 1 });
  cfg.adapters = cfg.adapters.slice(0, 1);
  cfg.devices = ['cpu:0'];
  t.equal(mlora(['train', writeJson(path.join(dir, 'a.json'), cfg)]).code, 0);
  (cfg.adapters[0]!.lora as { r: number }).r = 8;
  const r = mlora(['train', writeJson(path.join(dir, 'b.json'), cfg), '--resume']);
  t.equal(r.code, 1);
  t.match(
    r.out + r.err,
    /checkpoint-1: was written with a different data\/LoRA\/batch config for 'capitals'; cannot resume/,
  );
});

t.test(
  'on an NF4 base (--quantize nf4, 2 stages): a resumed run ends bitwise where the uninterrupted one does; the adapters are plain PEFT',
  async (t) => {
    const dir = t.testdir();
    const model = await tinyModelIn(path.join(dir, 'model'));
    const full = path.join(dir, 'full');
    const cfg = smallConfig(model, full, { steps: 4, saveEvery: 2 });
    cfg.adapters = cfg.adapters.slice(0, 1);
    const a = mlora(['train', writeJson(path.join(dir, 'full.json'), cfg), '--quantize', 'nf4']);
    t.equal(a.code, 0, `uninterrupted NF4 run: ${a.err}`);
    const part = path.join(dir, 'part');
    fs.cpSync(full, part, { recursive: true });
    fs.rmSync(path.join(part, 'metrics.jsonl'));
    fs.rmSync(path.join(part, 'capitals', 'adapter_model.safetensors'));
    t.same(
      listCheckpoints(path.join(part, 'capitals')).map((c) => c.step),
      [2],
      "the copy stands after step 2's checkpoint",
    );
    const b = mlora([
      'train',
      writeJson(path.join(dir, 'part.json'), { ...cfg, output: part }),
      '--quantize',
      'nf4',
      '--resume',
    ]);
    t.equal(b.code, 0, `resumed NF4 run: ${b.err}`);
    t.same(
      readMetrics(part)
        .filter((r) => r.type === 'step')
        .map((r) => r.step),
      [3, 4],
      'continued from step 2',
    );
    sameWeights(
      t,
      path.join(full, 'capitals', 'adapter_model.safetensors'),
      path.join(part, 'capitals', 'adapter_model.safetensors'),
      'capitals',
    );
    const ac = JSON.parse(fs.readFileSync(path.join(full, 'capitals', 'adapter_config.json'), 'utf8')) as Record<
      string,
      unknown
    >;
    t.equal(ac.peft_type, 'LORA', 'adapter_config.json is an ordinary PEFT LoRA config');
    t.equal(ac.base_model_name_or_path !== undefined, true, 'it names its base model');
  },
);
