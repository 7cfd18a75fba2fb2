// One adapter's LoRA weights on one stage: the slice of layers [lo, hi) that stage holds.
//
// Layout: all of the slice's A and B matrices live in ONE flat f32 buffer (params), with
// grads, AdamW m and v in three more buffers of the same layout. So the optimizer step,
// the gradient norm, zeroing, saving and parking are each one op or one copy, and the
// per-module A/B tensors are views into the flat buffers.
import type { Device, Tensor } from '../tensor.js';
import { LORA_TARGETS, projectionShape, type LlamaConfig, type LoraTarget } from '../model/config.js';
import { isAttentionTarget, layerPart, type StagePlan } from '../model/batch.js';
import { Rng } from '../rng.js';
import type { LoraSpec } from './spec.js';

export type { LoraSpec } from './spec.js';

export function loraScale(spec: Pick<LoraSpec, 'r' | 'alpha' | 'useRslora'>): number {
  return spec.useRslora ? spec.alpha / Math.sqrt(spec.r) : spec.alpha / spec.r;
}

export interface ModuleSlot {
  layer: number;
  target: LoraTarget;
  /** Element offsets into the flat buffers. */
  aOffset: number;
  bOffset: number;
  inDim: number;
  outDim: number;
}

/** A stage's halves of its first and last layer (StagePlan.firstMlpOnly / lastAttnOnly). */
export type LayerHalves = Pick<StagePlan, 'firstMlpOnly' | 'lastAttnOnly'>;

/**
 * Where each (layer, target) A and B sit in the flat buffers of a stage slice. The order is
 * layer-major, attention projections before the MLP's (LORA_TARGETS), so a slice that starts or
 * ends at a layer's MLP half is still one contiguous range of the full layout.
 */
export function sliceLayout(
  config: LlamaConfig,
  spec: LoraSpec,
  lo: number,
  hi: number,
  halves: LayerHalves = {},
): { modules: ModuleSlot[]; size: number } {
  const modules: ModuleSlot[] = [];
  let off = 0;
  for (let layer = lo; layer < hi; layer++) {
    const part = layerPart({ lo, hi, first: false, last: false, ...halves }, layer);
    for (const target of LORA_TARGETS) {
      if (!spec.targets.includes(target)) continue;
      if (part !== 'all' && isAttentionTarget(target) !== (part === 'attn')) continue;
      const [outDim, inDim] = projectionShape(config, target);
      modules.push({ layer, target, aOffset: off, bOffset: off + spec.r * inDim, inDim, outDim });
      off += spec.r * inDim + outDim * spec.r;
    }
  }
  return { modules, size: off };
}

/** PEFT's default init: A ~ Kaiming-uniform(a=√5) = U(-1/√in, 1/√in), B = 0; seeded per module. */
export function peftInit(
  config: LlamaConfig,
  spec: LoraSpec,
  lo: number,
  hi: number,
  halves: LayerHalves = {},
): Float32Array {
  const { modules, size } = sliceLayout(config, spec, lo, hi, halves);
  const out = new Float32Array(size);
  for (const m of modules) {
    const rng = new Rng(spec.seed, 'lora-init', m.layer, m.target);
    const bound = 1 / Math.sqrt(m.inDim);
    rng.fillUniform(out.subarray(m.aOffset, m.aOffset + spec.r * m.inDim), -bound, bound);
  }
  return out;
}

export interface StageAdapterTensors {
  a: Tensor;
  b: Tensor;
  da: Tensor;
  db: Tensor;
}

/** An adapter's slice on one stage: flat params/grads/moments plus per-module views. */
export class StageAdapter {
  readonly params: Tensor;
  readonly grads: Tensor;
  readonly m: Tensor;
  readonly v: Tensor;
  /** [1]: where Σ grad² of the slice is summed (its own, so a step allocates nothing and two adapters never share it). */
  readonly sumsq: Tensor;
  readonly modules: ModuleSlot[];
  readonly size: number;
  readonly scale: number;
  /** views[layer][target] */
  private readonly views = new Map<string, StageAdapterTensors>();
  /** Optimizer steps applied on this stage (the supervisor checks it before a Forward). */
  version = 0;

