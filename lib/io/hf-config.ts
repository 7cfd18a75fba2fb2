// config.json of a Hugging Face model directory: parseModelConfig turns it into a LlamaConfig
// with every field checked (errors name the file, field and value), and toHfConfigJson writes a
// LlamaConfig back with the real field names of the family's config class. Its own file: the
// family rules are the part that grows with each model family, apart from the tensor files.
//
// Accepted model_type: llama (with rope_scaling llama3, linear, or dynamic where that is the plain
// RoPE), mistral (sliding_window), qwen2 (q/k/v biases; use_sliding_window / max_window_layers /
// layer_types) and qwen3 (q_norm / k_norm, head_dim default 128). Refused with the reason: other
// model types, attention_bias / mlp_bias true (llama, mistral, qwen3: o_proj would be biased
// too), hidden_act other than silu, partial rotary embeddings, and the other RoPE scalings
// (yarn, longrope, ...).
import fs from 'node:fs';
import path from 'node:path';
import type { LlamaConfig, RopeScaling } from '../model/config.js';

const TORCH_DTYPES = ['float32', 'bfloat16', 'float16'] as const;

/** A config value as error messages quote it. */
export function describe(v: unknown): string {
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

/** Reads and parses a JSON file; errors start with `label` (the file). */
export function readJson(file: string, label: string): unknown {
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
