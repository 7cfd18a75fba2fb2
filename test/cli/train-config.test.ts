// Bad training configs, each with the exact message `mlora train` must give: the file, the
// field's path, what it must be (the allowed values) and what it got. All are caught before
// anything loads (no model weights read, no worker started).
import t from 'tap';
import fs from 'node:fs';
import path from 'node:path';
import { main } from '../../scripts/cli/train.js';
import { mlora, writeJson } from './util.js';
import { tinyModelIn } from '../support/models.js';
import { DEMO_DATA } from '../support/files.js';

const DIR = t.testdir();
let model = '';
t.before(async () => {
  model = await tinyModelIn(path.join(DIR, 'model'));
  fs.mkdirSync(path.join(DIR, 'not-a-model'));
});

type Cfg = Record<string, any>; // eslint-disable-line @typescript-eslint/no-explicit-any
const good = (): Cfg => ({
  model,
  devices: ['cpu:0'],
  output: path.join(DIR, 'out'),
  adapters: [{ name: 'a', data: path.join(DEMO_DATA, 'capitals.jsonl'), batch_size: 2 }],
});

// [label, change to a good config, the message after "<file>: "]
const cases: Array<[string, (c: Cfg) => void, string | ((file: string) => string)]> = [
  [
    'missing model',
    (c) => delete c.model,
    'model: is required: a Hugging Face model directory (config.json, model.safetensors, tokenizer.json)',
  ],
  [
    'missing adapters',
    (c) => delete c.adapters,
    'adapters: is required: a list of adapters, each with at least name and data',
  ],
  ['no adapters', (c) => (c.adapters = []), 'adapters: must have at least 1 item'],
  ['pack_weights not a choice', (c) => (c.pack_weights = 'yes'), 'pack_weights: must be "auto", true or false'],
  [
    'missing data',
    (c) => delete c.adapters[0].data,
    'adapters[0].data: is required: the path of a JSON/JSONL dataset file',
  ],
  [
    'unknown top-level field',
    (c) => (c.epochs = 3),
    "(top level): unknown field(s) 'epochs' (allowed: model, devices, output, compute_dtype, quantize, pack_weights, adapters, pipeline, log)",
  ],
  [
    'unknown adapter field',
    (c) => (c.adapters[0].learning_rate = 1e-3),
    "adapters[0]: unknown field(s) 'learning_rate' (allowed: name, data, template, lora, optimizer, schedule, batch_size, micro_batch_size, seq_len, epochs, max_steps, shuffle, seed, train_on_inputs, max_grad_norm, save_every, eval, priority, on_nan, skip_bad_records)",
  ],
  [
    'on_nan unknown action',
    (c) => (c.adapters[0].on_nan = 'retry'),
    'adapters[0].on_nan.action: must be one of "stop", "rollback", got "retry"',
  ],
  [
    'on_nan lr_factor 1',
    (c) => (c.adapters[0].on_nan = { action: 'rollback', lr_factor: 1 }),
    'adapters[0].on_nan.lr_factor: must be in (0, 1), got 1',
  ],
  [
    'on_nan unknown field',
    (c) => (c.adapters[0].on_nan = { action: 'rollback', factor: 0.5 }),
    "adapters[0].on_nan: unknown field(s) 'factor' (allowed: action, lr_factor, max_rollbacks)",
  ],
  [
    'unknown lora field',
    (c) => (c.adapters[0].lora = { rank: 8 }),
    "adapters[0].lora: unknown field(s) 'rank' (allowed: r, alpha, dropout, targets, use_rslora, init)",
  ],
  [
    'lora.r zero',
    (c) => (c.adapters[0].lora = { r: 0 }),
    'adapters[0].lora.r: must be an integer from 1 to 1024, got 0',
  ],
  [
    'lora.r too big',
    (c) => (c.adapters[0].lora = { r: 4096 }),
    'adapters[0].lora.r: must be an integer from 1 to 1024, got 4096',
  ],
  [
    'lora.r fractional',
    (c) => (c.adapters[0].lora = { r: 2.5 }),
    'adapters[0].lora.r: must be an integer from 1 to 1024, got 2.5',
  ],
  [
    'lora.r a string',
    (c) => (c.adapters[0].lora = { r: 'eight' }),
    'adapters[0].lora.r: must be a number, got "eight"',
  ],
  [
    'unknown target module',
    (c) => (c.adapters[0].lora = { targets: ['q_proj', 'qkv_proj'] }),
    'adapters[0].lora.targets[1]: must be one of "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", got "qkv_proj"',
  ],
  ['no targets', (c) => (c.adapters[0].lora = { targets: [] }), 'adapters[0].lora.targets: must have at least 1 item'],
  [
    'micro_batch_size > batch_size',
    (c) => (c.adapters[0].micro_batch_size = 4),
    'adapters[0].micro_batch_size: must be ≤ batch_size (2), got 4',
  ],
  [
    'duplicate names',
    (c) => c.adapters.push({ ...c.adapters[0] }),
    "adapters[1].name: 'a' is used by two adapters; names must be unique",
  ],
  [
    'unsafe name ../x',
    (c) => (c.adapters[0].name = '../x'),
    'adapters[0].name: must be a safe folder name: letters, digits, ".", "_", "-" (no leading dot, at most 64), got "../x"',
  ],
  [
    'hidden name .x',
    (c) => (c.adapters[0].name = '.x'),
    'adapters[0].name: must be a safe folder name: letters, digits, ".", "_", "-" (no leading dot, at most 64), got ".x"',
  ],
  [
    'device gpu:0',
    (c) => (c.devices = ['gpu:0']),
    'devices[0]: must be cpu:N or cuda:N (e.g. cpu:0, cuda:1), got "gpu:0"',
  ],
  [
    'devices a string',
    (c) => (c.devices = 'cpu:0'),
    'devices: must be "auto" or a list of devices like ["cpu:0", "cpu:1"] or ["cuda:0", "cuda:1"], got "cpu:0"',
  ],
  [
    'schedule type',
    (c) => (c.adapters[0].schedule = { type: 'step' }),
    'adapters[0].schedule.type: must be one of "constant", "linear", "cosine", got "step"',
  ],
  ['negative lr', (c) => (c.adapters[0].optimizer = { lr: -1 }), 'adapters[0].optimizer.lr: must be > 0, got -1'],
  [
    'betas not a pair',
    (c) => (c.adapters[0].optimizer = { betas: [0.9] }),
    'adapters[0].optimizer.betas: must have at least 2 items',
  ],
  [
    'log.progress',
    (c) => (c.log = { progress: 'fancy' }),
    'log.progress: must be one of "auto", "bar", "plain", "none", got "fancy"',
  ],
  [
    'pipeline.split',
    (c) => (c.pipeline = { split: 'even' }),
    'pipeline.split: must be "auto" or a list of layer counts per stage, e.g. [2, 2] or [2.5, 2.5], got "even"',
  ],
  ['adapter not an object', (c) => (c.adapters = ['a']), 'adapters[0]: must be an object, got "a"'],
  [
    'missing data file',
    (c) => (c.adapters[0].data = path.join(DIR, 'nope.jsonl')),
    `adapters[0].data: ${path.join(DIR, 'nope.jsonl')}: no such file`,
  ],
  [
    'missing eval file',
    (c) => (c.adapters[0].eval = { data: path.join(DIR, 'held-out.jsonl') }),
    `adapters[0].eval.data: ${path.join(DIR, 'held-out.jsonl')}: no such file`,
  ],
  [
    'eval with neither data nor prompts',
    (c) => (c.adapters[0].eval = { every: 5 }),
    'adapters[0].eval: needs data (held-out examples) or prompts (to sample), or both',
  ],
  [
    'eval.prompts not a list',
    (c) => (c.adapters[0].eval = { prompts: 'Once upon a time' }),
    'adapters[0].eval.prompts: must be a list, got "Once upon a time"',
  ],
  [
    'eval.max_new_tokens 0',
    (c) => (c.adapters[0].eval = { prompts: ['x'], max_new_tokens: 0 }),
    'adapters[0].eval.max_new_tokens: must be ≥ 1, got 0',
  ],
  [
    'eval unknown field',
    (c) => (c.adapters[0].eval = { prompts: ['x'], prompt: ['x'] }),
    "adapters[0].eval: unknown field(s) 'prompt' (allowed: data, every, prompts, max_new_tokens)",
  ],
  [
    'model dir without config.json',
    (c) => (c.model = path.join(DIR, 'not-a-model')),
    `model: ${path.join(DIR, 'not-a-model')} has no config.json (expected a Hugging Face model directory: config.json, model.safetensors, tokenizer.json)`,
  ],
  [
    'model dir missing',
    (c) => (c.model = path.join(DIR, 'nowhere')),
    `model: ${path.join(DIR, 'nowhere')}: no such directory`,
  ],
  [
    'lora.init missing',
    (c) => (c.adapters[0].lora = { init: path.join(DIR, 'no-adapter') }),
    `adapters[0].lora.init: ${path.join(DIR, 'no-adapter')}: no such adapter directory`,
  ],
];

