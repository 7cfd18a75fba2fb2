// Tokenizing in the piscina pool gives exactly what inline tokenizing gives, in file order;
// errors from workers keep their file:line; the pool leaves no thread behind (a child
// process that uses it exits by itself).
import t from 'tap';
import { spawn } from 'node:child_process';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { pathToFileURL } from 'node:url';
import { readDataset } from '../../lib/data/dataset.js';
import { demoDatasets } from '../../lib/data/demo.js';
import { loadTrainingData, tokenizeDataset } from '../../lib/data/pool.js';
import { writeTokenizerFiles } from '../../lib/data/bpe.js';
import { modelVocabulary } from '../../lib/data/tokenizer.js';

const dir = mkdtempSync(path.join(tmpdir(), 'mlora-pool-'));
t.teardown(() => rmSync(dir, { recursive: true, force: true }));
const modelDir = path.join(dir, 'model');
const ready = writeTokenizerFiles(modelDir, { vocabSize: 512 });

// 400 instruction records with the pool threshold lowered to 300 (the default, 2000, would
// make this test slow on 2 shared cores; the path taken is the same).
const demo = demoDatasets();
const recs = [...demo.arithmetic!.slice(0, 250), ...demo.reverse!.slice(0, 150)];
const big = path.join(dir, 'big.jsonl');
writeFileSync(big, recs.map((r) => JSON.stringify(r)).join('\n') + '\n');
const THRESHOLD = 300;

t.test('pool and inline give identical examples, in order', async (t) => {
  await ready;
  const ds = readDataset(big);
  t.ok(ds.records.length >= THRESHOLD, `${ds.records.length} records`);
  const opts = { modelDir, seqLen: 48 };
  const pooled = await tokenizeDataset(ds, { ...opts, poolThreshold: THRESHOLD, chunkSize: 100, threads: 2 });
  const inline = await tokenizeDataset(ds, { ...opts, poolThreshold: Infinity });
  t.equal(pooled.pooled, true, 'the large dataset used the pool');
  t.equal(inline.pooled, false);
  t.equal(pooled.examples.length, inline.examples.length);
  t.same(pooled.where, inline.where, 'same order');
  t.equal(pooled.truncated, inline.truncated);
  t.equal(pooled.dropped, inline.dropped);
  t.same(pooled.warnings, inline.warnings);
  let diff = 0;
  pooled.examples.forEach((e, i) => {
    const f = inline.examples[i]!;
    if (e.inputIds.join() !== f.inputIds.join() || e.labels.join() !== f.labels.join()) diff++;
  });
  t.equal(diff, 0, 'every example identical (ids and labels)');
});

t.test('a worker error keeps the file and line', async (t) => {
  await ready;
  const bad = path.join(dir, 'bad.jsonl');
  const lines = Array.from({ length: 30 }, (_, i) => JSON.stringify({ input_ids: [1, i === 21 ? 9999 : 5, 2] }));
  writeFileSync(bad, lines.join('\n') + '\n');
  await t.rejects(loadTrainingData(bad, { modelDir, seqLen: 16, poolThreshold: 10, chunkSize: 8, threads: 2 }),
    /bad\.jsonl:22: field 'input_ids\[1\]' = 9999 is outside the vocabulary \(size 512\)/);
});

t.test('small datasets are tokenized inline', async (t) => {
  await ready;
  const small = path.join(dir, 'small.jsonl');
  writeFileSync(small, demo.sentiment!.slice(0, 50).map((r) => JSON.stringify(r)).join('\n') + '\n');
  const r = await loadTrainingData(small, { modelDir, seqLen: 128 });
  t.equal(r.pooled, false);
  t.equal(r.format, 'chat');
  t.equal(r.template, 'chat');
  t.equal(r.examples.length, 50);
});

