// Hugging Face model directories: config.json → LlamaConfig with every field checked,
// model.safetensors or shards + model.safetensors.index.json, every expected LLaMA tensor
// checked against the shape the config implies, per-stage tensor lists, and a writer of
// seeded random LLaMAs in the real HF layout (what `mlora make-model` writes).
//
// Accepted model_type: llama (with rope_scaling llama3, linear, or dynamic where that is the plain
// RoPE), mistral (sliding_window), qwen2 (q/k/v biases; use_sliding_window / max_window_layers /
// layer_types) and qwen3 (q_norm / k_norm, head_dim default 128). Refused with the reason: other
// model types, attention_bias / mlp_bias true (llama, mistral, qwen3: o_proj would be biased
// too), hidden_act other than silu, partial rotary embeddings, and the other RoPE scalings
// (yarn, longrope, ...).
import fs from 'node:fs';
import path from 'node:path';
import {
  LORA_TARGETS,
  projectionModule,
  projectionShape,
  type LlamaConfig,
  type LoraTarget,
  type RopeScaling,
} from '../model/config.js';
import type { DType, NativeDevice, Tensor } from '../native.js';
import { Rng } from '../rng.js';
import { f32ToBf16, f32ToF16 } from './dtype.js';
import { bnbBlob, companionNames, parseQuantizationConfig, QUANT_DTYPE, type QuantizeMode } from './bnb.js';
import {
  numel,
  openSafetensors,
  ST_DTYPE_SIZE,
  writeFileAtomic,
  writeSafetensors,
  type SafetensorsFile,
  type StDType,
  type StTensorInfo,
  type StTensorSource,
} from './safetensors.js';

// ---------------------------------------------------------------------------------------
// config.json

const TORCH_DTYPES = ['float32', 'bfloat16', 'float16'] as const;

function describe(v: unknown): string {
  return v === undefined ? 'nothing' : JSON.stringify(v);
}

