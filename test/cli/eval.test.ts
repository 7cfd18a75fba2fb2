// `mlora eval` / evaluateDataset: mean loss, perplexity and token count against an independent
// computation (full logits + a float64 log-softmax, test/support/logits.ts) and against the PyTorch
// reference loss of test/fixtures/llama-tiny; pre-tokenized data needs no tokenizer.json.
import t from 'tap';
import fs from 'node:fs';
import path from 'node:path';
import { evaluateDataset, main } from '../../scripts/cli/eval.js';
import { makeModel } from '../../scripts/cli/make-model.js';
import { openSingleModel } from '../../lib/model/single.js';
import { readDataset } from '../../lib/data/dataset.js';
import { tokenizeDataset } from '../../lib/data/pool.js';
import { Rng } from '../../lib/rng.js';
import { assertClose } from '../support/helpers.js';
import { FIX, ROOT, copyFixtureModel, inProcess, mlora } from './util.js';
import { referenceLoss } from '../support/logits.js';
import { tmpDir } from '../support/files.js';

interface Ref {
  input_ids: number[][];
  labels: number[][];
  loss: number;
}
const ref = JSON.parse(fs.readFileSync(path.join(FIX, 'ref.json'), 'utf8')) as Ref;

// f32 kernels (summed in other orders) vs a float64 log-softmax of the same f32 logits
const LOSS_TOL = { atol: 1e-5, rtol: 1e-5 };

function writeJsonl(file: string, recs: unknown[]) {
  fs.writeFileSync(file, recs.map((r) => JSON.stringify(r)).join('\n') + '\n');
}

t.test('pre-tokenized JSONL on a model dir without tokenizer.json: loss, perplexity, tokens', async (t) => {
  const model = copyFixtureModel(t);
  t.notOk(fs.existsSync(path.join(model, 'tokenizer.json')), 'no tokenizer in the model dir');
  const d = tmpDir(t, 'eval');
  const rng = new Rng(5, 'eval-data');
  const seqs: Array<{ input_ids: number[]; labels?: number[] }> = [];
  for (const n of [7, 30, 1, 12, 19, 40]) {
    const ids = Array.from({ length: n }, () => Math.floor(rng.uniform() * 256));
    if (n % 2)
      seqs.push({ input_ids: ids }); // labels default to input_ids
    else seqs.push({ input_ids: ids, labels: ids.map((x, i) => (i < 3 ? -100 : x)) });
  }
  const file = path.join(d, 'tok.jsonl');
  writeJsonl(file, seqs);
  const m = await openSingleModel(model);
  const want = await referenceLoss(
    m,
    seqs.map((s) => ({ inputIds: s.input_ids, ...(s.labels ? { labels: s.labels } : {}) })),
  );
  m.free();
  for (const batchTokens of [4096, 32]) {
    // one packed batch; several
    const r = await evaluateDataset({ model, data: file, seqLen: 512, batchTokens });
    t.equal(r.tokens, want.count, `token count (batch-tokens ${batchTokens})`);
    t.equal(r.examples, seqs.length);
    assertClose(t, [r.loss], [want.loss], LOSS_TOL, `mean loss (batch-tokens ${batchTokens})`);
    assertClose(t, [r.perplexity], [Math.exp(want.loss)], LOSS_TOL, 'perplexity = exp(loss)');
  }
  // --seq-len truncates each sequence to its first N tokens
  const r = await evaluateDataset({ model, data: file, seqLen: 10, batchTokens: 4096 });
  const cut = await (async () => {
    const m2 = await openSingleModel(model);
    try {
      return await referenceLoss(
        m2,
        seqs.map((s) => ({
          inputIds: s.input_ids.slice(0, 10),
          ...(s.labels ? { labels: s.labels.slice(0, 10) } : {}),
        })),
      );
    } finally {
      m2.free();
    }
  })();
  t.equal(r.tokens, cut.count, 'seq-len 10: token count');
  assertClose(t, [r.loss], [cut.loss], LOSS_TOL, 'seq-len 10: loss');
});