t.test('a process that used the pool exits by itself (no leaked threads)', async (t) => {
  await ready;
  const poolUrl = pathToFileURL(path.resolve(import.meta.dirname, '../../lib/data/pool.js')).href;
  const script = path.join(dir, 'child.mjs');
  writeFileSync(script, `import { loadTrainingData } from ${JSON.stringify(poolUrl)};
const r = await loadTrainingData(${JSON.stringify(big)}, { modelDir: ${JSON.stringify(modelDir)}, seqLen: 32, threads: 2, chunkSize: 200, poolThreshold: ${THRESHOLD} });
console.log('examples', r.examples.length, 'pooled', r.pooled);
`);
  const child = spawn(process.execPath, [script], { stdio: ['ignore', 'pipe', 'inherit'] });
  let out = '';
  child.stdout.on('data', (c) => (out += c));
  const code = await new Promise<number | string>((resolve) => {
    const timer = setTimeout(() => {
      child.kill('SIGKILL');
      resolve('timeout');
    }, 30000);
    child.on('exit', (c) => {
      clearTimeout(timer);
      resolve(c ?? -1);
    });
  });
  t.equal(code, 0, 'exited by itself with code 0');
  t.match(out, /examples \d+ pooled true/);
});

t.test('pre-tokenized data in a model directory without tokenizer.json: inline and pooled, vocab from config.json', async (t) => {
  const bare = mkdtempSync(path.join(tmpdir(), 'mlora-pool-bare-'));
  t.teardown(() => rmSync(bare, { recursive: true, force: true }));
  writeFileSync(path.join(bare, 'config.json'), JSON.stringify({ model_type: 'llama', vocab_size: 300, eos_token_id: [7, 8] }));
  writeFileSync(path.join(bare, 'generation_config.json'), JSON.stringify({ bos_token_id: 5, eos_token_id: 9 }));
  const file = path.join(bare, 'ids.jsonl');
  const rows = Array.from({ length: 40 }, (_, i) => ({ input_ids: Array.from({ length: 5 + (i % 7) }, (_, j) => (i * 31 + j * 7) % 300) }));
  writeFileSync(file, rows.map((r) => JSON.stringify(r)).join('\n') + '\n');
  const ds = readDataset(file);
  const pooled = await tokenizeDataset(ds, { modelDir: bare, seqLen: 16, poolThreshold: 10, chunkSize: 8, threads: 2 });
  const inline = await tokenizeDataset(ds, { modelDir: bare, seqLen: 16, poolThreshold: Infinity });
  t.ok(pooled.pooled && !inline.pooled);
  t.same(pooled.examples.map((e) => Array.from(e.inputIds)), rows.map((r) => r.input_ids), 'the ids as given, nothing added');
  t.same(pooled.examples.map((e) => Array.from(e.inputIds)), inline.examples.map((e) => Array.from(e.inputIds)), 'pool == inline');
  const vocab = modelVocabulary(bare);
  t.equal(vocab.vocabSize, 300);
  t.equal(vocab.eosId, 7, 'EOS from config.json (the first of a list)');
  t.equal(vocab.bosId, 5, 'BOS from generation_config.json when config.json has none');
  t.throws(() => vocab.encode('hi'), /tokenizer\.json: not found: encoding text needs a tokenizer \(pre-tokenized data, \{input_ids, labels\}, does not\)/);
  writeFileSync(path.join(bare, 'bad.jsonl'), JSON.stringify({ input_ids: [1, 300] }) + '\n');
  await t.rejects(tokenizeDataset(readDataset(path.join(bare, 'bad.jsonl')), { modelDir: bare, seqLen: 16 }), /field 'input_ids\[1\]' = 300 is outside the vocabulary \(size 300\)/);
  writeFileSync(path.join(bare, 'text.jsonl'), JSON.stringify({ text: 'hello' }) + '\n');
  await t.rejects(tokenizeDataset(readDataset(path.join(bare, 'text.jsonl')), { modelDir: bare, seqLen: 16 }), /tokenizer\.json: not found \(a model directory needs a tokenizer\.json\)/, 'text data still needs the tokenizer');
});
