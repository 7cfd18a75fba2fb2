// mlora eval --model DIR [--adapter DIR] --data FILE [--seq-len N] [--batch-tokens N] [--json] [--no-progress]
// Mean loss, perplexity and token count of a model (optionally with a PEFT adapter) over a
// dataset: pre-tokenized JSONL ({"input_ids": [...], "labels": [...]}; no tokenizer needed) or
// text / instruction / chat data, tokenized with the model's tokenizer. A long file (ten
// batches or more) reports its progress on stderr: redrawn in place on a terminal, else a line
// at every tenth of the batches.
import { badNumber, numberOption, parseCommandArgs, usageError, type Command } from './args.js';
import { readDataset, type TokenizedRecord } from '../../lib/data/dataset.js';
import { tokenizeDataset } from '../../lib/data/pool.js';
import { batchOnDevice, freeBatch, openSingleModel, packSequences } from '../../lib/model/single.js';

const USAGE =
  'usage: mlora eval --model DIR [--adapter DIR] --data FILE [--seq-len N] [--batch-tokens N] [--template NAME] [--threads N] [--json] [--no-progress]';

/** How far an evaluation is: batches and examples done of all, target tokens so far. */
export interface EvalProgress {
  batch: number;
  batches: number;
  examples: number;
  totalExamples: number;
  tokens: number;
}

export async function evaluateDataset(o: {
  model: string;
  adapter?: string;
  data: string;
  seqLen: number;
  batchTokens: number;
  template?: string;
  threads?: number;
  onProgress?: (p: EvalProgress) => void;
}) {
  const ds = readDataset(o.data);
  let examples: Array<{ inputIds: Int32Array; labels: Int32Array }>;
  if (ds.format === 'tokenized') {
    // readDataset has checked the record (integer arrays, labels as long as input_ids)
    examples = ds.records.map((r) => {
      const rec = r as TokenizedRecord;
      const ids = rec.inputIds.slice(0, o.seqLen);
      const labels = (rec.labels ?? rec.inputIds).slice(0, o.seqLen);
      return { inputIds: Int32Array.from(ids), labels: Int32Array.from(labels) };
    });
  } else {
    examples = (
      await tokenizeDataset(ds, {
        modelDir: o.model,
        seqLen: o.seqLen,
        ...(o.template ? { template: o.template } : {}),
      })
    ).examples;
  }
  const m = await openSingleModel(o.model, o.adapter, { threads: o.threads ?? 1 });
  try {
    const V = m.config.vocabSize;
    // examples[i] is record i only for tokenized data (tokenizing may drop records)
    const where = ds.format === 'tokenized' ? ds.where : [];
    examples.forEach((e, i) => {
      for (const id of e.inputIds)
        if (id < 0 || id >= V)
          throw new Error(`${where[i] ?? o.data}: token id ${id} is out of range for vocab_size ${V}`);
      for (const id of e.labels)
        if (id !== -100 && (id < 0 || id >= V))
          throw new Error(
            `${where[i] ?? o.data}: label ${id} is out of range for vocab_size ${V} (use -100 to ignore a position)`,
          );
    });
    // the batches, planned first so progress knows the whole
    const groups: Array<typeof examples> = [];
    for (let i = 0; i < examples.length;) {
      const group: typeof examples = [];
      let n = 0;
      while (i < examples.length && (group.length === 0 || n + examples[i]!.inputIds.length <= o.batchTokens)) {
        n += examples[i]!.inputIds.length;
        group.push(examples[i++]!);
      }
      groups.push(group);
    }
    let sum = 0,
      count = 0,
      id = 1,
      done = 0;
    for (const group of groups) {
      const packed = packSequences(group);
      const b = batchOnDevice(m, packed, id++);
      try {
        const losses = (await m.program.evaluate(b.mb, b.tokens))!;
        for (let r = 0; r < losses.length; r++)
          if (packed.targets[r] !== -100) {
            sum += losses[r]!;
            count++;
          }
      } finally {
        freeBatch(b);
      }
      done += group.length;
      o.onProgress?.({
        batch: id - 1,
        batches: groups.length,
        examples: done,
        totalExamples: examples.length,
        tokens: count,
      });
    }
    const loss = sum / Math.max(1, count);
    return { loss, perplexity: Math.exp(loss), tokens: count, examples: examples.length };
  } finally {
    m.free();
  }
}

const CMD: Command = { name: 'eval', usage: USAGE };

export async function main(argv: string[]): Promise<number> {
  const a = parseCommandArgs(CMD, argv, {
    model: { type: 'string' },
    adapter: { type: 'string' },
    data: { type: 'string' },
    'seq-len': { type: 'string' },
    'batch-tokens': { type: 'string' },
    template: { type: 'string' },
    threads: { type: 'string' },
    json: { type: 'boolean' },
    'no-progress': { type: 'boolean' },
  });
  if (typeof a === 'number') return a;
  if (!a.values.model || !a.values.data) return usageError(CMD, '--model and --data are required');
  const ints: Record<string, number> = {};
  for (const [k, def] of [
    ['seq-len', 512],
    ['batch-tokens', 4096],
    ['threads', 1],
  ] as const) {
    const n = numberOption(a.values[k], def, 'positive integer');
    if (n === undefined) return badNumber(CMD, k, a.values[k], 'positive integer');
    ints[k] = n;
  }
  const tty = !!process.stderr.isTTY && process.env.TERM !== 'dumb';
  const t0 = performance.now();
  let shown = 0;
  const onProgress = (p: EvalProgress) => {
    if (p.batches < 10) return; // short files: the result is all there is to say
    const tenth = Math.floor((10 * p.batch) / p.batches);
    if (!tty && tenth === shown) return;
    shown = tenth;
    const line = `eval ${a.values.data}: ${Math.floor((100 * p.batch) / p.batches)}% (batch ${p.batch}/${p.batches}, ${p.examples}/${p.totalExamples} examples, ${p.tokens} tokens, ${((performance.now() - t0) / 1000).toFixed(1)} s)`;
    if (tty) process.stderr.write(`\r\x1b[K${line}${p.batch === p.batches ? '\n' : ''}`);
    else console.error(line);
  };
  const r = await evaluateDataset({
    model: a.values.model,
    data: a.values.data,
    seqLen: ints['seq-len']!,
    batchTokens: ints['batch-tokens']!,
    threads: ints.threads!,
    ...(a.values['no-progress'] ? {} : { onProgress }),
    ...(a.values.adapter ? { adapter: a.values.adapter } : {}),
    ...(a.values.template ? { template: a.values.template } : {}),
  });
  if (a.values.json) console.log(JSON.stringify(r));
  else
    console.log(
      `loss ${r.loss.toFixed(4)}  perplexity ${r.perplexity.toFixed(3)}  tokens ${r.tokens}  examples ${r.examples}`,
    );
  return 0;
}
