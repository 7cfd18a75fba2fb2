// --quantize / --compute-dtype on the CLI: --dry-run shows the base's format and its bytes per
// stage (the same numbers the allocator counts, test/train/memory.test.ts); bad values and a
// conflict with a checkpoint saved quantized are errors naming the field and the value.
import t from 'tap';
import path from 'node:path';
import { mlora, smallConfig, writeJson } from './util.js';
import { tinyModelIn } from '../support/models.js';

const quantFixtures = path.resolve('test/fixtures/quant');

t.test('--dry-run shows the quantized base and its bytes', async (t) => {
  const dir = t.testdir();
  const model = await tinyModelIn(path.join(dir, 'model'));
  const cfg = writeJson(path.join(dir, 'c.json'), smallConfig(model, path.join(dir, 'out')));
  const plain = mlora(['train', cfg, '--dry-run']);
  t.equal(plain.code, 0, plain.err);
  t.match(plain.out, /base: compute f32; decoder linears f32; embeddings and LM head f32, norms f32/);
  const q = mlora(['train', cfg, '--dry-run', '--quantize', 'nf4', '--compute-dtype', 'bf16']);
  t.equal(q.code, 0, q.err);
  t.match(
    q.out,
    /base: compute bf16; decoder linears nf4 \(quantized at load\); embeddings and LM head bf16, norms f32/,
  );
  const bytes = (out: string) =>
    [...out.matchAll(/: base ([\d.]+ \w+) \(linears ([\d.]+ \w+) (\w+)/g)].map((m) => m.slice(1));
  t.equal(bytes(q.out).length, 2, 'one line per stage');
  for (const [, , fmt] of bytes(q.out)) t.equal(fmt, 'nf4');
  t.not(bytes(q.out)[0]![0], bytes(plain.out)[0]![0], 'the NF4 base takes fewer bytes');
  const bad = mlora(['train', cfg, '--dry-run', '--quantize', 'fp4']);
  t.equal(bad.code, 1);
  t.match(bad.err, /quantize: must be one of "nf4", "nf4-dq", "int8", got "fp4"/);
});

t.test('a checkpoint saved by bitsandbytes: its format is shown, a different --quantize is refused', async (t) => {
  const dir = t.testdir();
  const cfg = smallConfig(path.join(quantFixtures, 'nf4/model'), path.join(dir, 'out'));
  const file = writeJson(path.join(dir, 'c.json'), {
    ...cfg,
    adapters: cfg.adapters.map((a) => ({ ...a, seq_len: 24 })),
  });
  const r = mlora(['train', file, '--dry-run']);
  t.equal(r.code, 0, r.err);
  t.match(r.out, /decoder linears nf4 \(as saved by bitsandbytes\)/);
  const c = mlora(['train', file, '--dry-run', '--quantize', 'int8']);
  t.equal(c.code, 1);
  t.match(c.err, /saved quantized as nf4 \(config.json quantization_config\); quantize: int8 cannot re-quantize it/);
});
