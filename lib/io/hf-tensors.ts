// The tensors of a LLaMA-family checkpoint in HF naming: every name and shape a config implies
// (expectedTensors), one layer's share, one pipeline stage's share, and the parameter count.
// Its own file: the model directory reader, the random-model writer and the CLI all ask these
// questions of a config without opening any file.
import { LORA_TARGETS, projectionModule, projectionShape, type LlamaConfig, type LoraTarget } from '../model/config.js';

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
