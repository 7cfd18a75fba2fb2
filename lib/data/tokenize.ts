// Records -> training examples {inputIds, labels} (HF causal-LM conventions: labels aligned
// with inputIds, -100 = not a target; the model predicts labels[i] from position i-1).
//
// - BOS is prepended when the tokenizer adds one (Tokenizer.addBos; not twice when the
//   rendered chat already starts with it); EOS is appended after the response (unless the chat template already closed
//   the last assistant turn with it). Pre-tokenized records are taken as they are.
// - train_on_inputs false: the prompt (and BOS) get -100, the response and EOS are targets;
//   true: labels = inputIds. Text records: every token is a target.
// - Prompt and response are tokenized separately, so the label boundary is exact.
// - Truncation keeps the first seqLen tokens; an example left with no target token (none at
//   position ≥ 1) is dropped and counted.
import type { DataRecord, ChatRecord } from './dataset.js';
import type { ResolvedTemplate } from './templates.js';
import { renderInstruction } from './templates.js';
import type { Tokenizer } from './tokenizer.js';

export const IGNORE_INDEX = -100;

export interface TokenizedExample {
  inputIds: Int32Array;
  labels: Int32Array;
}

export interface TokenizeOptions {
  template: ResolvedTemplate;
  seqLen: number;
  trainOnInputs?: boolean;
}

export interface TokenizedDataset {
  examples: TokenizedExample[];
  /** Source place (`file:line`) of each kept example. */
  where: string[];
  /** Examples left without target tokens after truncation (removed). */
  dropped: number;
  /** Examples cut to seqLen. */
  truncated: number;
  /** Human-readable warnings (counts, the first few dropped places). */
  warnings: string[];
}

/** Number of positions that are predicted: labels[i] ≠ -100 for i ≥ 1. */
export function countTargets(labels: ArrayLike<number>): number {
  let n = 0;
  for (let i = 1; i < labels.length; i++) if (labels[i] !== IGNORE_INDEX) n++;
  return n;
}

interface Segment {
  ids: number[];
  target: boolean;
}

function chatSegments(tok: Tokenizer, r: ChatRecord, where: string): Segment[] {
  const segs: Array<{ text: string; target: boolean }> = [];
  let prev = '';
  const unstable = () =>
    new Error(`${where}: the chat template is not prefix-stable (rendering more messages changed earlier text), so prompt and response tokens cannot be told apart`);
  for (let i = 0; i < r.messages.length; i++) {
    const m = r.messages[i]!;
    if (m.role === 'assistant') {
      const withGen = tok.applyChatTemplate(r.messages.slice(0, i), { addGenerationPrompt: true });
      if (!withGen.startsWith(prev)) throw unstable();
      segs.push({ text: withGen.slice(prev.length), target: false });
      prev = withGen;
    }
    const full = tok.applyChatTemplate(r.messages.slice(0, i + 1));
    if (!full.startsWith(prev)) throw unstable();
    segs.push({ text: full.slice(prev.length), target: m.role === 'assistant' });
    prev = full;
  }
  return segs.map((s) => ({ ids: tok.encode(s.text), target: s.target }));
}

/** One record -> one example (before truncation). */
export function tokenizeRecord(tok: Tokenizer, r: DataRecord, opts: TokenizeOptions, where = 'record'): TokenizedExample {
  const t = opts.template;
  if (r.kind === 'tokenized') {
    for (let i = 0; i < r.inputIds.length; i++)
      if (r.inputIds[i]! >= tok.vocabSize)
        throw new Error(`${where}: field 'input_ids[${i}]' = ${r.inputIds[i]} is outside the vocabulary (size ${tok.vocabSize})`);
    const labels = r.labels ?? r.inputIds;
    for (let i = 0; i < labels.length; i++)
      if (labels[i]! >= tok.vocabSize)
        throw new Error(`${where}: field 'labels[${i}]' = ${labels[i]} is outside the vocabulary (size ${tok.vocabSize})`);
    return { inputIds: Int32Array.from(r.inputIds), labels: Int32Array.from(labels) };
  }
  let segs: Segment[];
  if (r.kind === 'instruction') {
    if (t.kind !== 'prompt') throw new Error(`${where}: template '${t.name}' cannot render instruction data`);
    const { prompt, response } = renderInstruction(t, r);
    segs = [{ ids: tok.encode(prompt), target: false }, { ids: tok.encode(response), target: true }];
  } else if (r.kind === 'text') {
    if (t.kind !== 'plain') throw new Error(`${where}: template '${t.name}' cannot render text data`);
    segs = [{ ids: tok.encode(r.text), target: true }];
  } else {
    if (t.kind !== 'chat') throw new Error(`${where}: template '${t.name}' cannot render chat data`);
    segs = chatSegments(tok, r, where);
  }
  const ids: number[] = [];
  const labels: number[] = [];
  const first = segs.find((s) => s.ids.length > 0);
  if (tok.addBos && tok.bosId !== undefined && !(first && first.ids[0] === tok.bosId)) {
    ids.push(tok.bosId);
    labels.push(r.kind === 'text' || opts.trainOnInputs ? tok.bosId : IGNORE_INDEX);
  }
  for (const s of segs)
    for (const id of s.ids) {
      ids.push(id);
      labels.push(s.target || r.kind === 'text' || opts.trainOnInputs ? id : IGNORE_INDEX);
    }
  if (tok.eosId !== undefined) {
    let lastTarget = -1;
    segs.forEach((s, i) => (s.target ? (lastTarget = i) : undefined));
    const closed = lastTarget >= 0 && segs[lastTarget]!.ids.includes(tok.eosId);
    if (!closed) {
      ids.push(tok.eosId);
      labels.push(tok.eosId);
    }
  }
  return { inputIds: Int32Array.from(ids), labels: Int32Array.from(labels) };
}

