// Datasets, templates and tokenization: every format parses, bad records are errors that
// name file, line and field (or are skipped and counted), label masks are checked token by
// token, truncation and dropping are counted.
import t from 'tap';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { parseDataset, readDataset } from '../../lib/data/dataset.js';
import { ALPACA, loadTemplateFile, resolveTemplate, renderInstruction } from '../../lib/data/templates.js';
import { IGNORE_INDEX, tokenizeRecords, countTargets } from '../../lib/data/tokenize.js';
import { writeTokenizerFiles } from '../../lib/data/bpe.js';
import { loadTokenizer } from '../../lib/data/tokenizer.js';

const dir = mkdtempSync(path.join(tmpdir(), 'mlora-ds-'));
t.teardown(() => rmSync(dir, { recursive: true, force: true }));
const file = (name: string, text: string) => {
  const f = path.join(dir, name);
  writeFileSync(f, text);
  return f;
};
const modelDir = path.join(dir, 'model');
const ready = writeTokenizerFiles(modelDir, { vocabSize: 512 });
const jsonl = (...recs: unknown[]) => recs.map((r) => (typeof r === 'string' ? r : JSON.stringify(r))).join('\n') + '\n';

t.test('every format parses (JSONL and JSON array), detected from the first record', async (t) => {
  const cases: Array<[string, unknown[], string]> = [
    ['instruction', [{ instruction: 'Add', input: '1 2', output: '3' }, { instruction: 'Hi', output: 'Hello' }], 'instruction'],
    ['chat', [{ messages: [{ role: 'user', content: 'Hi' }, { role: 'assistant', content: 'Hello' }] }], 'chat'],
    ['text', [{ text: 'Once upon a time.' }, { text: 'The end.' }], 'text'],
    ['tokenized', [{ input_ids: [1, 5, 6], labels: [-100, 5, 6] }, { input_ids: [1, 7] }], 'tokenized'],
  ];
  for (const [name, recs, format] of cases) {
    const a = readDataset(file(`${name}.jsonl`, jsonl(...recs)));
    const b = readDataset(file(`${name}.json`, JSON.stringify(recs, null, 2)));
    t.equal(a.format, format, `${name}.jsonl detected as ${format}`);
    t.equal(b.format, format, `${name}.json detected as ${format}`);
    t.equal(a.records.length, recs.length);
    t.same(a.records, b.records, 'JSON and JSONL give the same records');
    t.match(a.where[0], /\.jsonl:1$/);
    t.match(b.where[0], /\.json\[0\]$/);
  }
  const ins = readDataset(file('ins.jsonl', jsonl({ instruction: 'Add', input: '', output: '3' }, { instruction: 'x', input: null, output: 'y', extra: 1 })));
  t.same(ins.records, [{ kind: 'instruction', instruction: 'Add', output: '3' }, { kind: 'instruction', instruction: 'x', output: 'y' }], 'empty/null input = no input; extra fields ignored');
  const forced = parseDataset(jsonl({ text: 'a', output: 'b' }), 'f.jsonl', { format: 'text' });
  t.equal(forced.format, 'text', 'the format can be given');
  const blank = parseDataset('\n{"text":"a"}\n\n{"text":"b"}\n', 'blank.jsonl');
  t.same(blank.where, ['blank.jsonl:2', 'blank.jsonl:4'], 'blank lines are skipped; line numbers stay true');
});

