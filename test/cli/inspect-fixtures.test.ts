// `mlora inspect` on a model dir and an adapter dir, run as the real CLI (a child process).
import t from 'tap';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { writeRandomLlama } from '../../lib/io/random-model.js';
import { PRESETS } from '../../lib/model/config.js';
import { FIX, mlora as cli } from './util.js';

const mlora = (...args: string[]) => cli(['inspect', ...args]);

t.test('a model directory', async (t) => {
  const r = mlora(path.join(FIX, 'model'));
  t.equal(r.code, 0, r.err);
  t.match(r.out, /type +llama, 2 layers, hidden 64, intermediate 172/);
  t.match(r.out, /attention +4 heads, 2 kv heads, head_dim 16/);
  t.match(r.out, /tensors +21\n/);
  t.match(r.out, /parameters +123,712/);
  t.match(r.out, /dtypes +F32 ×21/);
  const j = mlora(path.join(FIX, 'model'), '--json');
  t.equal(j.code, 0);
  t.match(JSON.parse(j.out), {
    kind: 'model',
    tensors: 21,
    parameters: 123712,
    bytes: 494848,
    dtypes: { F32: 21 },
    config: { numKvHeads: 2 },
  });
});

t.test('an adapter directory, alone and against base models', async (t) => {
  const r = mlora(path.join(FIX, 'adapter'));
  t.equal(r.code, 0, r.err);
  t.match(r.out, /r +4\n/);
  t.match(r.out, /alpha +8 \(scaling 2\)/);
  t.match(r.out, /targets +q_proj k_proj v_proj o_proj gate_proj up_proj down_proj/);
  t.match(r.out, /layers +0-1 \(2\)/);
  t.match(r.out, /parameters +9,248/);
  const ok = mlora(path.join(FIX, 'adapter'), '--model', path.join(FIX, 'model'), '--json');
  t.equal(ok.code, 0);
  t.match(JSON.parse(ok.out), {
    kind: 'adapter',
    r: 4,
    layers: [0, 1],
    parameters: 9248,
    matchesModel: true,
    mismatches: [],
  });

  const d = fs.mkdtempSync(path.join(os.tmpdir(), 'mlora-inspect-'));
  t.teardown(() => fs.rmSync(d, { recursive: true, force: true }));
  writeRandomLlama(d, PRESETS.tiny, { seed: 1 }); // same projection shapes as the fixture; then 1 kv head
  const cfg = JSON.parse(fs.readFileSync(path.join(d, 'config.json'), 'utf8'));
  fs.writeFileSync(path.join(d, 'config.json'), JSON.stringify({ ...cfg, num_key_value_heads: 1 }));
  const bad = mlora(path.join(FIX, 'adapter'), '--model', d);
  t.equal(bad.code, 1);
  t.match(bad.out, /DOES NOT MATCH \(4 mismatches\)/);
  t.match(bad.out, /layers\.0\.self_attn\.k_proj\.lora_B\.weight: adapter \[32, 4\], model k_proj needs \[16, 4\]/);
});

t.test('errors name the file and the field', async (t) => {
  const d = fs.mkdtempSync(path.join(os.tmpdir(), 'mlora-inspect-'));
  t.teardown(() => fs.rmSync(d, { recursive: true, force: true }));
  fs.writeFileSync(path.join(d, 'config.json'), JSON.stringify({ model_type: 'llama', hidden_size: 'abc' }));
  const r = mlora(d);
  t.equal(r.code, 1);
  t.match(r.err, /mlora: .*config\.json: field 'hidden_size' must be a positive integer, got "abc"/);
  fs.rmSync(path.join(d, 'config.json'));
  t.match(mlora(d).err, /neither a model directory \(no config\.json\) nor an adapter directory/);
  t.equal(mlora().code, 2, 'no directory: usage');
});
