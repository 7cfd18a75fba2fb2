// Datasets: JSON (an array of records) or JSONL (one record a line), in one of four formats
// (DESIGN §6, the Hugging Face conventions):
//   instruction  {instruction, input?, output}              alpaca-style
//   chat         {messages: [{role: system|user|assistant, content}]}
//   text         {text}                                     plain text, every token a target
//   tokenized    {input_ids, labels?}                       labels aligned with input_ids,
//                                                           -100 = ignored, default = input_ids
// The format is detected from the first record (or given). A bad record is an Error naming
// the file, the place and the field:  data/a.jsonl:17: field 'output' must be a string
// (JSONL: 1-based line number; JSON array: `data/a.json[16]`, the 0-based array index). With
// `skipBad` bad records are skipped and counted instead. Unknown extra fields are ignored.
import { readFileSync } from 'node:fs';

export const DATA_FORMATS = ['instruction', 'chat', 'text', 'tokenized'] as const;
export type DataFormat = (typeof DATA_FORMATS)[number];
export const CHAT_ROLES = ['system', 'user', 'assistant'] as const;

export interface InstructionRecord {
  kind: 'instruction';
  instruction: string;
  input?: string;
  output: string;
}
export interface ChatRecord {
  kind: 'chat';
  messages: Array<{ role: (typeof CHAT_ROLES)[number]; content: string }>;
}
export interface TextRecord {
  kind: 'text';
  text: string;
}
export interface TokenizedRecord {
  kind: 'tokenized';
  inputIds: number[];
  labels?: number[];
}
export type DataRecord = InstructionRecord | ChatRecord | TextRecord | TokenizedRecord;

export interface Dataset {
  file: string;
  format: DataFormat;
  records: DataRecord[];
  /** Where each record came from, `file:line` or `file[index]`, for later error messages. */
  where: string[];
  /** Bad records skipped (skipBad), with the first few messages. */
  skipped: number;
  skippedMessages: string[];
}

export interface ReadDatasetOptions {
  /** Force a format instead of detecting it from the first record. */
  format?: DataFormat | string;
  /** Skip (and count) bad records instead of failing on the first. */
  skipBad?: boolean;
}

/** An error about one record: message `${where}: ${detail}`. */
export class DataRecordError extends Error {
  constructor(readonly where: string, readonly detail: string) {
    super(`${where}: ${detail}`);
    this.name = 'DataRecordError';
  }
}

function typeName(v: unknown): string {
  if (v === null) return 'null';
  if (Array.isArray(v)) return 'an array';
  return typeof v === 'object' ? 'an object' : `a ${typeof v}`;
}

/** Which format a raw record looks like, or undefined. */
export function detectFormat(rec: unknown): DataFormat | undefined {
  if (!rec || typeof rec !== 'object' || Array.isArray(rec)) return undefined;
  const r = rec as Record<string, unknown>;
  if ('messages' in r) return 'chat';
  if ('input_ids' in r) return 'tokenized';
  if ('instruction' in r || 'output' in r) return 'instruction';
  if ('text' in r) return 'text';
  return undefined;
}

function str(r: Record<string, unknown>, field: string, optional = false): string | undefined {
  const v = r[field];
  if (v === undefined || (optional && v === null)) {
    if (optional) return undefined;
    throw new Error(`field '${field}' is missing`);
  }
  if (typeof v !== 'string') throw new Error(`field '${field}' must be a string, got ${typeName(v)}`);
  return v;
}

function intArray(r: Record<string, unknown>, field: string, allowIgnore: boolean): number[] {
  const v = r[field];
  if (!Array.isArray(v)) throw new Error(`field '${field}' must be an array of integers, got ${typeName(v)}`);
  for (let i = 0; i < v.length; i++) {
    const x = v[i];
    if (typeof x !== 'number' || !Number.isInteger(x) || (x < 0 && !(allowIgnore && x === -100)))
      throw new Error(`field '${field}[${i}]' must be a non-negative integer${allowIgnore ? ' or -100' : ''}, got ${JSON.stringify(x)}`);
  }
  return v as number[];
}