/** Parses an HF config.json object into a LlamaConfig; `file` names the file in errors. */
export function parseModelConfig(json: unknown, file = 'config.json'): LlamaConfig {
  if (typeof json !== 'object' || json === null || Array.isArray(json))
    throw new Error(`${file}: must be a JSON object`);
  const o = json as Record<string, unknown>;
  const err = (field: string, msg: string) => new Error(`${file}: field '${field}' ${msg}`);
  const has = (k: string) => o[k] !== undefined;
  const posInt = (k: string): number => {
    if (!has(k)) throw err(k, 'is missing');
    const v = o[k];
    if (typeof v !== 'number' || !Number.isSafeInteger(v) || v <= 0)
      throw err(k, `must be a positive integer, got ${describe(v)}`);
    return v;
  };
  const posNum = (k: string, v: unknown): number => {
    if (typeof v !== 'number' || !Number.isFinite(v) || v <= 0)
      throw err(k, `must be a positive number, got ${describe(v)}`);
    return v;
  };
  const bool = (k: string, def: boolean): boolean => {
    if (!has(k)) return def;
    if (typeof o[k] !== 'boolean') throw err(k, `must be true or false, got ${describe(o[k])}`);
    return o[k] as boolean;
  };

  if (!has('model_type')) throw err('model_type', 'is missing');
  const modelType = o.model_type;
  if (!(MODEL_TYPES as readonly unknown[]).includes(modelType)) {
    throw err(
      'model_type',
      `is ${describe(modelType)}: mlora supports LLaMA-architecture models (model_type ${MODEL_TYPES.join(', ')})`,
    );
  }
  const qwen = modelType === 'qwen2' || modelType === 'qwen3';

  const hiddenSize = posInt('hidden_size');
  const intermediateSize = posInt('intermediate_size');
  const numLayers = posInt('num_hidden_layers');
  const numHeads = posInt('num_attention_heads');
  const numKvHeads =
    has('num_key_value_heads') && o.num_key_value_heads !== null ? posInt('num_key_value_heads') : numHeads;
  if (numHeads % numKvHeads !== 0) {
    throw err('num_key_value_heads', `(${numKvHeads}) must divide num_attention_heads (${numHeads})`);
  }
  let headDim: number;
  if (has('head_dim') && o.head_dim !== null) headDim = posInt('head_dim');
  else if (modelType === 'qwen3')
    headDim = 128; // Qwen3Config's default, not hidden_size / heads
  else {
    if (hiddenSize % numHeads !== 0) {
      throw err(
        'hidden_size',
        `(${hiddenSize}) is not a multiple of num_attention_heads (${numHeads}) and there is no head_dim`,
      );
    }
    headDim = hiddenSize / numHeads;
  }
  if (headDim % 2 !== 0) throw err('head_dim', `must be even for rotary embeddings, got ${headDim}`);
  const vocabSize = posInt('vocab_size');
  const maxPositionEmbeddings = posInt('max_position_embeddings');
  if (!has('rms_norm_eps')) throw err('rms_norm_eps', 'is missing');
  const rmsNormEps = posNum('rms_norm_eps', o.rms_norm_eps);

  // rope_theta: top level (transformers < 4.56) or rope_parameters.rope_theta (newer); the
  // default is the config class's: 10000 (llama, mistral), 1e6 (qwen2, qwen3).
  let ropeTheta = qwen ? 1000000 : 10000;
  let ropeScaling: RopeScaling | undefined;
  for (const key of ['rope_parameters', 'rope_scaling'] as const) {
    const rp = o[key];
    if (rp === undefined || rp === null) continue;
    if (typeof rp !== 'object' || Array.isArray(rp)) throw err(key, `must be an object or null, got ${describe(rp)}`);
    const r = rp as Record<string, unknown>;
    if (r.rope_theta !== undefined) ropeTheta = posNum(`${key}.rope_theta`, r.rope_theta);
    const scaling = parseRopeScaling(r, key, maxPositionEmbeddings, err);
    if (scaling && ropeScaling && JSON.stringify(scaling) !== JSON.stringify(ropeScaling)) {
      throw err(key, `(${describe(rp)}) disagrees with rope_parameters (${describe(o.rope_parameters)})`);
    }
    ropeScaling ??= scaling;
  }
  if (has('rope_theta')) ropeTheta = posNum('rope_theta', o.rope_theta);
  if (has('partial_rotary_factor') && o.partial_rotary_factor !== null && o.partial_rotary_factor !== 1) {
    throw err('partial_rotary_factor', `is ${describe(o.partial_rotary_factor)}: mlora rotates the whole head (1.0)`);
  }

  const tieWordEmbeddings = bool('tie_word_embeddings', false);
  // Qwen2 has no attention_bias switch: its q/k/v always carry biases, its o_proj never.
  if (modelType !== 'qwen2' && bool('attention_bias', false)) {
    throw err(
      'attention_bias',
      'is true: biases on all four attention projections (o_proj included) are not implemented by mlora (Qwen2-style q/k/v biases are: model_type qwen2)',
    );
  }
  if (bool('mlp_bias', false)) throw err('mlp_bias', 'is true: biased MLP projections are not implemented by mlora');
  if (has('hidden_act') && o.hidden_act !== 'silu') {
    throw err('hidden_act', `is ${describe(o.hidden_act)}: mlora's MLP is SwiGLU (silu)`);
  }
  const window = (k: string, def: number | null): number => {
    const sw = has(k) ? o[k] : def;
    if (sw === null) return 0;
    if (typeof sw !== 'number' || !Number.isSafeInteger(sw) || sw <= 0)
      throw err(k, `must be null or a positive integer, got ${describe(sw)}`);
    return sw;
  };
  let layerWindows: number[] | undefined;
  if (modelType === 'mistral') {
    // MistralConfig's default window is 4096; every layer uses it
    const w = window('sliding_window', 4096);
    if (w) layerWindows = new Array<number>(numLayers).fill(w);
  } else if (qwen && bool('use_sliding_window', false)) {
    // transformers: the window applies to the layers layer_types marks sliding_attention, or
    // without that list to the layers from max_window_layers on; use_sliding_window false = none
    const w = window('sliding_window', 4096);
    if (w) {
      if (has('layer_types') && o.layer_types !== null) {
        const lt = o.layer_types;
        if (
          !Array.isArray(lt) ||
          lt.length !== numLayers ||
          !lt.every((t) => t === 'sliding_attention' || t === 'full_attention')
        ) {
          throw err(
            'layer_types',
            `must list num_hidden_layers (${numLayers}) entries, each "sliding_attention" or "full_attention", got ${describe(lt)}`,
          );
        }
        layerWindows = lt.map((t) => (t === 'sliding_attention' ? w : 0));
      } else {
        let mwl = 28; // Qwen2Config / Qwen3Config default
        if (has('max_window_layers') && o.max_window_layers !== null) {
          const v = o.max_window_layers;
          if (typeof v !== 'number' || !Number.isSafeInteger(v) || v < 0)
            throw err('max_window_layers', `must be a non-negative integer, got ${describe(v)}`);
          mwl = v;
        }
        layerWindows = Array.from({ length: numLayers }, (_, l) => (l >= mwl ? w : 0));
      }
    }
  }
  // a window at least as long as any sequence the model takes never masks a key
  if (layerWindows) layerWindows = layerWindows.map((w) => (w >= maxPositionEmbeddings ? 0 : w));
  if (layerWindows && layerWindows.every((w) => w === 0)) layerWindows = undefined;

  // torch_dtype (older) or dtype (transformers ≥ 4.56); HF's default is float32.
  const dtKey = has('torch_dtype') && o.torch_dtype !== null ? 'torch_dtype' : 'dtype';
  let torchDtype = 'float32';
  if (o[dtKey] !== undefined && o[dtKey] !== null) {
    const v = o[dtKey];
    if (typeof v !== 'string' || !(TORCH_DTYPES as readonly string[]).includes(v)) {
      throw err(dtKey, `must be one of ${TORCH_DTYPES.join(', ')}, got ${describe(v)}`);
    }
    torchDtype = v;
  }

  const tokenId = (k: string): number | undefined => {
    let v = o[k];
    if (v === undefined || v === null) return undefined;
    if (Array.isArray(v)) v = v[0]; // Llama 3 lists several eos ids; the first is the canonical one
    if (typeof v !== 'number' || !Number.isSafeInteger(v) || v < 0)
      throw err(k, `must be a non-negative integer, got ${describe(o[k])}`);
    return v;
  };
  const cfg: LlamaConfig = {
    modelType: modelType as string,
    hiddenSize,
    intermediateSize,
    numLayers,
    numHeads,
    numKvHeads,
    headDim,
    vocabSize,
    maxPositionEmbeddings,
    rmsNormEps,
    ropeTheta,
    tieWordEmbeddings,
    torchDtype,
  };
  const bos = tokenId('bos_token_id');
  const eos = tokenId('eos_token_id');
  if (bos !== undefined) cfg.bosTokenId = bos;
  if (eos !== undefined) cfg.eosTokenId = eos;
  if (ropeScaling) cfg.ropeScaling = ropeScaling;
  if (modelType === 'qwen2') cfg.qkvBias = true;
  if (modelType === 'qwen3') cfg.qkNorm = true;
  if (layerWindows) cfg.layerWindows = layerWindows;
  return cfg;
}

