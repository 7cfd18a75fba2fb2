// `mlora inspect` on what make-model writes (test/cli/inspect-fixtures.test.ts covers the reference
// fixtures and config errors): the tokenizer line, bf16 and sharded checkpoints, and an
// adapter checked against a made model.
import t from 'tap';
import fs from 'node:fs';
import path from 'node:path';
import { main } from '../../scripts/cli/inspect.js';
import { makeModel } from '../../scripts/cli/make-model.js';
import { writeRandomLlama } from '../../lib/io/random-model.js';
import { PRESETS } from '../../lib/model/config.js';
import { FIX, copyFixtureModel, inProcess } from './util.js';
import { tmpDir } from '../support/files.js';

t.test('a made tiny model: config, counts, size and its tokenizer', async (t) => {
  const dir = tmpDir(t, 'insp');
  await makeModel(dir, 'tiny', 1);
  const r = await inProcess(main, dir);
  t.equal(r.code, 0, r.err);
  t.match(r.out, /vocab +512, max positions 512, untied embeddings/);
  t.match(r.out, /parameters +156,480\n/);
  t.match(r.out, /dtypes +F32 ×21\n/);
  t.match(r.out, /size +611 KiB \(625920 bytes\)/);
  t.match(r.out, /tokenizer +512 tokens, bos 1, eos 2, chat template yes\n/);
  const j = JSON.parse((await inProcess(main, dir, '--json')).out);
  t.match(j, {
    kind: 'model',
    parameters: 156480,
    tokenizer: { vocabSize: 512, bosId: 1, eosId: 2, chatTemplate: true },
  });
  // the fixture has no tokenizer
  const fix = await inProcess(main, path.join(FIX, 'model'));
  t.match(fix.out, /tokenizer +none \(pre-tokenized data only\)/);
  t.equal(JSON.parse((await inProcess(main, path.join(FIX, 'model'), '--json')).out).tokenizer, null);
  // a tokenizer bigger than the model's vocabulary cannot go with it
  const mixed = copyFixtureModel(t);
  fs.copyFileSync(path.join(dir, 'tokenizer.json'), path.join(mixed, 'tokenizer.json'));
  fs.copyFileSync(path.join(dir, 'tokenizer_config.json'), path.join(mixed, 'tokenizer_config.json'));
  t.match(
    (await inProcess(main, mixed)).out,
    /tokenizer +UNUSABLE: tokenizer\.json has 512 tokens, more than the model's vocab_size 256/,
  );
  fs.writeFileSync(path.join(mixed, 'tokenizer.json'), '{ not json');
  const broken = await inProcess(main, mixed);
  t.equal(broken.code, 0, 'a broken tokenizer does not hide the rest');
  t.match(broken.out, /tokenizer +UNUSABLE: .*tokenizer\.json/);
});

t.test('bf16 and sharded checkpoints', async (t) => {
  const b = tmpDir(t, 'insp-bf16');
  await makeModel(b, 'tiny', 1, 'bf16');
  const r = await inProcess(main, b);
  t.match(r.out, /torch_dtype +bfloat16/);
  t.match(r.out, /dtypes +BF16 ×21\n/);
  t.match(r.out, /size +306 KiB \(312960 bytes\)/);
  const s = tmpDir(t, 'insp-shards');
  writeRandomLlama(s, PRESETS.tiny, { seed: 1, shardBytes: 200_000 });
  const j = JSON.parse((await inProcess(main, s, '--json')).out);
  t.ok(j.files.length > 1, `${j.files.length} shards`);
  t.match(j.files[0], /^model-00001-of-0000\d\.safetensors$/);
  t.match(j, { tensors: 21, parameters: 156480, bytes: 625920 });
});

t.test('an adapter against a made model', async (t) => {
  const dir = tmpDir(t, 'insp');
  await makeModel(dir, 'tiny', 1);
  // the fixture adapter has the tiny preset's projection shapes
  const ok = await inProcess(main, path.join(FIX, 'adapter'), '--model', dir);
  t.equal(ok.code, 0, ok.err);
  t.match(ok.out, new RegExp(`model +${dir.replace(/[.*+?^${}()|[\]\\]/g, '\\$&')}: matches`));
  const small = tmpDir(t, 'insp-small');
  fs.writeFileSync(
    path.join(small, 'config.json'),
    JSON.stringify({
      ...JSON.parse(fs.readFileSync(path.join(dir, 'config.json'), 'utf8')),
      hidden_size: 128,
      head_dim: 32,
    }),
  );
  const bad = await inProcess(main, path.join(FIX, 'adapter'), '--model', small);
  t.equal(bad.code, 1);
  t.match(bad.out, /DOES NOT MATCH \(\d+ mismatches\)/);
  const wrong = await inProcess(main, dir, '--model', dir);
  t.equal(wrong.code, 1);
  t.match(wrong.err, /--model is for adapter directories/);
});
