// An adapter's full trainable state (all layers) and its conversions: PEFT tensors for the
// adapter files, per-stage slices for the pipeline. The flat layout is lora/adapter.ts
// sliceLayout(0, numLayers): layer-major, so a stage's slice [lo, hi) is one contiguous range.
import { sliceLayout, type LoraSpec, peftInit } from './adapter.js';
import type { LlamaConfig, LoraTarget } from '../model/config.js';
import { projectionModule } from '../model/config.js';
import type { StagePlan } from '../model/batch.js';
import type { AdapterWeights } from '../io/peft.js';
import type { AdamwHyper } from '../native.js';

/** An adapter's trainable state over ALL layers, in the flat layout of lora/adapter.ts sliceLayout(0, L). */
export interface AdapterState {
  params: Float32Array;
  m: Float32Array;
  v: Float32Array;
  /** Optimizer steps applied. */
  version: number;
}

/** One AdamW step of one adapter, as every stage applies it to its slice. */
export interface StepParams extends AdamwHyper {
  /** Gradient scale (clipping): min(1, max_norm / ‖g‖). */
  gradScale: number;
}

/** [begin, end) of a stage's slice in the full flat layout. */
export function stageSliceRange(
  config: LlamaConfig,
  spec: LoraSpec,
  plan: Pick<StagePlan, 'lo' | 'hi'>,
): [number, number] {
  const before = sliceLayout(config, spec, 0, plan.lo).size;
  const mine = sliceLayout(config, spec, plan.lo, plan.hi).size;
  return [before, before + mine];
}

/** A stage's slice of an adapter's full state (views, no copies). */
export function stageSlice(
  config: LlamaConfig,
  spec: LoraSpec,
  plan: Pick<StagePlan, 'lo' | 'hi'>,
  state: AdapterState,
): AdapterState {
  const [b, e] = stageSliceRange(config, spec, plan);
  return {
    params: state.params.subarray(b, e),
    m: state.m.subarray(b, e),
    v: state.v.subarray(b, e),
    version: state.version,
  };
}

/** Stage slices, in stage order, joined back into the adapter's full state. */
export function joinSlices(parts: AdapterState[]): AdapterState {
  const cat = (k: 'params' | 'm' | 'v') => {
    const out = new Float32Array(parts.reduce((n, p) => n + p[k].length, 0));
    let o = 0;
    for (const p of parts) {
      out.set(p[k], o);
      o += p[k].length;
    }
    return out;
  };
  return { params: cat('params'), m: cat('m'), v: cat('v'), version: parts[0]!.version };
}

export function freshState(config: LlamaConfig, spec: LoraSpec): AdapterState {
  return startingState(peftInit(config, spec, 0, config.numLayers));
}

/** The state before the first optimizer step from these weights: AdamW moments zero. */
export function startingState(params: Float32Array): AdapterState {
  return { params, m: new Float32Array(params.length), v: new Float32Array(params.length), version: 0 };
}

/** A copy that shares no memory with `s` (a point to go back to). */
export function cloneState(s: AdapterState): AdapterState {
  return { params: s.params.slice(), m: s.m.slice(), v: s.v.slice(), version: s.version };
}

/** PEFT tensor name of one LoRA matrix. */
export function peftName(layer: number, target: LoraTarget, which: 'A' | 'B'): string {
  return `base_model.model.model.layers.${layer}.${projectionModule(target)}.lora_${which}.weight`;
}

/** Flat buffer → {PEFT name → [shape, values]} (views, no copies). */
export function toPeftTensors(
  config: LlamaConfig,
  spec: LoraSpec,
  flat: Float32Array,
): Map<string, { shape: [number, number]; data: Float32Array }> {
  const out = new Map<string, { shape: [number, number]; data: Float32Array }>();
  for (const m of sliceLayout(config, spec, 0, config.numLayers).modules) {
    out.set(peftName(m.layer, m.target, 'A'), {
      shape: [spec.r, m.inDim],
      data: flat.subarray(m.aOffset, m.aOffset + spec.r * m.inDim),
    });
    out.set(peftName(m.layer, m.target, 'B'), {
      shape: [m.outDim, spec.r],
      data: flat.subarray(m.bOffset, m.bOffset + m.outDim * spec.r),
    });
  }
  return out;
}

/** {PEFT name → values} → flat buffer; every expected tensor must be present with the right size. */
export function fromPeftTensors(
  config: LlamaConfig,
  spec: LoraSpec,
  get: (name: string) => Float32Array | undefined,
  where: string,
): Float32Array {
  const { modules, size } = sliceLayout(config, spec, 0, config.numLayers);
  const flat = new Float32Array(size);
  for (const m of modules) {
    for (const [which, off, n, shape] of [
      ['A', m.aOffset, spec.r * m.inDim, `[${spec.r}, ${m.inDim}]`],
      ['B', m.bOffset, m.outDim * spec.r, `[${m.outDim}, ${spec.r}]`],
    ] as const) {
      const name = peftName(m.layer, m.target, which);
      const v = get(name);
      if (!v) throw new Error(`${where}: tensor '${name}' is missing`);
      if (v.length !== n) throw new Error(`${where}: tensor '${name}' has ${v.length} elements, expected ${shape}`);
      flat.set(v, off);
    }
  }
  return flat;
}

/** The flat state's weights as the PEFT in-memory adapter (lib/io/peft.ts). */
export function toAdapterWeights(
  config: LlamaConfig,
  spec: LoraSpec,
  flat: Float32Array,
  baseModel: string | null,
): AdapterWeights {
  const layers: AdapterWeights['layers'] = Array.from({ length: config.numLayers }, () => ({}));
  for (const m of sliceLayout(config, spec, 0, config.numLayers).modules) {
    layers[m.layer]![m.target] = {
      a: flat.slice(m.aOffset, m.aOffset + spec.r * m.inDim),
      b: flat.slice(m.bOffset, m.bOffset + m.outDim * spec.r),
    };
  }
  return {
    r: spec.r,
    loraAlpha: spec.alpha,
    loraDropout: spec.dropout,
    targetModules: [...spec.targets],
    useRslora: spec.useRslora,
    baseModelNameOrPath: baseModel,
    layers,
  };
}

/** A loaded PEFT adapter → flat weights in the layout of `spec` (which must match its r/targets). */
export function fromAdapterWeights(
  config: LlamaConfig,
  spec: LoraSpec,
  a: AdapterWeights,
  where: string,
): Float32Array {
  if (a.r !== spec.r) throw new Error(`${where}: adapter has r=${a.r}, the job asks for r=${spec.r}`);
  return fromPeftTensors(
    config,
    spec,
    (name) => {
      const m = /layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_([AB])\.weight$/.exec(name)!;
      const pair = a.layers[Number(m[1])]?.[m[2] as LoraTarget];
      return m[3] === 'A' ? pair?.a : pair?.b;
    },
    where,
  );
}