/** Validates one raw record as `format`; throws a plain Error whose message names the field. */
export function parseRecord(raw: unknown, format: DataFormat): DataRecord {
  if (!raw || typeof raw !== 'object' || Array.isArray(raw)) throw new Error(`record must be a JSON object, got ${typeName(raw)}`);
  const r = raw as Record<string, unknown>;
  switch (format) {
    case 'instruction': {
      const instruction = str(r, 'instruction')!;
      const input = str(r, 'input', true);
      const output = str(r, 'output')!;
      return input ? { kind: 'instruction', instruction, input, output } : { kind: 'instruction', instruction, output };
    }
    case 'chat': {
      const m = r.messages;
      if (m === undefined) throw new Error(`field 'messages' is missing`);
      if (!Array.isArray(m)) throw new Error(`field 'messages' must be an array of {role, content}, got ${typeName(m)}`);
      if (m.length === 0) throw new Error(`field 'messages' must not be empty`);
      const messages: ChatRecord['messages'] = [];
      m.forEach((x: unknown, i) => {
        if (!x || typeof x !== 'object' || Array.isArray(x)) throw new Error(`field 'messages[${i}]' must be an object {role, content}, got ${typeName(x)}`);
        const e = x as Record<string, unknown>;
        if (e.role === undefined) throw new Error(`field 'messages[${i}].role' is missing`);
        if (e.content === undefined) throw new Error(`field 'messages[${i}].content' is missing`);
        if (typeof e.role !== 'string' || !(CHAT_ROLES as readonly string[]).includes(e.role))
          throw new Error(`field 'messages[${i}].role' must be one of ${CHAT_ROLES.join(', ')}, got ${JSON.stringify(e.role)}`);
        if (typeof e.content !== 'string') throw new Error(`field 'messages[${i}].content' must be a string, got ${typeName(e.content)}`);
        messages.push({ role: e.role as ChatRecord['messages'][number]['role'], content: e.content });
      });
      if (!messages.some((x) => x.role === 'assistant')) throw new Error(`field 'messages' has no assistant message (nothing to learn)`);
      return { kind: 'chat', messages };
    }
    case 'text':
      return { kind: 'text', text: str(r, 'text')! };
    case 'tokenized': {
      if (r.input_ids === undefined) throw new Error(`field 'input_ids' is missing`);
      const inputIds = intArray(r, 'input_ids', false);
      if (r.labels === undefined || r.labels === null) return { kind: 'tokenized', inputIds };
      const labels = intArray(r, 'labels', true);
      if (labels.length !== inputIds.length)
        throw new Error(`field 'labels' must have the length of 'input_ids' (${inputIds.length}), got ${labels.length}`);
      return { kind: 'tokenized', inputIds, labels };
    }
  }
}

function checkFormat(f: string, file: string): DataFormat {
  if ((DATA_FORMATS as readonly string[]).includes(f)) return f as DataFormat;
  throw new Error(`${file}: unknown data format '${f}' (allowed: ${DATA_FORMATS.join(', ')})`);
}

/** Parses a dataset's text. `file` is used for messages only. */
export function parseDataset(text: string, file: string, options: ReadDatasetOptions = {}): Dataset {
  let format = options.format !== undefined ? checkFormat(options.format, file) : undefined;
  const skipBad = options.skipBad ?? false;
  // Raw entries: [where, value | parse error]
  const raws: Array<{ where: string; value?: unknown; error?: string }> = [];
  const body = text.replace(/^\uFEFF/, '');
  const trimmed = body.trimStart();
  if (trimmed.startsWith('[')) {
    let arr: unknown;
    try {
      arr = JSON.parse(body);
    } catch (e) {
      throw new Error(`${file}: invalid JSON: ${(e as Error).message}`);
    }
    if (!Array.isArray(arr)) throw new Error(`${file}: a JSON dataset must be an array of records`);
    arr.forEach((value, i) => raws.push({ where: `${file}[${i}]`, value }));
  } else {
    if (file.endsWith('.json') && trimmed.startsWith('{')) {
      // A .json file holding one object that spans lines is a mistake, not JSONL.
      let whole: unknown;
      try {
        whole = JSON.parse(body);
      } catch {
        whole = undefined;
      }
      if (whole !== undefined && body.trim().includes('\n'))
        throw new Error(`${file}: a JSON dataset must be an array of records (or use JSONL: one record a line)`);
    }
    parseLines();
  }
  function parseLines() {
    const lines = body.split('\n');
    for (let i = 0; i < lines.length; i++) {
      const line = lines[i]!.trim();
      if (line === '') continue;
      const where = `${file}:${i + 1}`;
      try {
        raws.push({ where, value: JSON.parse(line) });
      } catch (e) {
        raws.push({ where, error: `invalid JSON: ${(e as Error).message}` });
      }
    }
  }
  if (raws.length === 0) throw new Error(`${file}: empty dataset (no records)`);

  const ds: Dataset = { file, format: format ?? 'text', records: [], where: [], skipped: 0, skippedMessages: [] };
  const bad = (where: string, detail: string) => {
    if (!skipBad) throw new DataRecordError(where, detail);
    ds.skipped++;
    if (ds.skippedMessages.length < 20) ds.skippedMessages.push(`${where}: ${detail}`);
  };
  for (const raw of raws) {
    if (raw.error !== undefined) {
      bad(raw.where, raw.error);
      continue;
    }
    if (format === undefined) {
      format = detectFormat(raw.value);
      if (format === undefined) {
        const keys = raw.value && typeof raw.value === 'object' && !Array.isArray(raw.value) ? Object.keys(raw.value) : [];
        throw new Error(
          `${raw.where}: unknown data format: the first record has ${keys.length ? `fields ${keys.map((k) => `'${k}'`).join(', ')}` : typeName(raw.value)}; ` +
            `expected 'instruction'+'output' (instruction), 'messages' (chat), 'text' (text) or 'input_ids' (tokenized)`,
        );
      }
      ds.format = format;
    }
    try {
      ds.records.push(parseRecord(raw.value, format));
      ds.where.push(raw.where);
    } catch (e) {
      bad(raw.where, (e as Error).message);
    }
  }
  if (ds.records.length === 0) throw new Error(`${file}: no valid records (${ds.skipped} skipped; first: ${ds.skippedMessages[0] ?? '-'})`);
  return ds;
}

/** Reads a JSON / JSONL dataset file. Errors name the file (and line and field). */
export function readDataset(file: string, options: ReadDatasetOptions = {}): Dataset {
  let text: string;
  try {
    text = readFileSync(file, 'utf8');
  } catch (e) {
    throw new Error(`${file}: cannot read the dataset: ${(e as Error).message}`);
  }
  return parseDataset(text, file, options);
}