  constructor(
    readonly device: Device,
    readonly config: LlamaConfig,
    readonly spec: LoraSpec,
    readonly lo: number,
    readonly hi: number,
    init?: Float32Array,
    halves: LayerHalves = {},
  ) {
    const layout = sliceLayout(config, spec, lo, hi, halves);
    this.modules = layout.modules;
    this.size = layout.size;
    this.scale = loraScale(spec);
    const n = Math.max(1, this.size);
    this.params = device.alloc('f32', [n]);
    this.grads = device.alloc('f32', [n]);
    this.m = device.alloc('f32', [n]);
    this.v = device.alloc('f32', [n]);
    this.sumsq = device.alloc('f32', [1]);
    try {
      const values = init ?? peftInit(config, spec, lo, hi, halves);
      if (values.length !== this.size) {
        throw new Error(`adapter slice for layers [${lo}, ${hi}) has ${this.size} parameters, got ${values.length}`);
      }
      if (this.size > 0) this.params.write(values);
    } catch (e) {
      this.free();
      throw e;
    }
    for (const mod of this.modules) {
      const { r } = spec;
      const view = (t: Tensor, off: number, shape: number[]) => {
        const r = t.rows(off, off + shape[0]! * shape[1]!);
        const v = r.reshape(shape);
        r.free(); // else it holds the flat buffer after free() until GC
        return v;
      };
      this.views.set(`${mod.layer}/${mod.target}`, {
        a: view(this.params, mod.aOffset, [r, mod.inDim]),
        b: view(this.params, mod.bOffset, [mod.outDim, r]),
        da: view(this.grads, mod.aOffset, [r, mod.inDim]),
        db: view(this.grads, mod.bOffset, [mod.outDim, r]),
      });
    }
  }

  module(layer: number, target: LoraTarget): StageAdapterTensors | undefined {
    return this.views.get(`${layer}/${target}`);
  }

  /** Bytes this slice holds on its device: params, grads, m, v and the Σ grad² element. */
  static bytes(config: LlamaConfig, spec: LoraSpec, lo: number, hi: number, halves: LayerHalves = {}): number {
    const n = Math.max(1, sliceLayout(config, spec, lo, hi, halves).size);
    return 4 * allocBytes(n * 4) + allocBytes(4);
  }

  /** Full state (params + AdamW moments) for checkpoints and parking. */
  exportState(): { params: Float32Array; m: Float32Array; v: Float32Array; version: number } {
    const rd = (t: Tensor) => (t.read() as Float32Array).subarray(0, this.size);
    return { params: rd(this.params), m: rd(this.m), v: rd(this.v), version: this.version };
  }

  /** exportState() into the caller's arrays (`size` floats each): memory reused from step to step. */
  exportStateInto(dst: { params: Float32Array; m: Float32Array; v: Float32Array }): void {
    for (const k of ['params', 'm', 'v'] as const) {
      if (dst[k].length !== this.size)
        throw new Error(`exportStateInto: ${k} holds ${dst[k].length} floats, the slice has ${this.size}`);
      if (this.size > 0) this[k].read(dst[k]);
    }
  }

  importState(s: { params: Float32Array; m?: Float32Array; v?: Float32Array; version?: number }): void {
    if (s.params.length !== this.size)
      throw new Error(`importState: expected ${this.size} parameters, got ${s.params.length}`);
    if (this.size === 0) return;
    this.params.write(s.params);
    this.m.write(s.m ?? new Float32Array(this.size));
    this.v.write(s.v ?? new Float32Array(this.size));
    this.version = s.version ?? 0;
  }

  free(): void {
    for (const v of this.views.values()) for (const t of Object.values(v)) t.free();
    this.views.clear();
    for (const t of [this.params, this.grads, this.m, this.v, this.sumsq]) t.free();
  }
}

/** The device allocator's size classes (core/device.cc rounds every block up to 256 bytes). */
export function allocBytes(bytes: number): number {
  return Math.max(256, Math.ceil(bytes / 256) * 256);
}