t.test('bad records: each error names file, line and field', async (t) => {
  const ok = { instruction: 'a', output: 'b' };
  const table: Array<[string, string, RegExp, object?]> = [
    ['bad JSON line', jsonl(ok, ok, '{"instruction": "a", "output": '), /^bad\.jsonl:3: invalid JSON/],
    ['missing field', jsonl(ok, { instruction: 'a' }), /^bad\.jsonl:2: field 'output' is missing$/],
    ['wrong type', jsonl(ok, ok, { instruction: 'a', output: 7 }), /^bad\.jsonl:3: field 'output' must be a string, got a number$/],
    ['wrong input type', jsonl({ instruction: 'a', input: ['x'], output: 'b' }), /^bad\.jsonl:1: field 'input' must be a string, got an array$/],
    ['not an object', jsonl(ok, '[1, 2]'), /^bad\.jsonl:2: record must be a JSON object, got an array$/],
    ['empty file', '', /^bad\.jsonl: empty dataset \(no records\)$/],
    ['only blank lines', '\n\n  \n', /^bad\.jsonl: empty dataset/],
    ['unknown format (detected)', jsonl({ question: 'a', answer: 'b' }), /^bad\.jsonl:1: unknown data format: the first record has fields 'question', 'answer'/],
    ['unknown format (given)', jsonl(ok), /^bad\.jsonl: unknown data format 'csv' \(allowed: instruction, chat, text, tokenized\)$/, { format: 'csv' }],
    ['chat role', jsonl({ messages: [{ role: 'robot', content: 'x' }] }), /^bad\.jsonl:1: field 'messages\[0\]\.role' must be one of system, user, assistant, got "robot"$/],
    ['chat content', jsonl({ messages: [{ role: 'user', content: 'x' }, { role: 'assistant' }] }), /^bad\.jsonl:1: field 'messages\[1\]\.content' is missing$/],
    ['chat content type', jsonl({ messages: [{ role: 'user', content: 1 }] }), /^bad\.jsonl:1: field 'messages\[0\]\.content' must be a string, got a number$/],
    ['chat without assistant', jsonl({ messages: [{ role: 'user', content: 'x' }] }), /^bad\.jsonl:1: field 'messages' has no assistant message/],
    ['chat not array', jsonl({ messages: 'hi' }), /^bad\.jsonl:1: field 'messages' must be an array/],
    ['text type', jsonl({ text: 'a' }, { text: null }), /^bad\.jsonl:2: field 'text' must be a string, got null$/],
    ['input_ids type', jsonl({ input_ids: [1, 2] }, { input_ids: [1, 'x'] }), /^bad\.jsonl:2: field 'input_ids\[1\]' must be a non-negative integer, got "x"$/],
    ['labels length', jsonl({ input_ids: [1, 2], labels: [1] }), /^bad\.jsonl:1: field 'labels' must have the length of 'input_ids' \(2\), got 1$/],
    ['labels value', jsonl({ input_ids: [1, 2], labels: [-1, 2] }), /^bad\.jsonl:1: field 'labels\[0\]' must be a non-negative integer or -100, got -1$/],
  ];
  for (const [name, text, re, opts] of table) t.throws(() => parseDataset(text, 'bad.jsonl', opts), re, name);
  t.throws(() => parseDataset('[{"instruction": "a", "output": "b"}, {"instruction": 3, "output": "b"}]', 'bad.json'),
    /^bad\.json\[1\]: field 'instruction' must be a string, got a number$/, 'JSON array: index named');
  t.throws(() => parseDataset('[{"a": 1}', 'bad.json'), /^bad\.json: invalid JSON/);
  t.throws(() => readDataset(path.join(dir, 'nope.jsonl')), /nope\.jsonl: cannot read the dataset/);
});

