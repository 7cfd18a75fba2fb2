// Loads the frozen base weights one stage needs (its layers, plus the embedding on the first
// stage and the final norm + LM head on the last) from a Hugging Face model directory,
// straight from the safetensors files into device memory.
//
// The base's format (BaseFormat): with compute_dtype bf16 the float weights are kept in bf16;
// with `quantize` the decoder linears are quantized on the device as they load (QLoRA style:
// embeddings, norms and the LM head keep their dtype), and a checkpoint saved quantized by
// bitsandbytes loads its linears as they are stored.
import type { Device, Tensor, DType } from '../tensor.js';
import { native, type QuantDType } from '../native.js';
import { openModelDir, type ModelDir } from '../io/hf-model.js';
import { QUANT_DTYPE, quantLayout, type QuantizeMode } from '../io/bnb.js';
import { LORA_TARGETS, projectionShape } from './config.js';
import { holdsHead, isAttentionTarget, layerPart, type StagePlan } from './batch.js';
import type { LayerWeights } from './layer.js';
import type { StageWeights } from './stage.js';

/** How the frozen base is held and computed with (config compute_dtype / quantize / pack_weights). */
export interface BaseFormat {
  /** f32 (default), or bf16: bf16 base weights and GEMM operands, f32 accumulation. */
  computeDtype?: 'f32' | 'bf16';
  /** Quantize the decoder linears at load. */
  quantize?: QuantizeMode;
  /** Pack the decoder linears and the LM head once into the CPU GEMM's panels (see PackWeights). */
  packWeights?: PackWeights;
}

/**
 * Frozen weights packed once at load (Device.packWeights) on CPU devices: the GEMMs of the linear
 * layers stop re-packing their weight on every call (~16% of a projection's time at 256 rows per
 * message, ~6% at 1024), for the panels' memory: about twice the weights, one panel set for the
 * forward GEMM and one for the backward. 'auto' (the default) packs where the panels are no larger
 * than the weights they come from (f32 weights, or bf16 ones with bf16 compute; never quantized
 * ones, whose panels would undo the quantization) and take at most half of the device memory left
 * after the weights; true packs every linear whatever it costs; false never packs.
 */
export type PackWeights = 'auto' | boolean;

export interface LoadWeightsOptions extends BaseFormat {
  /** Storage dtype on the device: keep the file's (default) or convert (e.g. f32 → bf16). */
  dtype?: DType;
}

/** The quantization the decoder linears end up in (the checkpoint's, or the one asked for), checked for conflicts. */
export function linearQuantization(dir: ModelDir, quantize?: QuantizeMode): QuantizeMode | undefined {
  if (dir.quantization && quantize && quantize !== dir.quantization) {
    throw new Error(
      `${dir.dir}: the checkpoint is saved quantized as ${dir.quantization} (config.json quantization_config); quantize: ${quantize} cannot re-quantize it (omit quantize, or set it to ${dir.quantization})`,
    );
  }
  return dir.quantization ?? quantize;
}

/** The dtype float base weights are stored in on the device. */
function floatDtype(dir: ModelDir, o: LoadWeightsOptions): DType | undefined {
  return o.dtype ?? (o.computeDtype === 'bf16' ? 'bf16' : undefined);
}

