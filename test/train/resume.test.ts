// Continuing from a checkpoint (save_every + resume) and from an
// `init` adapter (a PEFT dir saved by an earlier run) give the same result as not stopping.
// Bitwise, on cpu:0 (same kernels on the same rows in the same order; see batchlora.test.ts).
import t from 'tap';
import fs from 'node:fs';
import path from 'node:path';
import { Supervisor } from '../../actors/index.js';
import { parseAdapterConfig, type AdapterConfigInput } from '../../lib/config.js';
import type { JobEvent } from '../../actors/protocol.js';
import { run, readPeft, RUN_DEFAULTS } from './util.js';
import { bitwiseEqual, maxDiff } from '../support/compare.js';
import { tinyModel } from '../support/models.js';
import { REPO, demoData, tmpDir } from '../support/files.js';

t.test(
  'resume from a checkpoint == not stopping (dropout, accumulation, shuffle, 2 epochs, mid-step stop)',
  async (t) => {
    const model = await tinyModel();
    const dir = tmpDir(t);
    const a: AdapterConfigInput = {
      name: 'ck',
      data: demoData(dir, 'capitals', 6),
      seq_len: 256,
      seed: 5,
      shuffle: true,
      epochs: 2,
      lora: { r: 4, alpha: 8, dropout: 0.25, targets: ['q_proj', 'v_proj', 'down_proj'] },
      optimizer: { lr: 2e-3, weight_decay: 0.01 },
      schedule: { type: 'cosine', warmup_steps: 2 },
      batch_size: 4,
      micro_batch_size: 2,
      max_grad_norm: 1,
      save_every: 2,
    };
    // 6 examples, batch 4: steps of 4 and 2 examples per epoch, 4 steps in all
    const full = await run(model, [a], { output: `${dir}/full` });
    t.same(full.errors, []);
    const fullSteps = full.steps.get('ck')!;
    t.equal(fullSteps.length, 4);

    // stop the run as soon as checkpoint-2 is written; the micro-batch of step 3 already in
    // flight finishes, but step 3 is not complete: the resume must redo it from its start
    const out = `${dir}/stopped`;
    let armed = false;
    let afterCheckpoint = 0;
    const sup = await Supervisor.start({
      ...RUN_DEFAULTS,
      model,
      output: out,
      onEvent: (e: JobEvent) => {
        if (e.type === 'checkpoint' && e.step === 2) armed = true;
      },
    });
    // stop once the first micro-batch after checkpoint-2 has run (half of step 3)
    const p = sup.pipeline as { train: (typeof sup.pipeline)['train'] };
    const train = p.train.bind(sup.pipeline);
    p.train = async (mb) => {
      const losses = await train(mb);
      if (armed) {
        afterCheckpoint++;
        void sup.stop();
      }
      return losses;
    };
    const job = sup.submit(parseAdapterConfig(a));
    await sup.stopped();
    await sup.close();
    t.equal(job.step, 2, 'stopped after step 2');
    t.equal(afterCheckpoint, 1, 'one micro-batch of step 3 (of 2) had run: the stop is mid-step');
    t.equal(job.state, 'running', 'the job was left unfinished');
    t.ok(fs.existsSync(path.join(out, 'ck/checkpoint-2/manifest.json')), 'checkpoint-2 is complete');
    t.notOk(fs.existsSync(path.join(out, 'ck/adapter_model.safetensors')), 'no final adapter yet');

    const resumed = await run(model, [a], { output: out, resume: true });
    t.same(resumed.errors, []);
    const rs = resumed.steps.get('ck')!;
    t.same(
      rs.map((s) => s.step),
      [3, 4],
      'the resumed run does steps 3 and 4',
    );
    for (const s of rs) {
      const f = fullSteps[s.step - 1]!;
      t.ok(
        s.loss === f.loss && s.lr === f.lr && s.gradNorm === f.gradNorm,
        `step ${s.step}: loss ${s.loss} lr ${s.lr} |g| ${s.gradNorm} (uninterrupted: ${f.loss} ${f.lr} ${f.gradNorm})`,
      );
    }
    const wFull = readPeft(model, a, `${dir}/full/ck`);
    const wRes = readPeft(model, a, `${out}/ck`);
    t.ok(
      bitwiseEqual(wFull, wRes),
      `final adapter bitwise equal to the uninterrupted run (max |diff| ${maxDiff(wFull, wRes)})`,
    );
  },
);

t.test('continuing from an init adapter == not stopping (stateless AdamW: betas [0, 0])', async (t) => {
  // A PEFT dir holds weights but no optimizer moments and no data position. With betas [0, 0]
  // AdamW keeps no state across steps (m = g, v = g², bias corrections 1), so training on the
  // first half of the data, saving, and training from that adapter on the second half must give
  // exactly what one run over all the data gives. Dropout is off: a new job starts its own
  // micro-batch serials (and so its own masks) from 0.
  const model = await tinyModel();
  const dir = tmpDir(t);
  const lines = fs
    .readFileSync(path.join(REPO, 'data/demo/arithmetic.jsonl'), 'utf8')
    .split('\n')
    .filter(Boolean)
    .slice(0, 12);
  const write = (name: string, ls: string[]) => {
    const f = path.join(dir, name);
    fs.writeFileSync(f, ls.join('\n') + '\n');
    return f;
  };
  const base = {
    seq_len: 256,
    seed: 9,
    shuffle: false,
    batch_size: 3,
    micro_batch_size: 2,
    max_grad_norm: 0.3,
    lora: { r: 4, alpha: 4, dropout: 0, targets: ['q_proj', 'o_proj', 'up_proj'] as const },
    optimizer: { lr: 5e-3, betas: [0, 0] as [number, number], weight_decay: 0.02 },
  };
  const all: AdapterConfigInput = {
    ...base,
    name: 'all',
    data: write('all.jsonl', lines),
    lora: { ...base.lora, targets: [...base.lora.targets] },
  };
  const first: AdapterConfigInput = { ...all, name: 'first', data: write('first.jsonl', lines.slice(0, 6)) };
  const full = await run(model, [all], { output: `${dir}/out` });
  const p1 = await run(model, [first], { output: `${dir}/out` });
  const second: AdapterConfigInput = {
    ...all,
    name: 'second',
    data: write('second.jsonl', lines.slice(6)),
    lora: { ...all.lora!, init: `${dir}/out/first` },
  };
  const p2 = await run(model, [second], { output: `${dir}/out` });
  t.same([...full.errors, ...p1.errors, ...p2.errors], []);
  const lossesFull = full.steps.get('all')!.map((s) => s.loss);
  const lossesSplit = [...p1.steps.get('first')!, ...p2.steps.get('second')!].map((s) => s.loss);
  t.same(lossesSplit, lossesFull, `the 4 step losses match: ${lossesFull.map((l) => l.toFixed(5)).join(' ')}`);
  const wFull = readPeft(model, all, `${dir}/out/all`);
  const wSplit = readPeft(model, second, `${dir}/out/second`);
  t.ok(bitwiseEqual(wFull, wSplit), `final adapter bitwise equal (max |diff| ${maxDiff(wFull, wSplit)})`);
});