t.test('a table of bad configs, each with its message', async (t) => {
  for (const [label, change, want] of cases) {
    const c = good();
    change(c);
    const file = writeJson(path.join(DIR, `${label.replace(/\W+/g, '-')}.json`), c);
    await t.rejects(
      main([file, '--dry-run']),
      { message: `${file}: ${typeof want === 'string' ? want : want(file)}` },
      label,
    );
  }
});

t.test('several problems are all reported, one line each', async (t) => {
  const c = good();
  c.adapters[0].lora = { r: 0, dropout: 2 };
  c.adapters[0].seq_len = 1;
  const file = writeJson(path.join(DIR, 'several.json'), c);
  await t.rejects(main([file, '--dry-run']), {
    message: [
      `${file}: adapters[0].lora.r: must be an integer from 1 to 1024, got 0`,
      `${file}: adapters[0].lora.dropout: must be ≤ 0.99, got 2`,
      `${file}: adapters[0].seq_len: must be ≥ 2, got 1`,
    ].join('\n'),
  });
});

t.test('syntax errors in YAML and JSON, and files that are not configs', async (t) => {
  const yaml = path.join(DIR, 'bad.yaml');
  fs.writeFileSync(yaml, 'model: m\nadapters:\n  - name: a\n   data: b\n');
  await t.rejects(main([yaml]), { message: new RegExp(`^${yaml}: not valid YAML: .*line 4, column 1`) });
  const json = path.join(DIR, 'bad.json');
  fs.writeFileSync(json, '{"model": "m",}');
  await t.rejects(main([json]), { message: new RegExp(`^${json}: not valid JSON: .*position 14`) });
  const arr = writeJson(path.join(DIR, 'list.json'), [1, 2]);
  await t.rejects(main([arr]), { message: `${arr}: the config must be an object with model, adapters, ...` });
  await t.rejects(main([path.join(DIR, 'none.yaml')]), { message: `${path.join(DIR, 'none.yaml')}: no such file` });
});