export async function loadStageWeights(
  device: Device,
  model: ModelDir | string,
  plan: StagePlan,
  options: LoadWeightsOptions = {},
): Promise<StageWeights> {
  const dir = typeof model === 'string' ? openModelDir(model) : model;
  const c = dir.config;
  const loaded: Tensor[] = [];
  const q = linearQuantization(dir, options.quantize);
  const wd = floatDtype(dir, options);
  const load = async (name: string, dtype?: DType) => {
    const t = await dir.loadTensor(device, name, dtype ? { dtype } : {});
    loaded.push(t);
    return t;
  };
  // A decoder linear: as stored when the checkpoint is quantized, else quantized here from the
  // file's floats (one float tensor at a time is resident beside the quantized ones).
  const linear = async (name: string) => {
    if (!q || dir.isQuantized(name)) return load(name, dir.isQuantized(name) ? undefined : wd);
    const src = await dir.loadTensor(device, name);
    try {
      const t = device.alloc(QUANT_DTYPE[q], src.shape);
      loaded.push(t);
      await device.run([{ op: 'quantize', dst: t, src }]);
      return t;
    } finally {
      src.free();
    }
  };
  // Norm weights are tiny and read every step: keep them f32.
  try {
    const layers: LayerWeights[] = [];
    for (let i = plan.lo; i < plan.hi; i++) {
      const p = `model.layers.${i}.`;
      // a layer cut between two stages (StagePlan.lastAttnOnly): each loads only its half's weights
      const part = layerPart(plan, i);
      const attn = part !== 'mlp',
        mlp = part !== 'attn';
      const none = null as unknown as Tensor;
      layers.push({
        attnNorm: attn ? await load(`${p}input_layernorm.weight`, 'f32') : none,
        q: attn ? await linear(`${p}self_attn.q_proj.weight`) : none,
        k: attn ? await linear(`${p}self_attn.k_proj.weight`) : none,
        v: attn ? await linear(`${p}self_attn.v_proj.weight`) : none,
        o: attn ? await linear(`${p}self_attn.o_proj.weight`) : none,
        mlpNorm: mlp ? await load(`${p}post_attention_layernorm.weight`, 'f32') : none,
        gate: mlp ? await linear(`${p}mlp.gate_proj.weight`) : none,
        up: mlp ? await linear(`${p}mlp.up_proj.weight`) : none,
        down: mlp ? await linear(`${p}mlp.down_proj.weight`) : none,
        // biases and q/k norm weights are small: f32 like the norms
        ...(c.qkvBias && attn
          ? {
              qBias: await load(`${p}self_attn.q_proj.bias`, 'f32'),
              kBias: await load(`${p}self_attn.k_proj.bias`, 'f32'),
              vBias: await load(`${p}self_attn.v_proj.bias`, 'f32'),
            }
          : {}),
        ...(c.qkNorm && attn
          ? {
              qNorm: await load(`${p}self_attn.q_norm.weight`, 'f32'),
              kNorm: await load(`${p}self_attn.k_norm.weight`, 'f32'),
            }
          : {}),
      });
    }
    const w: StageWeights = { layers };
    if (plan.first) w.embed = await load('model.embed_tokens.weight', wd);
    if (holdsHead(plan)) {
      w.norm = await load('model.norm.weight', 'f32');
      w.head = c.tieWordEmbeddings
        ? (w.embed ?? (await load('model.embed_tokens.weight', wd)))
        : await load('lm_head.weight', wd);
    }
    if (device.kind === 'cpu') {
      const linears = [...w.layers.flatMap((l) => LINEAR_FIELDS.map((f) => l[f])), w.head].filter((t) => !!t);
      const pack = packedWeights(linears, options, device.memory().free).chosen;
      if (pack.length) w.packedBytes = await device.packWeights(pack, { bf16: options.computeDtype === 'bf16' });
    }
    return w;
  } catch (e) {
    for (const t of loaded) t.free();
    throw e;
  }
}

/** The projections of a layer, the weights packing applies to (with the LM head). */
const LINEAR_FIELDS = ['q', 'k', 'v', 'o', 'gate', 'up', 'down'] as const satisfies ReadonlyArray<keyof LayerWeights>;

/**
 * The weights PackWeights packs (loaded tensors, or planned shapes and dtypes) and their panels'
 * bytes, given the device memory free after the weights: one rule for the loader and the plan.
 */