const MODEL_TYPES = ['llama', 'mistral', 'qwen2', 'qwen3'] as const;

/**
 * The scaling of a rope_scaling / rope_parameters object (undefined: the default RoPE). Old
 * configs spell rope_type as `type`. Refuses, with the reason, what mlora does not implement.
 */
function parseRopeScaling(
  r: Record<string, unknown>,
  key: string,
  maxPositionEmbeddings: number,
  err: (field: string, msg: string) => Error,
): RopeScaling | undefined {
  const type = r.rope_type ?? r.type ?? 'default';
  const num = (k: string, def?: number): number => {
    const v = r[k] ?? def;
    if (typeof v !== 'number' || !Number.isFinite(v) || v <= 0)
      throw err(`${key}.${k}`, `must be a positive number, got ${describe(r[k])}`);
    return v;
  };
  switch (type) {
    case 'default':
      return undefined;
    case 'linear':
      return { type: 'linear', factor: num('factor') };
    case 'dynamic': {
      // Dynamic NTK changes the frequencies only for sequences longer than the original
      // context; mlora's positions stay below max_position_embeddings, so unless the config
      // names a shorter original context, it is the plain RoPE at every position mlora runs.
      const factor = num('factor');
      const orig = r.original_max_position_embeddings;
      if (orig !== undefined && orig !== null && !(typeof orig === 'number' && orig >= maxPositionEmbeddings)) {
        throw err(
          `${key}.original_max_position_embeddings`,
          `is ${describe(orig)} < max_position_embeddings (${maxPositionEmbeddings}): dynamic NTK RoPE would then rescale the frequencies by each batch's longest sequence, which mlora does not implement (its RoPE tables are fixed)`,
        );
      }
      return { type: 'dynamic', factor };
    }
    case 'llama3': {
      const s: RopeScaling = {
        type: 'llama3',
        factor: num('factor'),
        lowFreqFactor: num('low_freq_factor'),
        highFreqFactor: num('high_freq_factor'),
        originalMaxPositionEmbeddings: num('original_max_position_embeddings'),
      };
      if (!Number.isSafeInteger(s.originalMaxPositionEmbeddings)) {
        throw err(
          `${key}.original_max_position_embeddings`,
          `must be a positive integer, got ${describe(r.original_max_position_embeddings)}`,
        );
      }
      if (!(s.highFreqFactor > s.lowFreqFactor)) {
        throw err(
          `${key}.high_freq_factor`,
          `(${s.highFreqFactor}) must be greater than low_freq_factor (${s.lowFreqFactor})`,
        );
      }
      return s;
    }
    default:
      throw err(
        `${key}.rope_type`,
        `is ${describe(type)}: mlora implements the default RoPE and the llama3, linear and dynamic scalings, not this one (${describe(r)})`,
      );
  }
}

