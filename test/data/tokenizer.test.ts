// The byte-level BPE tokenizer mlora writes: it loads with @huggingface/tokenizers, has the
// exact vocabulary size and special ids, round-trips any text, and renders its chat template.
import t from 'tap';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { writeTokenizerFiles, trainByteLevelBpe, MIN_VOCAB, BOS_ID, EOS_ID, PAD_ID } from '../../lib/data/bpe.js';
import { loadTokenizer } from '../../lib/data/tokenizer.js';
import { PRESETS } from '../../lib/model/config.js';

const dir = mkdtempSync(path.join(tmpdir(), 'mlora-tok-'));
t.teardown(() => rmSync(dir, { recursive: true, force: true }));

const TEXTS = [
  '',
  'Hello, world!',
  'What is the capital of France?',
  '  leading and trailing spaces  ',
  'tabs\tand\nnew lines\r\n',
  'Ünïcödé: naïve café, Straße, Ελληνικά, русский, 中文, 日本語, 한국어',
  'emoji 😀👍🏽👨‍👩‍👧 and flags 🇫🇷',
  "it's we're they've I'm you'll he'd",
  'numbers 12345 3.14159 -42',
  'special-looking </s> and <s> inside text',
];

t.test('written tokenizer loads, sizes and special ids are exact', async (t) => {
  for (const v of [MIN_VOCAB, PRESETS.tiny.vocabSize, PRESETS.small.vocabSize]) {
    const d = path.join(dir, `v${v}`);
    const info = await writeTokenizerFiles(d, { vocabSize: v });
    const tok = loadTokenizer(d);
    t.equal(tok.vocabSize, v, `vocab ${v}: size exact (${info.merges} merges, ${info.reserved} reserved)`);
    t.equal(tok.bosId, BOS_ID);
    t.equal(tok.eosId, EOS_ID);
    t.equal(tok.padId, PAD_ID);
    t.equal(tok.bosId, PRESETS.tiny.bosTokenId, 'bos matches the model presets');
    t.equal(tok.eosId, PRESETS.tiny.eosTokenId, 'eos matches the model presets');
    if (v === MIN_VOCAB) t.equal(info.merges, 0, 'no room for merges: bytes only');
    const j = JSON.parse(readFileSync(path.join(d, 'tokenizer.json'), 'utf8'));
    t.equal(j.model.type, 'BPE');
    t.equal(j.pre_tokenizer.type, 'ByteLevel');
    t.equal(j.decoder.type, 'ByteLevel');
    const ids = new Set(Object.values(j.model.vocab as Record<string, number>));
    t.equal(ids.size, v, 'vocab ids are unique');
    t.equal(Math.max(...ids), v - 1, 'vocab ids have no gaps');
  }
});

t.test('round trip: encode -> decode is the identity on arbitrary UTF-8', async (t) => {
  const d = path.join(dir, 'v512');
  await writeTokenizerFiles(d, { vocabSize: 512 });
  const tok = loadTokenizer(d);
  for (const s of TEXTS) {
    const ids = tok.encode(s);
    for (const id of ids) if (id < 0 || id >= tok.vocabSize) t.fail(`id ${id} out of range`);
    t.equal(tok.decode(ids), s, `round trip ${JSON.stringify(s).slice(0, 40)}`);
  }
  t.same(tok.encode(''), [], 'empty text -> no ids');
  t.equal(tok.decode([]), '', 'no ids -> empty text');
  const withBos = tok.encode('hi', { addSpecialTokens: true });
  t.equal(withBos[0], BOS_ID, 'addSpecialTokens prepends BOS (LLaMA-style post-processor)');
  t.same(withBos.slice(1), tok.encode('hi'));
  t.same(tok.encode('a</s>b').includes(EOS_ID), true, 'special token text maps to its id');
});

t.test('merges: learned deterministically and used by the loader', async (t) => {
  const corpus = ['the cat sat on the mat', 'the hat', 'that is the thing'];
  const a = trainByteLevelBpe(corpus, 300);
  const b = trainByteLevelBpe(corpus, 300);
  t.same(a.merges, b.merges, 'same corpus -> same merges');
  t.ok(a.merges.length > 5);
  t.equal(a.vocab.size, 300, 'filled to the exact size with reserved entries');
  const d = path.join(dir, 'small-corpus');
  await writeTokenizerFiles(d, { vocabSize: 300, corpus });
  const tok = loadTokenizer(d);
  t.equal(tok.encode(' the').length, 1, "' the' (the most frequent word) is one token");
  t.ok(tok.encode('the cat sat on the mat').length < 'the cat sat on the mat'.length, 'merges shorten the encoding');
  t.throws(() => trainByteLevelBpe(corpus, 100), /vocab size must be an integer ≥ 260/);
});

t.test('vocab 8192 from the default corpus', async (t) => {
  // (its time is printed, not asserted: speed depends on the machine and its load)
  const t0 = performance.now();
  const r = trainByteLevelBpe(['x'.repeat(10)].concat((await import('../../lib/data/demo.js')).demoCorpus()), 8192);
  t.equal(r.vocab.size, 8192, `trained in ${Math.round(performance.now() - t0)} ms`);
});

t.test('chat template renders; a tokenizer without one gives a clear error', async (t) => {
  const d = path.join(dir, 'v512');
  const tok = loadTokenizer(d);
  t.ok(tok.hasChatTemplate);
  const msgs = [{ role: 'system', content: 'Be brief.' }, { role: 'user', content: 'Hi' }, { role: 'assistant', content: 'Hello' }];
  t.equal(tok.applyChatTemplate(msgs), '<|system|>\nBe brief.</s><|user|>\nHi</s><|assistant|>\nHello</s>');
  t.equal(tok.applyChatTemplate(msgs.slice(0, 2), { addGenerationPrompt: true }), '<|system|>\nBe brief.</s><|user|>\nHi</s><|assistant|>\n');
  const d2 = path.join(dir, 'nochat');
  await writeTokenizerFiles(d2, { vocabSize: 300, corpus: ['abc'], chatTemplate: null });
  const tok2 = loadTokenizer(d2);
  t.notOk(tok2.hasChatTemplate);
  t.throws(() => tok2.applyChatTemplate(msgs), /nochat\/tokenizer_config\.json: the tokenizer has no chat_template/);
});

t.test('load errors name the file', async (t) => {
  t.throws(() => loadTokenizer(path.join(dir, 'missing')), /missing\/tokenizer\.json: not found/);
  const d = path.join(dir, 'broken');
  await writeTokenizerFiles(d, { vocabSize: 300, corpus: ['abc'] });
  writeFileSync(path.join(d, 'tokenizer_config.json'), '{ nope');
  t.throws(() => loadTokenizer(d, { fresh: true }), /broken\/tokenizer_config\.json: invalid JSON/);
  writeFileSync(path.join(d, 'tokenizer.json'), '[]');
  t.throws(() => loadTokenizer(d, { fresh: true }), /broken\/tokenizer\.json: not a tokenizer\.json/);
});