function packedWeights<W extends { shape: number[]; dtype: DType | QuantDType }>(
  weights: W[],
  o: BaseFormat,
  free: number,
): { chosen: W[]; bytes: number } {
  const mode = o.packWeights ?? 'auto';
  if (mode === false) return { chosen: [], bytes: 0 };
  const bf16 = o.computeDtype === 'bf16';
  // auto: only where the panels take no more bytes than the weight (f32, or bf16 with bf16 compute)
  const chosen = weights.filter((t) => mode === true || t.dtype === (bf16 ? 'bf16' : 'f32'));
  const bytes = chosen.reduce((s, t) => s + native().gemmPanelBytes(t.shape[0]!, t.shape[1]!, bf16), 0);
  return mode === true || 2 * bytes <= free ? { chosen, bytes } : { chosen: [], bytes: 0 };
}

export function freeStageWeights(w: StageWeights): void {
  const seen = new Set<Tensor>();
  const all = [w.embed, w.norm, w.head, ...w.layers.flatMap((l) => Object.values(l))];
  for (const t of all) {
    if (!t || seen.has(t)) continue;
    seen.add(t);
    t.free();
  }
}

/** Bytes the base weights of a stage take on its device (as the allocator counts them), by part. */
export function stageWeightBreakdown(
  dir: ModelDir,
  plan: StagePlan,
  options: LoadWeightsOptions = {},
  /** The device's byte budget: with it, the packed panels PackWeights would add (`panels`). */
  budget?: number,
): { linears: number; other: number; panels: number; linearFormat: string; floatFormat: DType } {
  const c = dir.config;
  const size = (d: DType) => (d === 'f32' || d === 'i32' ? 4 : 2);
  const fileDtype: DType = c.torchDtype === 'bfloat16' ? 'bf16' : c.torchDtype === 'float16' ? 'f16' : 'f32';
  const fd = floatDtype(dir, options) ?? fileDtype;
  const wb = size(fd);
  const q = linearQuantization(dir, options.quantize);
  const H = c.hiddenSize;
  const round = (b: number) => Math.max(256, Math.ceil(b / 256) * 256);
  const linearBytes = (out: number, inp: number) =>
    round(q ? quantLayout(QUANT_DTYPE[q] as QuantDType, out, inp).bytes : out * inp * wb);
  let linears = 0;
  let bytes = 0;
  const linearDtype = q ? (QUANT_DTYPE[q] as QuantDType) : fd;
  const packable: Array<{ shape: number[]; dtype: DType | QuantDType }> = []; // the linears and the head
  for (let i = plan.lo; i < plan.hi; i++) {
    const part = layerPart(plan, i);
    bytes += (part === 'all' ? 2 : 1) * round(H * 4);
    for (const t of LORA_TARGETS) {
      if (part !== 'all' && isAttentionTarget(t) !== (part === 'attn')) continue;
      const [out, inp] = projectionShape(c, t);
      linears += linearBytes(out, inp);
      packable.push({ shape: [out, inp], dtype: linearDtype });
    }
    if (part === 'mlp') continue;
    if (c.qkvBias) bytes += round(c.numHeads * c.headDim * 4) + 2 * round(c.numKvHeads * c.headDim * 4);
    if (c.qkNorm) bytes += 2 * round(c.headDim * 4);
  }
  if (plan.first) bytes += round(c.vocabSize * H * wb);
  if (holdsHead(plan)) bytes += round(H * 4) + (c.tieWordEmbeddings && plan.first ? 0 : round(c.vocabSize * H * wb));
  if (holdsHead(plan)) packable.push({ shape: [c.vocabSize, H], dtype: fd });
  // the same choice as loadStageWeights makes on a CPU device, from the planned sizes
  const panels = budget === undefined ? 0 : packedWeights(packable, options, budget - linears - bytes).bytes;
  return { linears, other: bytes, panels, linearFormat: q ?? fd, floatFormat: fd };
}

/** Bytes the base weights of a stage take on its device. */
export function stageWeightBytes(
  dir: ModelDir,
  plan: StagePlan,
  options: LoadWeightsOptions = {},
  budget?: number,
): number {
  const b = stageWeightBreakdown(dir, plan, options, budget);
  return b.linears + b.other + b.panels;
}
