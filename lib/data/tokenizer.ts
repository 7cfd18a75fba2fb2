// Tokenizers: load a Hugging Face model directory's tokenizer.json + tokenizer_config.json
// (with @huggingface/tokenizers, a pure-JS implementation, and @huggingface/jinja for the
// chat template), and write a real byte-level BPE tokenizer for the models mlora makes
// itself (`mlora make-model`), with merges learned deterministically from a corpus.
//
// The files written here are ordinary HF files: `tokenizers.Tokenizer.from_file()` and
// `AutoTokenizer.from_pretrained()` load them unchanged.
import { existsSync, mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import { Tokenizer as HfTokenizer } from '@huggingface/tokenizers';
import { Template } from '@huggingface/jinja';

export type ChatRole = 'system' | 'user' | 'assistant';
export interface ChatMessage {
  role: ChatRole | string;
  content: string;
}

export interface EncodeOptions {
  /** Apply the tokenizer's post-processor (e.g. prepend BOS, as LLaMA does). Default false:
   *  mlora's data pipeline adds BOS/EOS itself. */
  addSpecialTokens?: boolean;
}

export interface Tokenizer {
  /** Number of ids (max id + 1, added tokens included); the model's vocab_size must be ≥ this. */
  readonly vocabSize: number;
  readonly bosId?: number;
  readonly eosId?: number;
  readonly padId?: number;
  readonly bosToken?: string;
  readonly eosToken?: string;
  /** Whether sequences start with BOS: tokenizer_config.json add_bos_token when given, else
   *  whether the tokenizer's own post-processor adds it (LLaMA, Mistral: yes; Qwen, GPT-2: no),
   *  i.e. what `tokenizer(text)` does in transformers. False when there is no BOS. */
  readonly addBos: boolean;
  /** Where the tokenizer came from (the model directory), for error messages. */
  readonly source: string;
  readonly hasChatTemplate: boolean;
  encode(text: string, options?: EncodeOptions): number[];
  /** Decodes ids to text; special tokens are kept unless skipSpecialTokens. decode([]) = ''. */
  decode(ids: ArrayLike<number>, options?: { skipSpecialTokens?: boolean }): string;
  /** Renders messages with the tokenizer_config.json chat_template (throws when there is none). */
  applyChatTemplate(messages: ChatMessage[], options?: { addGenerationPrompt?: boolean }): string;
  tokenToId(token: string): number | undefined;
  idToToken(id: number): string | undefined;
}

function readJson(file: string, what: string): unknown {
  let text: string;
  try {
    text = readFileSync(file, 'utf8');
  } catch (e) {
    throw new Error(`${file}: cannot read the ${what}: ${(e as Error).message}`);
  }
  try {
    return JSON.parse(text);
  } catch (e) {
    throw new Error(`${file}: invalid JSON: ${(e as Error).message}`);
  }
}

/** tokenizer_config.json spells special tokens as a string or as an AddedToken dict. */
function tokenString(v: unknown): string | undefined {
  if (typeof v === 'string') return v;
  if (v && typeof v === 'object' && typeof (v as { content?: unknown }).content === 'string') return (v as { content: string }).content;
  return undefined;
}

function pickChatTemplate(v: unknown, file: string): string | undefined {
  if (v === undefined || v === null) return undefined;
  if (typeof v === 'string') return v;
  if (Array.isArray(v)) {
    // [{name, template}, ...]: the "default" one, as transformers does.
    const named = v as Array<{ name?: unknown; template?: unknown }>;
    const d = named.find((x) => x && x.name === 'default') ?? named[0];
    if (d && typeof d.template === 'string') return d.template;
  }
  throw new Error(`${file}: field 'chat_template' must be a string or a list of {name, template}`);
}

class HfBackedTokenizer implements Tokenizer {
  readonly vocabSize: number;
  readonly bosId?: number;
  readonly eosId?: number;
  readonly padId?: number;
  readonly bosToken?: string;
  readonly eosToken?: string;
  readonly addBos: boolean;
  readonly hasChatTemplate: boolean;
  private readonly template?: Template;
  private readonly specialTokenStrings: Record<string, string>;

  constructor(
    private readonly tok: HfTokenizer,
    readonly source: string,
    private readonly configFile: string,
    config: Record<string, unknown>,
    modelConfig: Record<string, unknown> | undefined,
  ) {
    let maxId = -1;
    for (const id of tok.get_vocab(true).values()) if (id > maxId) maxId = id;
    this.vocabSize = maxId + 1;
    const idOf = (key: string, fallbackKey: string): [number | undefined, string | undefined] => {
      if (key in config && config[key] === null) return [undefined, undefined]; // explicitly none
      const s = tokenString(config[key]);
      if (s !== undefined) {
        const id = tok.token_to_id(s);
        if (id !== undefined) return [id, s];
      }
      let fid = modelConfig?.[fallbackKey];
      if (Array.isArray(fid)) fid = fid[0];
      if (typeof fid === 'number' && Number.isInteger(fid) && fid >= 0 && fid < this.vocabSize) return [fid, tok.id_to_token(fid)];
      return [undefined, undefined];
    };
    [this.bosId, this.bosToken] = idOf('bos_token', 'bos_token_id');
    [this.eosId, this.eosToken] = idOf('eos_token', 'eos_token_id');
    [this.padId] = idOf('pad_token', 'pad_token_id');
    if (this.bosId === undefined) this.addBos = false;
    else if (typeof config.add_bos_token === 'boolean') this.addBos = config.add_bos_token;
    else this.addBos = tok.encode('a', { add_special_tokens: true }).ids[0] === this.bosId;
    const tpl = pickChatTemplate(config.chat_template, configFile);
    this.hasChatTemplate = tpl !== undefined;
    if (tpl !== undefined) {
      try {
        this.template = new Template(tpl);
      } catch (e) {
        throw new Error(`${configFile}: chat_template does not parse: ${(e as Error).message}`);
      }
    }
    this.specialTokenStrings = {};
    for (const k of ['bos_token', 'eos_token', 'pad_token', 'unk_token']) {
      const s = tokenString(config[k]);
      if (s !== undefined) this.specialTokenStrings[k] = s;
    }
  }

  encode(text: string, options: EncodeOptions = {}): number[] {
    if (text.length === 0 && !options.addSpecialTokens) return [];
    return this.tok.encode(text, { add_special_tokens: options.addSpecialTokens ?? false }).ids;
  }

  decode(ids: ArrayLike<number>, options: { skipSpecialTokens?: boolean } = {}): string {
    if (ids.length === 0) return '';
    const arr = Array.from(ids);
    for (const id of arr)
      if (!Number.isInteger(id) || id < 0 || id >= this.vocabSize)
        throw new Error(`${this.source}: cannot decode id ${id}: outside the vocabulary (size ${this.vocabSize})`);
    // clean_up_tokenization_spaces would not round-trip (" ." -> "."); off unless the config asks.
    return this.tok.decode(arr, { skip_special_tokens: options.skipSpecialTokens ?? false });
  }

  applyChatTemplate(messages: ChatMessage[], options: { addGenerationPrompt?: boolean } = {}): string {
    if (!this.template)
      throw new Error(
        `${this.configFile}: the tokenizer has no chat_template, so chat (messages) data cannot be rendered; ` +
          `add a chat_template to tokenizer_config.json or convert the data to instruction/text format`,
      );
    try {
      return this.template.render({
        messages,
        add_generation_prompt: options.addGenerationPrompt ?? false,
        ...this.specialTokenStrings,
      });
    } catch (e) {
      throw new Error(`${this.configFile}: chat_template failed: ${(e as Error).message}`);
    }
  }

  tokenToId(token: string): number | undefined {
    return this.tok.token_to_id(token);
  }

  idToToken(id: number): string | undefined {
    return this.tok.id_to_token(id);
  }
}

const tokenizerCache = new Map<string, Tokenizer>();

/**
 * Loads `<modelDir>/tokenizer.json` (required) and `<modelDir>/tokenizer_config.json`
 * (optional: special tokens, chat_template). BOS/EOS/PAD come from tokenizer_config.json,
 * else from config.json's *_token_id. Errors name the file. Cached per absolute directory
 * (pass `fresh` to reload).
 */
export function loadTokenizer(modelDir: string, options: { fresh?: boolean } = {}): Tokenizer {
  const dir = path.resolve(modelDir);
  const cached = tokenizerCache.get(dir);
  if (cached && !options.fresh) return cached;
  const tjFile = path.join(modelDir, 'tokenizer.json');
  if (!existsSync(tjFile)) throw new Error(`${tjFile}: not found (a model directory needs a tokenizer.json)`);
  const tj = readJson(tjFile, 'tokenizer');
  if (!tj || typeof tj !== 'object' || !('model' in tj)) throw new Error(`${tjFile}: not a tokenizer.json (no 'model' field)`);
  const cfgFile = path.join(modelDir, 'tokenizer_config.json');
  const cfg = existsSync(cfgFile) ? readJson(cfgFile, 'tokenizer config') : {};
  if (!cfg || typeof cfg !== 'object' || Array.isArray(cfg)) throw new Error(`${cfgFile}: must be a JSON object`);
  const mcFile = path.join(modelDir, 'config.json');
  let mc: Record<string, unknown> | undefined;
  if (existsSync(mcFile)) {
    try {
      mc = JSON.parse(readFileSync(mcFile, 'utf8')) as Record<string, unknown>;
    } catch {
      mc = undefined; // config.json is the model loader's business; only a fallback here
    }
  }
  let hf: HfTokenizer;
  try {
    hf = new HfTokenizer(tj, { clean_up_tokenization_spaces: false, ...(cfg as object) });
  } catch (e) {
    throw new Error(`${tjFile}: cannot build the tokenizer: ${(e as Error).message}`);
  }
  const t = new HfBackedTokenizer(hf, modelDir, cfgFile, cfg as Record<string, unknown>, mc);
  tokenizerCache.set(dir, t);
  return t;
}

// ---------------------------------------------------------------------------------------
// Pre-tokenized data without a tokenizer.json

/** config.json / generation_config.json's first id of a key (Llama 3 lists several EOS ids). */
function configTokenId(o: Record<string, unknown> | undefined, key: string): number | undefined {
  let v = o?.[key];
  if (Array.isArray(v)) v = v[0];
  return typeof v === 'number' && Number.isSafeInteger(v) && v >= 0 ? v : undefined;
}

/**
 * The vocabulary of a model directory without a tokenizer.json, enough for pre-tokenized data
 * ({input_ids, labels}): vocab_size from config.json, BOS/EOS from config.json, else from
 * generation_config.json. Encoding or decoding text throws, naming the missing file.
 */
export function modelVocabulary(modelDir: string): Tokenizer {
  const mcFile = path.join(modelDir, 'config.json');
  const mc = readJson(mcFile, 'model config') as Record<string, unknown>;
  const vocab = mc?.vocab_size;
  if (typeof vocab !== 'number' || !Number.isSafeInteger(vocab) || vocab <= 0) {
    throw new Error(`${mcFile}: field 'vocab_size' must be a positive integer, got ${JSON.stringify(vocab)}`);
  }
  const gcFile = path.join(modelDir, 'generation_config.json');
  const gc = existsSync(gcFile) ? (readJson(gcFile, 'generation config') as Record<string, unknown>) : undefined;
  const bosId = configTokenId(mc, 'bos_token_id') ?? configTokenId(gc, 'bos_token_id');
  const eosId = configTokenId(mc, 'eos_token_id') ?? configTokenId(gc, 'eos_token_id');
  const tjFile = path.join(modelDir, 'tokenizer.json');
  const none = (what: string): never => {
    throw new Error(`${tjFile}: not found: ${what} needs a tokenizer (pre-tokenized data, {input_ids, labels}, does not)`);
  };
  return {
    vocabSize: vocab, addBos: false, source: modelDir, hasChatTemplate: false,
    ...(bosId !== undefined ? { bosId } : {}), ...(eosId !== undefined ? { eosId } : {}),
    encode: () => none('encoding text'),
    decode: () => none('decoding ids'),
    applyChatTemplate: () => none('a chat template'),
    tokenToId: () => none('looking up a token'),
    idToToken: () => none('looking up a token'),
  };
}

/**
 * The tokenizer data of `format` needs: the model's tokenizer.json, or, for pre-tokenized data
 * in a model directory that has none, its vocabulary alone (modelVocabulary).
 */
export function tokenizerFor(modelDir: string, format: string): Tokenizer {
  if (format === 'tokenized' && !existsSync(path.join(modelDir, 'tokenizer.json'))) return modelVocabulary(modelDir);
  return loadTokenizer(modelDir);
}

// ---------------------------------------------------------------------------------------
// Writing a byte-level BPE tokenizer.

/** The special tokens of a tokenizer mlora writes, at ids 0..3 (bos=1, eos=2 as in the presets). */
export const SPECIAL_TOKENS = ['<unk>', '<s>', '</s>', '<pad>'] as const;
export const UNK_ID = 0;
export const BOS_ID = 1;
export const EOS_ID = 2;
export const PAD_ID = 3;
/** Smallest vocabulary writeTokenizerFiles accepts: the specials and the 256 byte symbols. */
export const MIN_VOCAB = SPECIAL_TOKENS.length + 256;

/**
 * The chat template written for mlora's own tokenizers (Zephyr-like role markers in plain
 * text, each turn closed by the EOS token):
 *   <|system|>\nYou are...</s><|user|>\nHi</s><|assistant|>\nHello</s>
 */
export const DEFAULT_CHAT_TEMPLATE =
  "{% for message in messages %}{{ '<|' + message['role'] + '|>\\n' + message['content'] + eos_token }}{% endfor %}" +
  "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}";

/** GPT-2's reversible byte -> printable-character map (the ByteLevel alphabet). */
export function bytesToUnicode(): string[] {
  const bs: number[] = [];
  for (let b = 0x21; b <= 0x7e; b++) bs.push(b);
  for (let b = 0xa1; b <= 0xac; b++) bs.push(b);
  for (let b = 0xae; b <= 0xff; b++) bs.push(b);
  const map = new Array<string>(256);
  for (const b of bs) map[b] = String.fromCharCode(b);
  let n = 0;
  for (let b = 0; b < 256; b++) if (map[b] === undefined) map[b] = String.fromCharCode(256 + n++);
  return map;
}

/** The ByteLevel pre-tokenizer's split (GPT-2 pattern), as the Rust and JS libraries apply it. */
const PRETOKENIZE = /'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+/gu;

/** Binary max-heap of [count, a, b] ordered by count desc, then (a, b) asc: deterministic ties. */
class PairHeap {
  private c: number[] = [];
  private a: number[] = [];
  private b: number[] = [];
  get size() {
    return this.c.length;
  }
  private before(i: number, j: number): boolean {
    const c = this.c, a = this.a, b = this.b;
    if (c[i] !== c[j]) return c[i]! > c[j]!;
    if (a[i] !== a[j]) return a[i]! < a[j]!;
    return b[i]! < b[j]!;
  }
  private swap(i: number, j: number) {
    for (const arr of [this.c, this.a, this.b]) {
      const t = arr[i]!;
      arr[i] = arr[j]!;
      arr[j] = t;
    }
  }
  push(count: number, a: number, b: number) {
    this.c.push(count);
    this.a.push(a);
    this.b.push(b);
    let i = this.c.length - 1;
    while (i > 0) {
      const p = (i - 1) >> 1;
      if (!this.before(i, p)) break;
      this.swap(i, p);
      i = p;
    }
  }
  pop(): [number, number, number] {
    const top: [number, number, number] = [this.c[0]!, this.a[0]!, this.b[0]!];
    const last = this.c.length - 1;
    this.swap(0, last);
    this.c.pop();
    this.a.pop();
    this.b.pop();
    let i = 0;
    const n = this.c.length;
    for (;;) {
      const l = 2 * i + 1, r = l + 1;
      let m = i;
      if (l < n && this.before(l, m)) m = l;
      if (r < n && this.before(r, m)) m = r;
      if (m === i) break;
      this.swap(i, m);
      i = m;
    }
    return top;
  }
}

export interface TrainedBpe {
  /** token string -> id, ids 0..vocabSize-1 without gaps. */
  vocab: Map<string, number>;
  merges: Array<[string, string]>;
  /** How many ids are unreachable fillers (`<|reserved_N|>`), used when the corpus ran out of pairs. */
  reserved: number;
}

/**
 * Learns byte-level BPE merges from a corpus, deterministically (ties: lowest ids first),
 * until the vocabulary has `vocabSize` entries. Incremental: pair counts are updated only
 * for the words a merge touches, and the best pair comes from a lazy max-heap.
 * If the corpus runs out of pairs first, the rest is filled with unreachable
 * `<|reserved_N|>` entries so the size is exact.
 */
export function trainByteLevelBpe(corpus: string[], vocabSize: number): TrainedBpe {
  if (!Number.isInteger(vocabSize) || vocabSize < MIN_VOCAB)
    throw new Error(`tokenizer vocab size must be an integer ≥ ${MIN_VOCAB} (4 special tokens + 256 bytes), got ${vocabSize}`);
  const byteChars = bytesToUnicode();
  const tokens: string[] = [...SPECIAL_TOKENS, ...byteChars];
  const vocab = new Map<string, number>(tokens.map((t, i) => [t, i]));
  const base = SPECIAL_TOKENS.length;

  // Word frequencies over pre-tokens, each word a list of symbol ids.
  const freq = new Map<string, number>();
  const enc = new TextEncoder();
  for (const doc of corpus) {
    for (const m of doc.matchAll(PRETOKENIZE)) freq.set(m[0], (freq.get(m[0]) ?? 0) + 1);
  }
  const words: number[][] = [];
  const counts: number[] = [];
  for (const w of [...freq.keys()].sort()) {
    const bytes = enc.encode(w);
    if (bytes.length < 2) continue;
    words.push(Array.from(bytes, (x) => x + base));
    counts.push(freq.get(w)!);
  }

  const K = 1 << 20; // pair key = a * K + b (ids < 2^20)
  const pairCount = new Map<number, number>();
  const pairWords = new Map<number, Set<number>>();
  const addPairs = (wi: number, sign: number, touched: Set<number>) => {
    const w = words[wi]!;
    const c = counts[wi]! * sign;
    for (let i = 0; i + 1 < w.length; i++) {
      const k = w[i]! * K + w[i + 1]!;
      pairCount.set(k, (pairCount.get(k) ?? 0) + c);
      touched.add(k);
      if (sign > 0) {
        let s = pairWords.get(k);
        if (!s) pairWords.set(k, (s = new Set()));
        s.add(wi);
      }
    }
  };
  const heap = new PairHeap();
  const init = new Set<number>();
  for (let wi = 0; wi < words.length; wi++) addPairs(wi, 1, init);
  for (const k of [...init].sort((x, y) => x - y)) heap.push(pairCount.get(k)!, Math.floor(k / K), k % K);

  const merges: Array<[string, string]> = [];
  const banned = new Set<number>();
  while (tokens.length < vocabSize && heap.size > 0) {
    const [c, a, b] = heap.pop();
    const k = a * K + b;
    if (pairCount.get(k) !== c || c <= 0 || banned.has(k)) continue; // stale heap entry
    const merged = tokens[a]! + tokens[b]!;
    let id = vocab.get(merged);
    if (id !== undefined && id < base) {
      // The pair spells a special token ('<s' + '>'): never merge it (the added-token
      // splitter owns that string), and drop the pair for good.
      banned.add(k);
      continue;
    }
    if (id === undefined) {
      id = tokens.length;
      tokens.push(merged);
      vocab.set(merged, id);
    }
    merges.push([tokens[a]!, tokens[b]!]);
    const touched = new Set<number>();
    for (const wi of pairWords.get(k) ?? []) {
      const w = words[wi]!;
      let has = false;
      for (let i = 0; i + 1 < w.length; i++) if (w[i] === a && w[i + 1] === b) { has = true; break; }
      if (!has) continue;
      addPairs(wi, -1, touched);
      const out: number[] = [];
      for (let i = 0; i < w.length; i++) {
        if (i + 1 < w.length && w[i] === a && w[i + 1] === b) {
          out.push(id);
          i++;
        } else out.push(w[i]!);
      }
      words[wi] = out;
      addPairs(wi, 1, touched);
    }
    pairWords.delete(k);
    for (const t of [...touched].sort((x, y) => x - y)) {
      const n = pairCount.get(t)!;
      if (n > 0) heap.push(n, Math.floor(t / K), t % K);
      else pairCount.delete(t);
    }
  }
  let reserved = 0;
  while (tokens.length < vocabSize) {
    const t = `<|reserved_${reserved++}|>`;
    vocab.set(t, tokens.length);
    tokens.push(t);
  }
  return { vocab, merges, reserved };
}

export interface WriteTokenizerOptions {
  vocabSize: number;
  /** Texts to learn merges from; default: the text of the demo datasets. */
  corpus?: string[];
  /** tokenizer_config.json chat_template; default DEFAULT_CHAT_TEMPLATE; null writes none. */
  chatTemplate?: string | null;
  modelMaxLength?: number;
}

/** Writes `<dir>/tokenizer.json` (byte-level BPE) and `<dir>/tokenizer_config.json`. */
export async function writeTokenizerFiles(dir: string, options: WriteTokenizerOptions): Promise<{ merges: number; reserved: number }> {
  const corpus = options.corpus ?? (await import('./demo.js')).demoCorpus();
  const bpe = trainByteLevelBpe(corpus, options.vocabSize);
  const added = SPECIAL_TOKENS.map((content, id) => ({
    id, content, single_word: false, lstrip: false, rstrip: false, normalized: false, special: true,
  }));
  const byteLevel = { type: 'ByteLevel', add_prefix_space: false, trim_offsets: true, use_regex: true };
  const bos = SPECIAL_TOKENS[BOS_ID];
  const tokenizerJson = {
    version: '1.0',
    truncation: null,
    padding: null,
    added_tokens: added,
    normalizer: null,
    pre_tokenizer: byteLevel,
    post_processor: {
      type: 'TemplateProcessing',
      single: [{ SpecialToken: { id: bos, type_id: 0 } }, { Sequence: { id: 'A', type_id: 0 } }],
      pair: [
        { SpecialToken: { id: bos, type_id: 0 } }, { Sequence: { id: 'A', type_id: 0 } },
        { SpecialToken: { id: bos, type_id: 1 } }, { Sequence: { id: 'B', type_id: 1 } },
      ],
      special_tokens: { [bos]: { id: bos, ids: [BOS_ID], tokens: [bos] } },
    },
    decoder: byteLevel,
    model: {
      type: 'BPE',
      dropout: null,
      unk_token: null,
      continuing_subword_prefix: null,
      end_of_word_suffix: null,
      fuse_unk: false,
      byte_fallback: false,
      ignore_merges: false,
      vocab: Object.fromEntries(bpe.vocab),
      merges: bpe.merges,
    },
  };
  const config: Record<string, unknown> = {
    tokenizer_class: 'PreTrainedTokenizerFast',
    bos_token: SPECIAL_TOKENS[BOS_ID],
    eos_token: SPECIAL_TOKENS[EOS_ID],
    pad_token: SPECIAL_TOKENS[PAD_ID],
    unk_token: SPECIAL_TOKENS[UNK_ID],
    add_bos_token: true,
    add_eos_token: false,
    clean_up_tokenization_spaces: false,
    model_max_length: options.modelMaxLength ?? 2048,
    added_tokens_decoder: Object.fromEntries(added.map(({ id, ...rest }) => [String(id), rest])),
  };
  const tpl = options.chatTemplate === undefined ? DEFAULT_CHAT_TEMPLATE : options.chatTemplate;
  if (tpl !== null) config.chat_template = tpl;
  mkdirSync(dir, { recursive: true });
  writeFileSync(path.join(dir, 'tokenizer.json'), JSON.stringify(tokenizerJson));
  writeFileSync(path.join(dir, 'tokenizer_config.json'), JSON.stringify(config, null, 2) + '\n');
  tokenizerCache.delete(path.resolve(dir));
  return { merges: bpe.merges.length, reserved: bpe.reserved };
}
