// The LLaMA-architecture config as mlora uses it (camelCase), read from a Hugging Face
// config.json by lib/io/hf-model.ts, and the presets `mlora make-model` writes.

export interface LlamaConfig {
  /** config.json model_type: llama, mistral, qwen2 (LLaMA-shaped ones only). */
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
}

/** The seven projections LoRA can target, in the order PEFT and HF name them. */
export const LORA_TARGETS = ['q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj'] as const;
export type LoraTarget = (typeof LORA_TARGETS)[number];

/** [out, in] of a projection in this model. */
export function projectionShape(c: LlamaConfig, target: LoraTarget): [number, number] {
  const q = c.numHeads * c.headDim;
  const kv = c.numKvHeads * c.headDim;
  switch (target) {
    case 'q_proj': return [q, c.hiddenSize];
    case 'k_proj': return [kv, c.hiddenSize];
    case 'v_proj': return [kv, c.hiddenSize];
    case 'o_proj': return [c.hiddenSize, q];
    case 'gate_proj': return [c.intermediateSize, c.hiddenSize];
    case 'up_proj': return [c.intermediateSize, c.hiddenSize];
    case 'down_proj': return [c.hiddenSize, c.intermediateSize];
  }
}

/** HF module path of a projection: self_attn.* or mlp.* */
export function projectionModule(target: LoraTarget): string {
  return target.endsWith('_proj') && ['gate_proj', 'up_proj', 'down_proj'].includes(target) ? `mlp.${target}` : `self_attn.${target}`;
}

export type PresetName = 'tiny' | 'small' | 'bench' | '1b';

function preset(p: Partial<LlamaConfig> & Pick<LlamaConfig, 'hiddenSize' | 'intermediateSize' | 'numLayers' | 'numHeads' | 'numKvHeads' | 'vocabSize'>): LlamaConfig {
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

/** Model presets: tiny (tests, seconds), small (the demo), bench (benchmarks), 1b (GPU benchmark). */
export const PRESETS: Record<PresetName, LlamaConfig> = {
  tiny: preset({ hiddenSize: 64, intermediateSize: 172, numLayers: 2, numHeads: 4, numKvHeads: 2, vocabSize: 512, maxPositionEmbeddings: 512 }),
  small: preset({ hiddenSize: 256, intermediateSize: 688, numLayers: 4, numHeads: 8, numKvHeads: 4, vocabSize: 2048, maxPositionEmbeddings: 1024 }),
  bench: preset({ hiddenSize: 512, intermediateSize: 1376, numLayers: 4, numHeads: 8, numKvHeads: 4, vocabSize: 8192 }),
  '1b': preset({ hiddenSize: 2048, intermediateSize: 5632, numLayers: 22, numHeads: 32, numKvHeads: 4, vocabSize: 32000, torchDtype: 'bfloat16' }),
};