function readJson(file: string, label: string): unknown {
  let text: string;
  try {
    text = fs.readFileSync(file, 'utf8');
  } catch (e) {
    throw new Error(
      `${label}: cannot read: ${(e as NodeJS.ErrnoException).code === 'ENOENT' ? 'no such file' : (e as Error).message}`,
    );
  }
  try {
    return JSON.parse(text);
  } catch (e) {
    throw new Error(`${label}: not valid JSON (${(e as Error).message})`);
  }
}

/** Reads DIR/config.json into a LlamaConfig; errors name the file and field. */
export function readModelConfig(dir: string): LlamaConfig {
  const file = path.join(dir, 'config.json');
  return parseModelConfig(readJson(file, file), file);
}

const ARCHITECTURES: Record<string, string> = {
  llama: 'LlamaForCausalLM',
  mistral: 'MistralForCausalLM',
  qwen2: 'Qwen2ForCausalLM',
  qwen3: 'Qwen3ForCausalLM',
};

/** rope_scaling as transformers writes it. */
function ropeScalingJson(r: RopeScaling | undefined): Record<string, unknown> | null {
  if (!r) return null;
  if (r.type !== 'llama3') return { rope_type: r.type, factor: r.factor };
  return {
    rope_type: 'llama3',
    factor: r.factor,
    low_freq_factor: r.lowFreqFactor,
    high_freq_factor: r.highFreqFactor,
    original_max_position_embeddings: r.originalMaxPositionEmbeddings,
  };
}

/** The fields of the family's config class that say what parseModelConfig reads back as c's features. */
function familyJson(c: LlamaConfig): Record<string, unknown> {
  const windows = c.layerWindows ?? [];
  const w = windows.find((x) => x > 0) ?? 0;
  if (windows.some((x) => x > 0 && x !== w))
    throw new Error(
      `toHfConfigJson: layers with different sliding windows (${windows.join(', ')}) have no config.json spelling`,
    );
  const expect = (ok: boolean, what: string) => {
    if (!ok) throw new Error(`toHfConfigJson: model_type ${c.modelType} cannot have ${what}`);
  };
  expect(c.modelType === 'qwen2' || !c.qkvBias, 'q/k/v biases (qwen2 has them)');
  expect(c.modelType === 'qwen3' || !c.qkNorm, 'q/k norms (qwen3 has them)');
  expect(c.modelType === 'qwen2' || c.modelType === 'qwen3' || c.modelType === 'mistral' || !w, 'a sliding window');
  expect(c.modelType !== 'mistral' || windows.every((x) => x === w), 'a sliding window on some layers only');
  switch (c.modelType) {
    case 'llama':
      return { attention_bias: false, mlp_bias: false, pretraining_tp: 1 };
    case 'mistral':
      return { sliding_window: w || null };
    case 'qwen2':
    case 'qwen3':
      return {
        ...(c.modelType === 'qwen3' ? { attention_bias: false } : {}),
        use_sliding_window: w > 0,
        sliding_window: w || null,
        max_window_layers: c.numLayers,
        ...(w ? { layer_types: windows.map((x) => (x ? 'sliding_attention' : 'full_attention')) } : {}),
      };
    default:
      throw new Error(`toHfConfigJson: model_type ${describe(c.modelType)} is not one of ${MODEL_TYPES.join(', ')}`);
  }
}

/** HF config.json contents for a LlamaConfig (the real field names of the family's config class). */
export function toHfConfigJson(c: LlamaConfig): Record<string, unknown> {
  return {
    architectures: [ARCHITECTURES[c.modelType] ?? 'LlamaForCausalLM'],
    model_type: c.modelType,
    hidden_size: c.hiddenSize,
    intermediate_size: c.intermediateSize,
    num_hidden_layers: c.numLayers,
    num_attention_heads: c.numHeads,
    num_key_value_heads: c.numKvHeads,
    head_dim: c.headDim,
    vocab_size: c.vocabSize,
    max_position_embeddings: c.maxPositionEmbeddings,
    rms_norm_eps: c.rmsNormEps,
    rope_theta: c.ropeTheta,
    rope_scaling: ropeScalingJson(c.ropeScaling),
    tie_word_embeddings: c.tieWordEmbeddings,
    hidden_act: 'silu',
    attention_dropout: 0.0,
    ...familyJson(c),
    initializer_range: 0.02,
    bos_token_id: c.bosTokenId ?? 1,
    eos_token_id: c.eosTokenId ?? 2,
    use_cache: true,
    torch_dtype: c.torchDtype,
  };
}

// ---------------------------------------------------------------------------------------
// Tensor names and shapes

export const EMBED = 'model.embed_tokens.weight';
export const FINAL_NORM = 'model.norm.weight';
export const LM_HEAD = 'lm_head.weight';

