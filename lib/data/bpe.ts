// A real byte-level BPE tokenizer for the models mlora makes itself (`mlora make-model`): merges
// learned deterministically from a corpus (trainByteLevelBpe), written as tokenizer.json +
// tokenizer_config.json (writeTokenizerFiles). The files are ordinary HF files:
// `tokenizers.Tokenizer.from_file()` and `AutoTokenizer.from_pretrained()` load them unchanged.
// Apart from tokenizer.ts: making a tokenizer is `mlora make-model`'s business, loading one is
// every run's; the two share only the loader's cache, which writing a directory's files clears.
import { mkdirSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import { forgetTokenizer } from './tokenizer.js';

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
  forgetTokenizer(dir);
  return { merges: bpe.merges.length, reserved: bpe.reserved };
}
