// Tokenizers: load a Hugging Face model directory's tokenizer.json + tokenizer_config.json
// (with @huggingface/tokenizers, a pure-JS implementation, and @huggingface/jinja for the
// chat template), or, for pre-tokenized data in a directory without one, its vocabulary alone.
// The byte-level BPE tokenizer mlora writes for the models it makes itself is in bpe.ts.
import { existsSync, readFileSync } from 'node:fs';
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
  /**
   * The text `ids` add after `prefix` (a generated continuation of a prompt). Not decode(ids):
   * SentencePiece decoders (Metaspace) drop the leading space of a sequence's first piece.
   */
  decodeAfter(prefix: ArrayLike<number>, ids: ArrayLike<number>, options?: { skipSpecialTokens?: boolean }): string;
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

  decodeAfter(prefix: ArrayLike<number>, ids: ArrayLike<number>, options: { skipSpecialTokens?: boolean } = {}): string {
    const before = this.decode(prefix, options);
    const all = this.decode([...Array.from(prefix), ...Array.from(ids)], options);
    // a byte-fallback character split across the boundary changes the prefix's own text
    return all.startsWith(before) ? all.slice(before.length) : this.decode(ids, options);
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

/** Drops the cached tokenizer of a directory whose tokenizer files were rewritten (bpe.ts). */
export function forgetTokenizer(modelDir: string): void {
  tokenizerCache.delete(path.resolve(modelDir));
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
    decodeAfter: () => none('decoding ids'),
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