/** The projections that carry a frozen bias (Qwen2: q, k, v). */
export function biasedTargets(c: LlamaConfig): LoraTarget[] {
  return c.qkvBias ? ['q_proj', 'k_proj', 'v_proj'] : [];
}

/** Names and shapes of layer i's tensors, in HF order. */
export function layerTensors(c: LlamaConfig, i: number): Array<[string, number[]]> {
  const p = `model.layers.${i}`;
  const out: Array<[string, number[]]> = [
    [`${p}.input_layernorm.weight`, [c.hiddenSize]],
    [`${p}.post_attention_layernorm.weight`, [c.hiddenSize]],
  ];
  for (const t of LORA_TARGETS) out.push([`${p}.${projectionModule(t)}.weight`, projectionShape(c, t)]);
  for (const t of biasedTargets(c)) out.push([`${p}.${projectionModule(t)}.bias`, [projectionShape(c, t)[0]]]);
  if (c.qkNorm) out.push([`${p}.self_attn.q_norm.weight`, [c.headDim]], [`${p}.self_attn.k_norm.weight`, [c.headDim]]);
  return out;
}

/** Every tensor a LLaMA checkpoint with this config must hold, with its shape, in HF order. */
export function expectedTensors(c: LlamaConfig): Map<string, number[]> {
  const m = new Map<string, number[]>();
  m.set(EMBED, [c.vocabSize, c.hiddenSize]);
  for (let i = 0; i < c.numLayers; i++) for (const [n, s] of layerTensors(c, i)) m.set(n, s);
  m.set(FINAL_NORM, [c.hiddenSize]);
  if (!c.tieWordEmbeddings) m.set(LM_HEAD, [c.vocabSize, c.hiddenSize]);
  return m;
}

/** The base model's parameters: the elements of every tensor its checkpoint holds (a tied head counts once). */
export function parameterCount(c: LlamaConfig): number {
  let n = 0;
  for (const shape of expectedTensors(c).values()) n += shape.reduce((a, b) => a * b, 1);
  return n;
}

/**
 * The tensors one pipeline stage needs: layers [lo, hi), plus the embedding when `embedding`
 * (first stage) and the final norm + head when `head` (last stage; with tied embeddings the
 * head is the embedding table).
 */
export function stageTensorNames(
  c: LlamaConfig,
  lo: number,
  hi: number,
  opts: { embedding?: boolean; head?: boolean } = {},
): string[] {
  if (!(Number.isInteger(lo) && Number.isInteger(hi) && 0 <= lo && lo <= hi && hi <= c.numLayers)) {
    throw new Error(`stageTensorNames: layers [${lo}, ${hi}) are not inside [0, ${c.numLayers})`);
  }
  const names: string[] = [];
  if (opts.embedding) names.push(EMBED);
  for (let i = lo; i < hi; i++) for (const [n] of layerTensors(c, i)) names.push(n);
  if (opts.head) {
    names.push(FINAL_NORM);
    names.push(c.tieWordEmbeddings ? EMBED : LM_HEAD);
  }
  return [...new Set(names)];
}

// ---------------------------------------------------------------------------------------
// Model directories

export interface ModelDir {
  dir: string;
  config: LlamaConfig;
  /**
   * A checkpoint saved quantized by bitsandbytes (config.json `quantization_config`): its 14·L
   * decoder linears load as nf4 / nf4dq / int8 blobs; embeddings, norms and the LM head keep
   * their dtype. Undefined for an ordinary checkpoint.
   */
  quantization?: QuantizeMode;
  /** Whether `name` is stored quantized in this checkpoint. */
  isQuantized(name: string): boolean;
  /** The safetensors files, in name order. */
  files: SafetensorsFile[];
  /** Every tensor name in the checkpoint (expected ones and any extra), in file order. */
  tensorNames: string[];
  /** Tensors in the files that a LLaMA does not use (e.g. old rotary_emb.inv_freq buffers). */
  extraTensors: string[];
  /** Header warnings of the files (gaps, trailing bytes). */
  warnings: string[];
  /** The file holding a tensor. */
  fileOf(name: string): SafetensorsFile;
  info(name: string): StTensorInfo;
  /** The shape the config implies for a tensor (undefined for extra tensors). */
  expectedShape(name: string): number[] | undefined;
  /**
   * Loads one tensor into device memory (F32/F16/BF16 straight from the file). Its shape is
   * checked against `expectShape` (default: the shape the config implies); `dtype` converts.
   */
  loadTensor(
    device: NativeDevice,
    name: string,
    options?: { expectShape?: readonly number[]; dtype?: DType },
  ): Promise<Tensor>;
  /**
   * Loads several tensors (e.g. `stageTensorNames(config, lo, hi, ...)`: one stage's share),
   * each checked as in loadTensor; on an error the ones already loaded are freed.
   */
  loadTensors(
    device: NativeDevice,
    names: readonly string[],
    options?: { dtype?: DType },
  ): Promise<Map<string, Tensor>>;
  /** One tensor as f32 in JS memory. */
  readF32(name: string): Float32Array;
  /** Totals over the expected tensors. */
  stats(): { tensors: number; parameters: number; bytes: number; dtypes: Record<string, number> };
}