t.test('with the reference adapter the loss is the PyTorch+PEFT reference loss', async (t) => {
  const model = copyFixtureModel(t);
  const d = tmpDir(t, 'eval');
  const file = path.join(d, 'ref.jsonl');
  writeJsonl(
    file,
    ref.input_ids.map((ids, i) => ({ input_ids: ids, labels: ref.labels[i] })),
  );
  const base = await evaluateDataset({ model, data: file, seqLen: 512, batchTokens: 4096 });
  const withAd = await evaluateDataset({
    model,
    adapter: path.join(FIX, 'adapter'),
    data: file,
    seqLen: 512,
    batchTokens: 4096,
  });
  // same definition as the reference: mean CE over every target token of the batch
  const count = ref.labels.reduce((s, row) => s + row.slice(1).filter((x) => x !== -100).length, 0);
  t.equal(withAd.tokens, count, 'token count');
  assertClose(t, [withAd.loss], [ref.loss], { atol: 1e-6, rtol: 2e-6 }, 'loss with adapter vs reference');
  t.ok(
    Math.abs(withAd.loss - base.loss) > 1e-3,
    `the adapter changes the loss (${base.loss.toFixed(5)} → ${withAd.loss.toFixed(5)})`,
  );
  const m = await openSingleModel(model);
  const want = await referenceLoss(
    m,
    ref.input_ids.map((ids, i) => ({ inputIds: ids, labels: ref.labels[i]! })),
  );
  m.free();
  assertClose(t, [base.loss], [want.loss], LOSS_TOL, 'loss without adapter vs independent computation');

  // the CLI, text and --json
  const j = mlora(['eval', '--model', model, '--adapter', path.join(FIX, 'adapter'), '--data', file, '--json']);
  t.equal(j.code, 0, j.err);
  const o = JSON.parse(j.out) as { loss: number; perplexity: number; tokens: number; examples: number };
  t.same(Object.keys(o).sort(), ['examples', 'loss', 'perplexity', 'tokens']);
  t.equal(o.tokens, count);
  t.equal(o.examples, 2);
  assertClose(
    t,
    [o.loss, o.perplexity],
    [ref.loss, Math.exp(ref.loss)],
    { atol: 1e-6, rtol: 2e-6 },
    '--json loss, perplexity',
  );
  const txt = mlora(['eval', '--model', model, '--data', file]);
  t.equal(txt.code, 0, txt.err);
  t.match(
    txt.out,
    new RegExp(
      `^loss ${base.loss.toFixed(4)}  perplexity ${base.perplexity.toFixed(3)}  tokens ${count}  examples 2\\n$`,
    ),
  );
});

t.test(
  'a long file reports progress on stderr: a line at every tenth of the batches; the result is unchanged',
  async (t) => {
    const model = copyFixtureModel(t);
    const d = tmpDir(t, 'eval');
    const file = path.join(d, 'long.jsonl');
    // 40 sequences of 8 tokens, 2 per batch of 16 tokens: 20 batches
    writeJsonl(
      file,
      Array.from({ length: 40 }, (_, i) => ({
        input_ids: Array.from({ length: 8 }, (_, j) => ((i * 7 + j * 3) % 200) + 4),
      })),
    );
    const seen: number[] = [];
    const r = await evaluateDataset({
      model,
      data: file,
      seqLen: 512,
      batchTokens: 16,
      onProgress: (p) => seen.push(p.batch),
    });
    t.same(
      seen,
      Array.from({ length: 20 }, (_, i) => i + 1),
      'one callback per batch, in order',
    );
    const cli = mlora(['eval', '--model', model, '--data', file, '--batch-tokens', '16', '--json']);
    t.equal(cli.code, 0, cli.err);
    const lines = cli.err.trim().split('\n');
    t.equal(lines.length, 10, `ten progress lines: ${cli.err}`);
    t.match(lines[0], `eval ${file}: 10% (batch 2/20, 4/40 examples, 28 tokens, `);
    t.match(lines[9], `eval ${file}: 100% (batch 20/20, 40/40 examples, 280 tokens, `);
    t.equal((JSON.parse(cli.out) as { loss: number }).loss, r.loss, 'stdout holds the result alone');
    const quiet = mlora(['eval', '--model', model, '--data', file, '--batch-tokens', '16', '--no-progress']);
    t.equal(quiet.err, '', '--no-progress: nothing on stderr');
    const short = mlora(['eval', '--model', model, '--data', file]);
    t.equal(short.err, '', 'a file of fewer than ten batches: no progress lines');
  },
);

