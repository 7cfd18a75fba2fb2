// Loads the frozen base weights one stage needs (its layers, plus the embedding on the first
// stage and the final norm + LM head on the last) from a Hugging Face model directory,
// straight from the safetensors files into device memory.
import type { Device, Tensor, DType } from '../tensor.js';
import { openModelDir, type ModelDir } from '../io/hf-model.js';
import { holdsHead, type StagePlan } from './batch.js';
import type { LayerWeights } from './layer.js';
import type { StageWeights } from './stage.js';

export interface LoadWeightsOptions {
  /** Storage dtype on the device: keep the file's (default) or convert (e.g. f32 → bf16). */
  dtype?: DType;
}

export async function loadStageWeights(device: Device, model: ModelDir | string, plan: StagePlan, options: LoadWeightsOptions = {}): Promise<StageWeights> {
  const dir = typeof model === 'string' ? openModelDir(model) : model;
  const c = dir.config;
  const loaded: Tensor[] = [];
  const load = async (name: string, dtype?: DType) => {
    const t = await dir.loadTensor(device, name, dtype ? { dtype } : {});
    loaded.push(t);
    return t;
  };
  // Norm weights are tiny and read every step: keep them f32.
  const wd = options.dtype;
  try {
    const layers: LayerWeights[] = [];
    for (let i = plan.lo; i < plan.hi; i++) {
      const p = `model.layers.${i}.`;
      layers.push({
        attnNorm: await load(`${p}input_layernorm.weight`, 'f32'),
        q: await load(`${p}self_attn.q_proj.weight`, wd),
        k: await load(`${p}self_attn.k_proj.weight`, wd),
        v: await load(`${p}self_attn.v_proj.weight`, wd),
        o: await load(`${p}self_attn.o_proj.weight`, wd),
        mlpNorm: await load(`${p}post_attention_layernorm.weight`, 'f32'),
        gate: await load(`${p}mlp.gate_proj.weight`, wd),
        up: await load(`${p}mlp.up_proj.weight`, wd),
        down: await load(`${p}mlp.down_proj.weight`, wd),
        // biases and q/k norm weights are small: f32 like the norms
        ...(c.qkvBias
          ? { qBias: await load(`${p}self_attn.q_proj.bias`, 'f32'), kBias: await load(`${p}self_attn.k_proj.bias`, 'f32'), vBias: await load(`${p}self_attn.v_proj.bias`, 'f32') }
          : {}),
        ...(c.qkNorm ? { qNorm: await load(`${p}self_attn.q_norm.weight`, 'f32'), kNorm: await load(`${p}self_attn.k_norm.weight`, 'f32') } : {}),
      });
    }
    const w: StageWeights = { layers };
    if (plan.first) w.embed = await load('model.embed_tokens.weight', wd);
    if (holdsHead(plan)) {
      w.norm = await load('model.norm.weight', 'f32');
      w.head = c.tieWordEmbeddings ? (w.embed ?? (await load('model.embed_tokens.weight', wd))) : await load('lm_head.weight', wd);
    }
    return w;
  } catch (e) {
    for (const t of loaded) t.free();
    throw e;
  }
}

export function freeStageWeights(w: StageWeights): void {
  const seen = new Set<Tensor>();
  const all = [w.embed, w.norm, w.head, ...w.layers.flatMap((l) => Object.values(l))];
  for (const t of all) if (t && !seen.has(t)) (seen.add(t), t.free());
}

/** Bytes the base weights of a stage take on its device. */
export function stageWeightBytes(dir: ModelDir, plan: StagePlan, dtype?: DType): number {
  const c = dir.config;
  const size = (d: DType) => (d === 'f32' || d === 'i32' ? 4 : 2);
  const fileDtype: DType = c.torchDtype === 'bfloat16' ? 'bf16' : c.torchDtype === 'float16' ? 'f16' : 'f32';
  const wb = size(dtype ?? fileDtype);
  const H = c.hiddenSize, I = c.intermediateSize, q = c.numHeads * c.headDim, kv = c.numKvHeads * c.headDim;
  const round = (b: number) => Math.max(256, Math.ceil(b / 256) * 256);
  let bytes = 0;
  for (let i = plan.lo; i < plan.hi; i++) {
    bytes += 2 * round(H * 4) + round(q * H * wb) + 2 * round(kv * H * wb) + round(H * q * wb) + 2 * round(I * H * wb) + round(H * I * wb);
    if (c.qkvBias) bytes += round(q * 4) + 2 * round(kv * 4);
    if (c.qkNorm) bytes += 2 * round(c.headDim * 4);
  }
  if (plan.first) bytes += round(c.vocabSize * H * wb);
  if (holdsHead(plan)) bytes += round(H * 4) + (c.tieWordEmbeddings && plan.first ? 0 : round(c.vocabSize * H * wb));
  return bytes;
}