const INDEX = 'model.safetensors.index.json';
const SINGLE = 'model.safetensors';
const SHARD_RE = /^model-\d{5}-of-\d{5}\.safetensors$/;

function sameShape(a: readonly number[], b: readonly number[]): boolean {
  return a.length === b.length && a.every((d, i) => d === b[i]);
}
const fmt = (s: readonly number[]) => `[${s.join(', ')}]`;

/**
 * Opens a Hugging Face model directory: reads config.json and every safetensors header
 * (never the data), and checks that each tensor the config implies is present with its
 * shape and a floating dtype.
 */
export function openModelDir(dir: string): ModelDir {
  const configFile = path.join(dir, 'config.json');
  const configJson = readJson(configFile, configFile);
  const config = parseModelConfig(configJson, configFile);
  const quantization = parseQuantizationConfig((configJson as Record<string, unknown>).quantization_config, configFile);
  const fileMap = new Map<string, SafetensorsFile>(); // tensor → file
  const files: SafetensorsFile[] = [];
  const indexPath = path.join(dir, INDEX);
  const singlePath = path.join(dir, SINGLE);
  if (fs.existsSync(indexPath)) {
    const idx = readJson(indexPath, indexPath) as Record<string, unknown>;
    const wm = idx?.weight_map;
    if (typeof wm !== 'object' || wm === null || Array.isArray(wm))
      throw new Error(`${indexPath}: field 'weight_map' must be an object {tensor: file}`);
    const byFile = new Map<string, string[]>();
    for (const [t, f] of Object.entries(wm as Record<string, unknown>)) {
      if (typeof f !== 'string' || f === '' || f.includes('/') || f.includes('\\') || f === '.' || f === '..') {
        throw new Error(
          `${indexPath}: weight_map['${t}'] must be a file name in the model directory, got ${describe(f)}`,
        );
      }
      byFile.set(f, [...(byFile.get(f) ?? []), t]);
    }
    for (const [f, names] of [...byFile.entries()].sort((a, b) => (a[0] < b[0] ? -1 : 1))) {
      const st = openSafetensors(path.join(dir, f));
      files.push(st);
      for (const t of names) {
        if (!st.tensors.has(t))
          throw new Error(`${indexPath}: weight_map puts tensor '${t}' in ${f}, but ${st.path} has no such tensor`);
        fileMap.set(t, st);
      }
    }
  } else if (fs.existsSync(singlePath)) {
    const st = openSafetensors(singlePath);
    files.push(st);
    for (const t of st.tensors.keys()) fileMap.set(t, st);
  } else {
    throw new Error(
      `${dir}: no ${SINGLE} and no ${INDEX} (a Hugging Face model directory holds its weights in one of them)`,
    );
  }

  const expected = expectedTensors(config);
  // Which tensors bitsandbytes quantized: every decoder linear (transformers keeps lm_head out).
  const quantized = new Set<string>();
  if (quantization)
    for (let i = 0; i < config.numLayers; i++)
      for (const t of LORA_TARGETS) quantized.add(`model.layers.${i}.${projectionModule(t)}.weight`);
  const missing = [...expected.keys()]
    .flatMap((n) => [
      n,
      ...(quantized.has(n) ? companionNames(n, quantization!).filter((c) => !c.endsWith('weight_format')) : []),
    ])
    .filter((n) => !fileMap.has(n));
  if (missing.length) {
    const where = files.length === 1 ? files[0]!.path : `${dir} (${INDEX})`;
    throw new Error(
      `${where}: ${missing.length} tensor(s) the config implies are missing: ${missing.slice(0, 5).join(', ')}${missing.length > 5 ? ', ...' : ''}`,
    );
  }
  for (const [n, shape] of expected) {
    const st = fileMap.get(n)!;
    const i = st.tensors.get(n)!;
    if (quantized.has(n)) {
      const want = quantization === 'int8' ? 'I8' : 'U8';
      if (i.dtype !== want)
        throw new Error(
          `${st.path}: tensor '${n}' is ${i.dtype}; config.json's quantization_config (${quantization}) stores it as ${want}`,
        );
      continue; // its shape and statistics are checked when its blob is assembled (bnbBlob)
    }
    if (!sameShape(i.shape, shape)) {
      throw new Error(`${st.path}: tensor '${n}' has shape ${fmt(i.shape)} but config.json implies ${fmt(shape)}`);
    }
    if (!['F32', 'F16', 'BF16', 'F64'].includes(i.dtype))
      throw new Error(`${st.path}: tensor '${n}' is ${i.dtype}; weights must be F32, F16 or BF16`);
  }
  const tensorNames = [...fileMap.keys()];
  const companions = new Set([...quantized].flatMap((n) => companionNames(n, quantization!)));
  const extraTensors = tensorNames.filter((n) => !expected.has(n) && !companions.has(n));

  const fileOf = (name: string): SafetensorsFile => {
    const f = fileMap.get(name);
    if (!f) throw new Error(`${dir}: the model has no tensor '${name}'`);
    return f;
  };
  const source = (name: string) => ({ file: fileOf(name), name });
  return {
    dir,
    config,
    files,
    tensorNames,
    extraTensors,
    ...(quantization ? { quantization } : {}),
    isQuantized: (name) => quantized.has(name),
    warnings: files.flatMap((f) => f.warnings),
    fileOf,
    info: (name) => fileOf(name).info(name),
    expectedShape: (name) => expected.get(name),
    async loadTensor(device, name, options = {}) {
      const f = fileOf(name);
      const i = f.info(name);
      const want = options.expectShape ?? expected.get(name);
      if (quantized.has(name)) {
        const dt = QUANT_DTYPE[quantization!];
        if (options.dtype && options.dtype !== dt)
          throw new Error(
            `${f.path}: tensor '${name}' is stored ${quantization}; it loads as ${dt}, not ${options.dtype}`,
          );
        return device.fromArray(dt, [...want!], bnbBlob(source, name, quantization!, want!));
      }
      if (want && !sameShape(i.shape, want))
        throw new Error(`${f.path}: tensor '${name}' has shape ${fmt(i.shape)}, expected ${fmt(want)}`);
      return f.toDevice(device, name, options.dtype ? { dtype: options.dtype } : {});
    },
    async loadTensors(device, names, options = {}) {
      const out = new Map<string, Tensor>();
      try {
        for (const n of names)
          if (!out.has(n)) out.set(n, await this.loadTensor(device, n, options.dtype ? { dtype: options.dtype } : {}));
      } catch (e) {
        for (const t of out.values()) t.free();
        throw e;
      }
      return out;
    },
    readF32: (name) => {
      if (quantized.has(name))
        throw new Error(
          `${dir}: tensor '${name}' is stored ${quantization}; load it to a device (loadTensor) and dequantize it there`,
        );
      return fileOf(name).readF32(name);
    },
    stats() {
      let parameters = 0;
      let bytes = 0;
      const dtypes: Record<string, number> = {};
      for (const n of expected.keys()) {
        const i = fileOf(n).info(n);
        parameters += numel(quantized.has(n) ? expected.get(n)! : i.shape);
        bytes += i.end - i.begin;
        if (quantized.has(n))
          for (const c of companionNames(n, quantization!))
            if (fileMap.has(c)) bytes += fileOf(c).info(c).end - fileOf(c).info(c).begin;
        const key = quantized.has(n) ? quantization! : i.dtype;
        dtypes[key] = (dtypes[key] ?? 0) + 1;
      }
      return { tensors: expected.size, parameters, bytes, dtypes };
    },
  };
}