/** A tokenized chunk, as a worker returns it (flat arrays: cheap to pass between threads). */
export interface TokenizedChunk {
  ids: Int32Array;
  labels: Int32Array;
  /** lengths of the kept examples, in order */
  lengths: Int32Array;
  where: string[];
  dropped: number;
  truncated: number;
  /** the first few places of dropped examples */
  droppedAt: string[];
}

export function tokenizeChunk(tok: Tokenizer, records: DataRecord[], where: string[], opts: TokenizeOptions): TokenizedChunk {
  if (!Number.isInteger(opts.seqLen) || opts.seqLen < 2) throw new Error(`seq_len must be an integer ≥ 2, got ${opts.seqLen}`);
  const kept: TokenizedExample[] = [];
  const keptWhere: string[] = [];
  const droppedAt: string[] = [];
  let dropped = 0;
  let truncated = 0;
  for (let i = 0; i < records.length; i++) {
    const w = where[i] ?? `record ${i}`;
    let ex = tokenizeRecord(tok, records[i]!, opts, w);
    if (ex.inputIds.length > opts.seqLen) {
      ex = { inputIds: ex.inputIds.subarray(0, opts.seqLen), labels: ex.labels.subarray(0, opts.seqLen) };
      truncated++;
    }
    if (countTargets(ex.labels) === 0) {
      dropped++;
      if (droppedAt.length < 5) droppedAt.push(w);
      continue;
    }
    kept.push(ex);
    keptWhere.push(w);
  }
  let total = 0;
  for (const e of kept) total += e.inputIds.length;
  const ids = new Int32Array(total);
  const labels = new Int32Array(total);
  const lengths = new Int32Array(kept.length);
  let o = 0;
  kept.forEach((e, i) => {
    ids.set(e.inputIds, o);
    labels.set(e.labels, o);
    lengths[i] = e.inputIds.length;
    o += e.inputIds.length;
  });
  return { ids, labels, lengths, where: keptWhere, dropped, truncated, droppedAt };
}

/** Joins chunks (in order) into a dataset; examples are views into one buffer per chunk. */
export function joinChunks(chunks: TokenizedChunk[], seqLen: number): TokenizedDataset {
  const out: TokenizedDataset = { examples: [], where: [], dropped: 0, truncated: 0, warnings: [] };
  const droppedAt: string[] = [];
  for (const c of chunks) {
    let o = 0;
    for (let i = 0; i < c.lengths.length; i++) {
      const n = c.lengths[i]!;
      out.examples.push({ inputIds: c.ids.subarray(o, o + n), labels: c.labels.subarray(o, o + n) });
      o += n;
    }
    out.where.push(...c.where);
    out.dropped += c.dropped;
    out.truncated += c.truncated;
    for (const w of c.droppedAt) if (droppedAt.length < 5) droppedAt.push(w);
  }
  finishWarnings(out, droppedAt, seqLen);
  return out;
}

/** Tokenizes records in order (inline, on this thread), truncating and dropping as documented above. */
export function tokenizeRecords(tok: Tokenizer, records: DataRecord[], where: string[], opts: TokenizeOptions): TokenizedDataset {
  return joinChunks([tokenizeChunk(tok, records, where, opts)], opts.seqLen);
}

export function finishWarnings(out: TokenizedDataset, droppedAt: string[], seqLen: number): void {
  if (out.truncated > 0) out.warnings.push(`${out.truncated} example(s) longer than seq_len ${seqLen} were truncated`);
  if (out.dropped > 0)
    out.warnings.push(
      `${out.dropped} example(s) had no target tokens within seq_len ${seqLen} and were dropped (first: ${droppedAt.join(', ')})`,
    );
}