t.test('bad data: errors name the file and line and the vocab size', async (t) => {
  const model = copyFixtureModel(t);
  const d = tmpDir(t, 'eval');
  const file = path.join(d, 'bad.jsonl');
  writeJsonl(file, [{ input_ids: [1, 2, 3] }, { input_ids: [4, 256, 5] }]);
  await t.rejects(evaluateDataset({ model, data: file, seqLen: 512, batchTokens: 4096 }), {
    message: `${file}:2: token id 256 is out of range for vocab_size 256`,
  });
  writeJsonl(file, [{ input_ids: [1, 2, 3], labels: [-100, 2, 999] }]);
  await t.rejects(evaluateDataset({ model, data: file, seqLen: 512, batchTokens: 4096 }), {
    message: new RegExp(`^${file}:1: label 999 is out of range for vocab_size 256`),
  });
  writeJsonl(file, [{ input_ids: [1, 2, 3], labels: [1, 2] }]);
  await t.rejects(evaluateDataset({ model, data: file, seqLen: 512, batchTokens: 4096 }), {
    message: new RegExp(`^${file}:1: field 'labels' must have the length of 'input_ids' \\(3\\)`),
  });
  writeJsonl(file, [{ input_ids: [1, -3, 3] }]);
  const r = await inProcess(main, '--model', model, '--data', file);
  t.equal(r.code, 1);
  t.match(r.err, `mlora: ${file}:1:`);
  // text data needs the tokenizer, and says so
  writeJsonl(file, [{ text: 'hello' }]);
  const nt = await inProcess(main, '--model', model, '--data', file);
  t.equal(nt.code, 1);
  t.match(nt.err, /tokenizer\.json/);
  const u = await inProcess(main, '--model', model);
  t.equal(u.code, 2);
  t.match(u.err, /--model and --data are required/);
  for (const [flag, v] of [
    ['--seq-len', 'abc'],
    ['--seq-len', '0'],
    ['--batch-tokens', '-5'],
  ] as const) {
    writeJsonl(file, [{ input_ids: [1, 2, 3] }]);
    const b = await inProcess(main, '--model', model, '--data', file, `${flag}=${v}`);
    t.equal(b.code, 2, `${flag} ${v}: usage error`);
    t.match(b.err, new RegExp(`${flag} must be a positive integer, got '${v}'`));
  }
});

t.test('instruction and text data with the tiny preset from make-model', async (t) => {
  const model = tmpDir(t, 'tiny');
  await makeModel(model, 'tiny', 7);
  const d = tmpDir(t, 'eval');
  const m = await openSingleModel(model);
  t.teardown(() => m.free());
  // the first 24 records of a demo dataset (instruction format: only the response is a target)
  const file = path.join(d, 'capitals.jsonl');
  fs.writeFileSync(
    file,
    fs.readFileSync(path.join(ROOT, 'data/demo/capitals.jsonl'), 'utf8').split('\n').slice(0, 24).join('\n') + '\n',
  );
  const text = path.join(d, 'text.jsonl');
  writeJsonl(text, [
    { text: 'The quick brown fox jumps over the lazy dog.' },
    { text: 'Pack my box with five dozen liquor jugs, said the sphinx.' },
  ]);
  for (const f of [file, text]) {
    const r = await evaluateDataset({ model, data: f, seqLen: 256, batchTokens: 4096 });
    const examples = (await tokenizeDataset(readDataset(f), { modelDir: model, seqLen: 256 })).examples;
    const want = await referenceLoss(m, examples);
    t.equal(r.tokens, want.count, `${path.basename(f)}: token count`);
    t.ok(want.count > 0);
    t.equal(r.examples, examples.length);
    assertClose(t, [r.loss], [want.loss], LOSS_TOL, `${path.basename(f)}: loss`);
    // a random model is close to uniform over the 512 tokens
    t.ok(Math.abs(r.loss - Math.log(512)) < 1, `${path.basename(f)}: loss ${r.loss.toFixed(3)} ≈ ln 512`);
  }
});