// ---------------------------------------------------------------------------------------
// Writing weights in the HF layout

/**
 * Writes tensors as a Hugging Face model's weights: model.safetensors, or, when they exceed
 * `shardBytes` (or with `alwaysIndex`), model-0000k-of-0000n.safetensors shards of at most
 * `shardBytes` each (a larger tensor goes alone, as transformers does) + model.safetensors.index.json
 * with total_size and the weight map. Tensors keep their order; their data thunks run one at a
 * time while a shard is written, so only one tensor is in memory. Returns the file names written.
 */
export function writeWeightFiles(
  dir: string,
  sources: ReadonlyArray<readonly [string, StTensorSource]>,
  options: { shardBytes?: number; alwaysIndex?: boolean } = {},
): Set<string> {
  const meta = { format: 'pt' };
  const bytesOf = (s: StTensorSource) => numel(s.shape) * ST_DTYPE_SIZE[s.dtype];
  const limit = options.shardBytes ?? Infinity;
  const shards: Array<Array<readonly [string, StTensorSource]>> = [];
  let cur: Array<readonly [string, StTensorSource]> = [];
  let curBytes = 0;
  let total = 0;
  for (const s of sources) {
    const b = bytesOf(s[1]);
    total += b;
    if (cur.length && curBytes + b > limit) {
      shards.push(cur);
      cur = [];
      curBytes = 0;
    }
    cur.push(s);
    curBytes += b;
  }
  if (cur.length || !shards.length) shards.push(cur);
  const written = new Set<string>();
  if (shards.length === 1 && !options.alwaysIndex) {
    writeSafetensors(path.join(dir, SINGLE), Object.fromEntries(shards[0]!), meta);
    written.add(SINGLE);
    return written;
  }
  const n = shards.length;
  const weightMap: Record<string, string> = {};
  shards.forEach((shard, k) => {
    const f = `model-${String(k + 1).padStart(5, '0')}-of-${String(n).padStart(5, '0')}.safetensors`;
    writeSafetensors(path.join(dir, f), Object.fromEntries(shard), meta);
    written.add(f);
    for (const [name] of shard) weightMap[name] = f;
  });
  const sortedMap = Object.fromEntries(Object.entries(weightMap).sort((a, b) => (a[0] < b[0] ? -1 : 1)));
  writeFileAtomic(
    path.join(dir, INDEX),
    JSON.stringify({ metadata: { total_size: total }, weight_map: sortedMap }, null, 2) + '\n',
  );
  written.add(INDEX);
  return written;
}

