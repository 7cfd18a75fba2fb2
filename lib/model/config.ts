// The LLaMA-architecture config as mlora uses it (camelCase), read from a Hugging Face
// config.json by lib/io/hf-config.ts, and the presets `mlora make-model` writes.

export interface LlamaConfig {
  /** config.json model_type: llama, mistral, qwen2, qwen3. */
  modelType: string;
  hiddenSize: number;
  intermediateSize: number;
  numLayers: number;
  numHeads: number;
  numKvHeads: number;
  /** head_dim when given, else hidden_size / num_attention_heads. */
  headDim: number;
  vocabSize: number;
  maxPositionEmbeddings: number;
  rmsNormEps: number;
  ropeTheta: number;
  tieWordEmbeddings: boolean;
  /** Storage dtype of the checkpoint (torch_dtype / dtype): float32, bfloat16, float16. */
  torchDtype: string;
  bosTokenId?: number;
  eosTokenId?: number;
  /** RoPE frequency scaling (rope_scaling / rope_parameters); absent = plain RoPE. */
  ropeScaling?: RopeScaling;
  /** Frozen biases on q_proj, k_proj, v_proj (Qwen2): y = W·x + b + LoRA(x). */
  qkvBias?: boolean;
  /** RMSNorm over head_dim of each head of q and k, before RoPE (Qwen3's q_norm / k_norm). */
  qkNorm?: boolean;
  /**
   * Sliding-window size of each layer (0 = full causal attention): a query at position p sees
   * the keys at p − W < k ≤ p. Absent = no window anywhere.
   */
  layerWindows?: number[];
}

/**
 * RoPE scaling as mlora implements it (inverse frequencies in lib/model/rope.ts):
 * linear divides every frequency by factor; llama3 (Llama 3.1 / 3.2) divides the low
 * frequencies by factor, keeps the high ones and blends the band between; dynamic (NTK) is the
 * plain RoPE at every position below max_position_embeddings, which is all mlora runs.
 */
export type RopeScaling =
  | { type: 'linear'; factor: number }
  | { type: 'dynamic'; factor: number }
  | {
      type: 'llama3';
      factor: number;
      lowFreqFactor: number;
      highFreqFactor: number;
      originalMaxPositionEmbeddings: number;
    };

/** The sliding window of layer l (0 = none). */
export function layerWindow(c: LlamaConfig, l: number): number {
  return c.layerWindows?.[l] ?? 0;
}

/** The seven projections LoRA can target, in the order PEFT and HF name them. */
export const LORA_TARGETS = ['q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj'] as const;
export type LoraTarget = (typeof LORA_TARGETS)[number];

/** [out, in] of a projection in this model. */
export function projectionShape(c: LlamaConfig, target: LoraTarget): [number, number] {
  const q = c.numHeads * c.headDim;
  const kv = c.numKvHeads * c.headDim;
  switch (target) {
    case 'q_proj':
      return [q, c.hiddenSize];
    case 'k_proj':
      return [kv, c.hiddenSize];
    case 'v_proj':
      return [kv, c.hiddenSize];
    case 'o_proj':
      return [c.hiddenSize, q];
    case 'gate_proj':
      return [c.intermediateSize, c.hiddenSize];
    case 'up_proj':
      return [c.intermediateSize, c.hiddenSize];
    case 'down_proj':
      return [c.hiddenSize, c.intermediateSize];
  }
}

/** HF module path of a projection: self_attn.* or mlp.* */
export function projectionModule(target: LoraTarget): string {
  return target.endsWith('_proj') && ['gate_proj', 'up_proj', 'down_proj'].includes(target)
    ? `mlp.${target}`
    : `self_attn.${target}`;
}

export type PresetName =
  'tiny' | 'small' | 'bench' | '1b' | 'tiny-llama3' | 'tiny-qwen2' | 'tiny-qwen3' | 'tiny-mistral';

function preset(
  p: Partial<LlamaConfig> &
    Pick<LlamaConfig, 'hiddenSize' | 'intermediateSize' | 'numLayers' | 'numHeads' | 'numKvHeads' | 'vocabSize'>,
): LlamaConfig {
  return {
    modelType: 'llama',
    headDim: p.hiddenSize / p.numHeads,
    maxPositionEmbeddings: 2048,
    rmsNormEps: 1e-6,
    ropeTheta: 10000,
    tieWordEmbeddings: false,
    torchDtype: 'float32',
    bosTokenId: 1,
    eosTokenId: 2,
    ...p,
  };
}

/**
 * Model presets: tiny (tests, seconds), small (the demo), bench (benchmarks), 1b (GPU benchmark),
 * and tiny-<family> (tiny with Llama 3 RoPE scaling, Qwen2's q/k/v biases, Qwen3's q/k norms,
 * Mistral's sliding window).
 */
/** The tiny preset's shape, which each tiny-<family> preset extends with its family's feature. */
const TINY = {
  hiddenSize: 64,
  intermediateSize: 172,
  numLayers: 2,
  numHeads: 4,
  numKvHeads: 2,
  vocabSize: 512,
  maxPositionEmbeddings: 512,
};

export const PRESETS: Record<PresetName, LlamaConfig> = {
  tiny: preset(TINY),
  small: preset({
    hiddenSize: 256,
    intermediateSize: 688,
    numLayers: 4,
    numHeads: 8,
    numKvHeads: 4,
    vocabSize: 2048,
    maxPositionEmbeddings: 1024,
  }),
  bench: preset({ hiddenSize: 512, intermediateSize: 1376, numLayers: 4, numHeads: 8, numKvHeads: 4, vocabSize: 8192 }),
  '1b': preset({
    hiddenSize: 2048,
    intermediateSize: 5632,
    numLayers: 22,
    numHeads: 32,
    numKvHeads: 4,
    vocabSize: 32000,
    torchDtype: 'bfloat16',
  }),
  // One per model family, each with the feature it adds over tiny, scaled so that it shows at
  // tiny's lengths (tests and trying a family out).
  'tiny-llama3': preset({
    ...TINY,
    ropeTheta: 500000,
    ropeScaling: { type: 'llama3', factor: 8, lowFreqFactor: 1, highFreqFactor: 4, originalMaxPositionEmbeddings: 64 },
  }),
  'tiny-qwen2': preset({
    ...TINY,
    modelType: 'qwen2',
    ropeTheta: 1000000,
    qkvBias: true,
    tieWordEmbeddings: true,
  }),
  'tiny-qwen3': preset({
    ...TINY,
    modelType: 'qwen3',
    headDim: 32,
    ropeTheta: 1000000,
    qkNorm: true,
  }),
  'tiny-mistral': preset({
    ...TINY,
    modelType: 'mistral',
    layerWindows: [16, 16],
  }),
};