t.test('a YAML config with paths relative to its own folder', async (t) => {
  const sub = path.join(DIR, 'yaml-rel');
  fs.mkdirSync(sub);
  fs.copyFileSync(path.join(DEMO_DATA, 'sentiment.jsonl'), path.join(sub, 'sent.jsonl'));
  const file = path.join(sub, 'run.yaml');
  fs.writeFileSync(
    file,
    `model: ${path.relative(sub, model)}\ndevices: [cpu:0]\nadapters:\n  - name: s\n    data: sent.jsonl\n    lora: { r: 4 }\n`,
  );
  t.equal(await main([file, '--dry-run']), 0, 'relative model and data paths resolve against the config file');
  const missing = path.join(sub, 'missing.yaml');
  fs.writeFileSync(missing, `model: ${path.relative(sub, model)}\nadapters:\n  - name: s\n    data: other.jsonl\n`);
  await t.rejects(main([missing, '--dry-run']), {
    message: `${missing}: adapters[0].data: ${path.join(sub, 'other.jsonl')}: no such file`,
  });
});

t.test('the real CLI: the message on stderr, exit code 1, usage errors exit 2', async (t) => {
  const c = good();
  c.adapters[0].lora = { targets: ['attn'] };
  const file = writeJson(path.join(DIR, 'cli.json'), c);
  const r = mlora(['train', file]);
  t.equal(r.code, 1);
  t.equal(
    r.err,
    `mlora: ${file}: adapters[0].lora.targets[0]: must be one of "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", got "attn"\n`,
  );
  t.equal(r.out, '', 'nothing started');
  const u = mlora(['train', file, 'other.json']);
  t.equal(u.code, 2);
  t.match(u.err, /one CONFIG at most/);
  const f = mlora(['train', '--epochs', '3']);
  t.equal(f.code, 2);
  t.match(f.err, /mlora train: Unknown option '--epochs'/);
});