/** Whether a file name is one of the weight files of an HF model directory (single, shard or index). */
export function isWeightFile(f: string): boolean {
  return f === SINGLE || f === INDEX || SHARD_RE.test(f);
}

// ---------------------------------------------------------------------------------------
// Seeded random LLaMA in the HF layout

export interface RandomLlamaOptions {
  seed: number;
  dtype?: 'f32' | 'bf16' | 'f16';
  /** Split the weights into shards of at most this many bytes (a larger tensor goes alone) + an index. */
  shardBytes?: number;
}

const DTYPE_INFO = {
  f32: { st: 'F32' as StDType, torch: 'float32' },
  bf16: { st: 'BF16' as StDType, torch: 'bfloat16' },
  f16: { st: 'F16' as StDType, torch: 'float16' },
};

/** The HF init of one tensor (normal std 0.02 for weights and biases, ones for norms), from its own Rng stream. */
export function initTensor(seed: number, name: string, shape: readonly number[]): Float32Array {
  const out = new Float32Array(numel(shape));
  if (name.endsWith('norm.weight')) return out.fill(1);
  return new Rng(seed, 'init', name).fillNormal(out, 0.02);
}

/**
 * Writes a seeded random LLaMA in the real HF layout: config.json, model.safetensors (or
 * model-0000i-of-0000n.safetensors + model.safetensors.index.json when `shardBytes` is set)
 * and generation_config.json. Each tensor is drawn from its own stream (seed, 'init', name),
 * so it is reproducible on its own. Tensors are made one at a time while writing. Old weight
 * files of another layout in DIR are removed (as save_pretrained does); the tokenizer is not
 * written here.
 */
export function writeRandomLlama(dir: string, config: LlamaConfig, options: RandomLlamaOptions): void {
  const dt = DTYPE_INFO[options.dtype ?? 'f32'];
  if (!dt) throw new Error(`writeRandomLlama: dtype must be f32, bf16 or f16, got ${describe(options.dtype)}`);
  const cfg: LlamaConfig = { ...config, torchDtype: dt.torch };
  parseModelConfig(toHfConfigJson(cfg), 'writeRandomLlama config'); // the config must be one we can read back
  fs.mkdirSync(dir, { recursive: true });

  const sources: Array<[string, StTensorSource]> = [...expectedTensors(cfg)].map(([name, shape]) => [
    name,
    {
      dtype: dt.st,
      shape,
      data: () => {
        const f = initTensor(options.seed, name, shape);
        return dt.st === 'F32' ? f : dt.st === 'BF16' ? f32ToBf16(f) : f32ToF16(f);
      },
    },
  ]);
  if (options.shardBytes !== undefined && !(options.shardBytes > 0))
    throw new Error(`writeRandomLlama: shardBytes must be positive, got ${options.shardBytes}`);
  const written = writeWeightFiles(
    dir,
    sources,
    options.shardBytes === undefined ? {} : { shardBytes: options.shardBytes, alwaysIndex: true },
  );
  // Old weights of another layout would shadow or confuse the new ones.
  for (const f of fs.readdirSync(dir)) {
    if (isWeightFile(f) && !written.has(f)) fs.rmSync(path.join(dir, f), { force: true });
  }
  writeFileAtomic(path.join(dir, 'config.json'), JSON.stringify(toHfConfigJson(cfg), null, 2) + '\n');
  writeFileAtomic(
    path.join(dir, 'generation_config.json'),
    JSON.stringify(
      { _from_model_config: true, bos_token_id: cfg.bosTokenId ?? 1, eos_token_id: cfg.eosTokenId ?? 2 },
      null,
      2,
    ) + '\n',
  );
}