t.test('skipBad skips and counts', async (t) => {
  const text = jsonl({ instruction: 'a', output: 'b' }, '{oops', { instruction: 'a' }, { instruction: 'c', output: 'd' }, { instruction: 1, output: 'x' });
  const ds = parseDataset(text, 'mixed.jsonl', { skipBad: true });
  t.equal(ds.records.length, 2);
  t.equal(ds.skipped, 3);
  t.same(ds.where, ['mixed.jsonl:1', 'mixed.jsonl:4']);
  t.match(ds.skippedMessages[1], /^mixed\.jsonl:3: field 'output' is missing$/);
  t.throws(() => parseDataset(jsonl('{x', '{y'), 'allbad.jsonl', { skipBad: true }), /allbad\.jsonl: no valid records \(2 skipped/);
});

t.test('templates: names, files and format checks', async (t) => {
  t.equal(resolveTemplate(undefined, 'instruction'), ALPACA);
  t.equal(resolveTemplate(undefined, 'chat').kind, 'chat');
  t.equal(resolveTemplate(undefined, 'text').kind, 'plain');
  t.equal(resolveTemplate(undefined, 'tokenized').kind, 'none');
  t.throws(() => resolveTemplate('alpaca', 'chat', 'c.jsonl'), /c\.jsonl: template 'alpaca' cannot render chat data \(chat data needs template 'chat'\)/);
  t.throws(() => resolveTemplate('chat', 'instruction', 'i.jsonl'), /template 'chat' cannot render instruction data/);
  t.throws(() => resolveTemplate('vicuna', 'instruction', 'i.jsonl'), /i\.jsonl: unknown template 'vicuna' \(allowed: alpaca, chat, plain, or a template file path\)/);
  t.throws(() => resolveTemplate('alpaca', 'tokenized', 'p.jsonl'), /p\.jsonl: pre-tokenized data \(input_ids\) takes no template/);
  const r = { kind: 'instruction' as const, instruction: 'Add', input: '1 2', output: '3' };
  t.equal(renderInstruction(ALPACA, r).prompt, ALPACA.prompt.replace('{instruction}', 'Add').replace('{input}', '1 2'));
  t.match(renderInstruction(ALPACA, { ...r, input: undefined }).prompt, /^Below is an instruction that describes a task\. Write/);
  t.equal(renderInstruction(ALPACA, r).response, '3');
  const tf = file('qa.json', JSON.stringify({ prompt: 'Q: {instruction} [{input}] {{literal}}\nA: ', response: '{output}' }));
  const qa = loadTemplateFile(tf);
  t.same(renderInstruction(qa, r), { prompt: 'Q: Add [1 2] {literal}\nA: ', response: '3' });
  t.same(renderInstruction(qa, { ...r, input: undefined }).prompt, 'Q: Add [] {literal}\nA: ', 'prompt_no_input defaults to prompt with {input} empty');
  t.equal(resolveTemplate(tf, 'instruction').name, tf, 'a path resolves to the file');
  t.throws(() => loadTemplateFile(file('t1.json', JSON.stringify({ prompt: '{question}' }))), /t1\.json: field 'prompt': unknown placeholder \{question\}/);
  t.throws(() => loadTemplateFile(file('t2.json', JSON.stringify({ response: '{output}' }))), /t2\.json: field 'prompt' is missing/);
  t.throws(() => loadTemplateFile(file('t3.json', JSON.stringify({ prompt: 'no instruction' }))), /t3\.json: field 'prompt' must contain \{instruction\}/);
  t.throws(() => loadTemplateFile(file('t4.json', JSON.stringify({ prompt: '{instruction}', promt_no_input: 'x' }))), /t4\.json: unknown field 'promt_no_input'/);
  t.throws(() => loadTemplateFile(path.join(dir, 't5.json')), /t5\.json: cannot read the template file/);
});

t.test('label masks, token by token', async (t) => {
  await ready;
  const tok = loadTokenizer(modelDir);
  const tf = file('tiny.json', JSON.stringify({ prompt: 'Q: {instruction}\nA: ', response: '{output}' }));
  const ds = parseDataset(jsonl({ instruction: 'Say hi', output: 'hi there' }), 'one.jsonl');
  const p = tok.encode('Q: Say hi\nA: ');
  const r = tok.encode('hi there');
  const B = tok.bosId!, E = tok.eosId!;
  const want = [B, ...p, ...r, E];
  const masked = tokenizeRecords(tok, ds.records, ds.where, { template: resolveTemplate(tf, 'instruction'), seqLen: 64 });
  t.same(Array.from(masked.examples[0]!.inputIds), want, 'ids = bos, prompt, response, eos');
  t.same(Array.from(masked.examples[0]!.labels), [IGNORE_INDEX, ...p.map(() => IGNORE_INDEX), ...r, E], 'train_on_inputs false: only response + eos');
  t.equal(tok.decode(masked.examples[0]!.inputIds), '<s>Q: Say hi\nA: hi there</s>');
  const all = tokenizeRecords(tok, ds.records, ds.where, { template: resolveTemplate(tf, 'instruction'), seqLen: 64, trainOnInputs: true });
  t.same(Array.from(all.examples[0]!.labels), want, 'train_on_inputs true: labels = input ids');

  // text: everything is a target
  const tx = parseDataset(jsonl({ text: 'plain words' }), 'tx.jsonl');
  const tt = tokenizeRecords(tok, tx.records, tx.where, { template: resolveTemplate(undefined, 'text'), seqLen: 64 });
  t.same(Array.from(tt.examples[0]!.inputIds), [B, ...tok.encode('plain words'), E]);
  t.same(Array.from(tt.examples[0]!.labels), Array.from(tt.examples[0]!.inputIds));

  // chat: only assistant turns (their content and closing eos) are targets
  const ch = parseDataset(jsonl({ messages: [{ role: 'system', content: 'S' }, { role: 'user', content: 'U1' }, { role: 'assistant', content: 'A1' }, { role: 'user', content: 'U2' }, { role: 'assistant', content: 'A2' }] }), 'ch.jsonl');
  const ct = tokenizeRecords(tok, ch.records, ch.where, { template: resolveTemplate(undefined, 'chat'), seqLen: 256 });
  const ex = ct.examples[0]!;
  t.equal(tok.decode(ex.inputIds), '<s><|system|>\nS</s><|user|>\nU1</s><|assistant|>\nA1</s><|user|>\nU2</s><|assistant|>\nA2</s>', 'one bos, eos not doubled');
  const targetText = tok.decode(Array.from(ex.labels).filter((x) => x !== IGNORE_INDEX));
  t.equal(targetText, 'A1</s>A2</s>', 'targets are exactly the assistant contents and their eos');

  // pre-tokenized: as is; labels default to input_ids; ids checked against the vocabulary
  const pt = parseDataset(jsonl({ input_ids: [1, 10, 11, 2], labels: [-100, -100, 11, 2] }, { input_ids: [1, 12, 2] }), 'pt.jsonl');
  const pe = tokenizeRecords(tok, pt.records, pt.where, { template: resolveTemplate(undefined, 'tokenized'), seqLen: 64 });
  t.same(Array.from(pe.examples[0]!.labels), [-100, -100, 11, 2]);
  t.same(Array.from(pe.examples[1]!.labels), [1, 12, 2]);
  const big = parseDataset(jsonl({ input_ids: [1, 600] }), 'big.jsonl');
  t.throws(() => tokenizeRecords(tok, big.records, big.where, { template: { kind: 'none', name: 'none' }, seqLen: 64 }),
    /big\.jsonl:1: field 'input_ids\[1\]' = 600 is outside the vocabulary \(size 512\)/);
});

t.test('truncation keeps the first seq_len tokens; examples left without targets are dropped and counted', async (t) => {
  await ready;
  const tok = loadTokenizer(modelDir);
  const long = 'word '.repeat(50).trim();
  const ds = parseDataset(jsonl(
    { instruction: 'Short', output: 'ok' },
    { instruction: long, output: 'never reached' },
    { instruction: 'Copy', output: long },
  ), 'tr.jsonl');
  const full = tokenizeRecords(tok, ds.records, ds.where, { template: ALPACA, seqLen: 4096 });
  const seqLen = full.examples[0]!.inputIds.length + 8; // fits the first, cuts the others
  const res = tokenizeRecords(tok, ds.records, ds.where, { template: ALPACA, seqLen });
  t.equal(res.truncated, 2, 'two examples were longer than seq_len');
  t.equal(res.dropped, 1, 'the one whose response is past seq_len is dropped');
  t.same(res.where, ['tr.jsonl:1', 'tr.jsonl:3']);
  t.match(res.warnings.join('\n'), /1 example\(s\) had no target tokens within seq_len \d+ and were dropped \(first: tr\.jsonl:2\)/);
  const cut = res.examples[1]!;
  t.equal(cut.inputIds.length, seqLen);
  t.same(Array.from(cut.inputIds), Array.from(full.examples[2]!.inputIds.subarray(0, seqLen)), 'the first seq_len tokens are kept');
  t.ok(countTargets(cut.labels) > 0);
});

t.test('chat data with a tokenizer that has no chat template: clear error', async (t) => {
  const d = path.join(dir, 'nochat');
  await writeTokenizerFiles(d, { vocabSize: 300, corpus: ['abc'], chatTemplate: null });
  const tok = loadTokenizer(d);
  const ch = parseDataset(jsonl({ messages: [{ role: 'user', content: 'U' }, { role: 'assistant', content: 'A' }] }), 'ch.jsonl');
  t.throws(() => tokenizeRecords(tok, ch.records, ch.where, { template: resolveTemplate(undefined, 'chat'), seqLen: 64 }),
    /nochat\/tokenizer_config\.json: the tokenizer has no chat_template, so chat \(messages\) data cannot be rendered/);
});

t.test('the shipped demo datasets parse and tokenize', async (t) => {
  await ready;
  const tok = loadTokenizer(modelDir);
  const root = path.resolve(import.meta.dirname, '..', '..', '..');
  for (const [name, format] of [['capitals', 'instruction'], ['arithmetic', 'instruction'], ['reverse', 'instruction'], ['sentiment', 'chat']]) {
    const ds = readDataset(path.join(root, 'data', 'demo', `${name}.jsonl`));
    t.equal(ds.format, format, `${name}: ${format}`);
    t.ok(ds.records.length >= 200 && ds.records.length <= 600, `${name}: ${ds.records.length} records`);
    const res = tokenizeRecords(tok, ds.records, ds.where, { template: resolveTemplate(undefined, ds.format), seqLen: 256 });
    t.equal(res.dropped, 0);
    t.equal(res.truncated, 0);
  }
});

t.test('the committed demo files are exactly what the generator writes', async (t) => {
  const { demoDatasets } = await import('../../lib/data/demo.js');
  const { readFileSync } = await import('node:fs');
  const root = path.resolve(import.meta.dirname, '..', '..', '..');
  for (const [name, records] of Object.entries(demoDatasets())) {
    const want = records.map((r) => JSON.stringify(r)).join('\n') + '\n';
    t.equal(readFileSync(path.join(root, 'data', 'demo', `${name}.jsonl`), 'utf8'), want, `${name}.jsonl is reproducible`);
  }
});

t.test('BOS follows the tokenizer: add_bos_token false means none is prepended', async (t) => {
  const d = path.join(dir, 'nobos');
  await writeTokenizerFiles(d, { vocabSize: 300, corpus: ['abc'] });
  const { readFileSync } = await import('node:fs');
  const cfgFile = path.join(d, 'tokenizer_config.json');
  const cfg = JSON.parse(readFileSync(cfgFile, 'utf8'));
  writeFileSync(cfgFile, JSON.stringify({ ...cfg, add_bos_token: false }));
  const tok = loadTokenizer(d, { fresh: true });
  t.equal(tok.bosId, 1);
  t.equal(tok.addBos, false);
  const ds = parseDataset(jsonl({ text: 'abc' }), 'x.jsonl');
  const ex = tokenizeRecords(tok, ds.records, ds.where, { template: resolveTemplate(undefined, 'text'), seqLen: 16 }).examples[0]!;
  t.same(Array.from(ex.inputIds), [...tok.encode('abc'), tok.eosId]);
  await ready;
  t.equal(loadTokenizer(modelDir).addBos, true, "mlora's own tokenizer adds BOS (its post-processor does)");
});

t.test('a chat template that emits bos_token itself and closes turns with its own marker', async (t) => {
  const d = path.join(dir, 'tpl2');
  const tpl =
    "{{ bos_token }}{% for m in messages %}{{ '[' + m['role'] + ']: ' + m['content'] + ' [end]\\n' }}{% endfor %}" +
    "{% if add_generation_prompt %}{{ '[assistant]: ' }}{% endif %}";
  await writeTokenizerFiles(d, { vocabSize: 300, corpus: ['abc'], chatTemplate: tpl });
  const tok = loadTokenizer(d, { fresh: true });
  const ch = parseDataset(jsonl({ messages: [{ role: 'user', content: 'Q' }, { role: 'assistant', content: 'A' }] }), 'c.jsonl');
  const ex = tokenizeRecords(tok, ch.records, ch.where, { template: resolveTemplate(undefined, 'chat'), seqLen: 128 }).examples[0]!;
  t.equal(tok.decode(ex.inputIds), '<s>[user]: Q [end]\n[assistant]: A [end]\n</s>', 'one BOS (from the template), EOS appended after the last response');
  t.equal(ex.inputIds.filter((x) => x === tok.bosId).length, 1);
  t.equal(tok.decode(Array.from(ex.labels).filter((x) => x !== IGNORE_INDEX)), 'A [end]\n</s>', 'targets: the assistant turn as rendered, then EOS');
});
