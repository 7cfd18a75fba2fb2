// `mlora train` on each model family (Llama 3 RoPE scaling, Qwen2, Qwen3, windowed Mistral):
// the real CLI, a config file, pre-tokenized data ({input_ids, labels}) in a model directory
// that has no tokenizer.json, pipelined over two stages (cpu:0, cpu:1) with two micro-batches
// per step. Starting from the fixture's adapter, step 1's loss and gradient norm must be the
// fixture's float64 numbers (test/fixtures/families), and the trained adapter a real PEFT one.
import t from 'tap';
import fs from 'node:fs';
import path from 'node:path';
import { openSafetensors } from '../../lib/io/safetensors.js';
import { assertClose } from '../support/helpers.js';
import { mlora, readMetrics, ROOT, writeJson } from './util.js';
import { tmpDir } from '../support/files.js';

const root = path.join(ROOT, 'test/fixtures/families');

for (const fam of ['llama3-scaled', 'qwen2', 'qwen3', 'mistral-window']) {
  t.test(`${fam}: mlora train, 2 pipeline stages, pre-tokenized data, no tokenizer.json`, async (t) => {
    const model = path.join(root, fam, 'model');
    t.notOk(fs.existsSync(path.join(model, 'tokenizer.json')), 'the model directory has no tokenizer.json');
    const ref = JSON.parse(fs.readFileSync(path.join(root, fam, 'ref.json'), 'utf8')) as { loss: number };
    const grads = openSafetensors(path.join(root, fam, 'grads.safetensors'));
    let sumsq = 0;
    for (const name of grads.tensors.keys()) for (const g of grads.read(name) as Float64Array) sumsq += g * g;
    const out = tmpDir(t, `fam-${fam}`);
    const config = writeJson(path.join(out, 'train.json'), {
      model,
      output: path.join(out, 'run'),
      devices: ['cpu:0', 'cpu:1'],
      adapters: [
        {
          name: fam,
          data: path.join(root, fam, 'data.jsonl'),
          lora: {
            r: 4,
            alpha: 8,
            dropout: 0,
            targets: ['q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj'],
            init: path.join(root, fam, 'adapter'),
          },
          optimizer: { lr: 1e-2 },
          batch_size: 2,
          micro_batch_size: 1,
          seq_len: 48,
          shuffle: false,
          max_steps: 1,
        },
      ],
      pipeline: { threads: 1 },
      log: { every: 1, progress: 'plain' },
    });
    const r = mlora(['train', config]);
    t.equal(r.code, 0, `exit 0\n${r.out}\n${r.err}`);
    t.match(
      r.out,
      /stage 0 on cpu:0: layer 0 \+ embedding(?: \+ norm\/head\/loss of \d+% of the targeted rows \(training\))?\nstage 1 on cpu:1: layer 1 \+ norm\/head\/loss/,
      'two pipeline stages, one layer each',
    );
    const steps = readMetrics(path.join(out, 'run')).filter((m) => m.step === 1 && typeof m.loss === 'number');
    t.equal(steps.length, 1, 'one step record');
    const m = steps[0]!;
    // float32 vs float64, the bounds of test/model/families.test.ts
    assertClose(
      t,
      [m.loss as number],
      [ref.loss],
      { atol: 1e-6, rtol: 2e-6 },
      `step 1 loss ${String(m.loss)} vs the fixture's ${ref.loss}`,
    );
    const gn = m.gradNorm as number;
    assertClose(
      t,
      [gn],
      [Math.sqrt(sumsq)],
      { atol: 0, rtol: 2e-5 },
      `step 1 gradient norm vs the fixture's ${Math.sqrt(sumsq)}`,
    );
    const saved = path.join(out, 'run', fam, 'adapter_model.safetensors');
    t.ok(
      fs.existsSync(saved) && fs.existsSync(path.join(out, 'run', fam, 'adapter_config.json')),
      'the trained adapter is written in PEFT layout',
    );
    const before = openSafetensors(path.join(root, fam, 'adapter', 'adapter_model.safetensors'));
    const after = openSafetensors(saved);
    const name = 'base_model.model.model.layers.1.self_attn.k_proj.lora_A.weight';
    t.notSame(Array.from(after.readF32(name)), Array.from(before.readF32(name)), 'one AdamW step moved the weights');
  });
}
