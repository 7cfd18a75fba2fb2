// What one call of the stage program works on: which layers the stage holds, and the
// micro-batch of BatchLoRA segments whose rows it runs.
import type { Tensor } from '../tensor.js';
import type { LoraSpec } from '../lora/spec.js';
import type { LoraTarget } from './config.js';

export interface StagePlan {
  /** Layers [lo, hi) of the model. */
  lo: number;
  hi: number;
  /** Holds the token embedding (input = token ids). */
  first: boolean;
  /** Holds the final norm, the LM head and the loss. */
  last: boolean;
  /**
   * The stage before the last only: it also runs the final norm, LM head and loss (forward and
   * backward) on this fraction of each training micro-batch's targeted rows, so the split can
   * balance below a whole layer (the head has no trainable weights and its rows are independent,
   * so who computes a row changes no bit). The last stage hands it those rows' final hidden
   * states and gets their gradients back (lib/schedule/split.ts decides the share).
   */
  headShare?: number;
  /**
   * Below a layer: the stage's last layer (hi − 1) runs only its attention half (norm, q/k/v,
   * RoPE, attention, o_proj and the residual add); the next stage runs its MLP half and has
   * firstMlpOnly. The hidden state between the halves is [N, H] like the one between layers, and
   * both halves run exactly the ops of the whole layer in the same order, so no bit changes.
   */
  lastAttnOnly?: boolean;
  /** The stage's first layer (lo) runs only its MLP half (norm, gate/up, SwiGLU, down_proj and the residual add). */
  firstMlpOnly?: boolean;
}

/** Which half of a decoder layer a stage runs: both, only the attention half, only the MLP half. */
export type LayerPart = 'all' | 'attn' | 'mlp';

/** The part of model layer `layer` (in [plan.lo, plan.hi)) that a stage runs. */
export function layerPart(plan: StagePlan, layer: number): LayerPart {
  if (plan.firstMlpOnly && layer === plan.lo) return 'mlp';
  if (plan.lastAttnOnly && layer === plan.hi - 1) return 'attn';
  return 'all';
}

/** The projections of a layer's attention half; the others (gate, up, down) are its MLP's. */
export function isAttentionTarget(t: LoraTarget): boolean {
  return t === 'q_proj' || t === 'k_proj' || t === 'v_proj' || t === 'o_proj';
}

/** A plan's half-layer fields make sense: an error naming the stage and the field otherwise. */
export function checkPlanHalves(plan: StagePlan, where = `stage [${plan.lo}, ${plan.hi})`): void {
  if (plan.firstMlpOnly && plan.first)
    throw new Error(`${where}: firstMlpOnly on the first stage (the attention half of layer ${plan.lo} has no stage)`);
  if (plan.lastAttnOnly && plan.last)
    throw new Error(`${where}: lastAttnOnly on the last stage (the MLP half of layer ${plan.hi - 1} has no stage)`);
  if (plan.firstMlpOnly && plan.lastAttnOnly && plan.hi - plan.lo < 2)
    throw new Error(`${where}: firstMlpOnly and lastAttnOnly on a stage of one layer (it would run neither half)`);
}

/** Whether a stage holds the final norm and the LM head (the last stage, or one with a head share). */
export function holdsHead(plan: StagePlan): boolean {
  return plan.last || (plan.headShare ?? 0) > 0;
}

/** One adapter's rows in a micro-batch. */
export interface Segment {
  adapter: number;
  rowStart: number;
  rowEnd: number;
  /** The micro-batch's place in its adapter's data (supervisor microSerial): dropout masks are a function of (seed, serial, layer, module, row). */
  serial: number;
}

/** A segment as memory accounting sees it: how many rows, and the LoRA of the adapter they train. */
export interface SegmentSpec {
  rows: number;
  spec: LoraSpec;
}

/** Per-micro-batch tensors on this stage's device (often views of shared-memory slots). */
export interface MicroBatchTensors {
  /** i32 [N]: position of each row within its own sequence. */
  positions: Tensor;
  /** i32 [nseq + 1]: row offsets of the packed sequences. */
  cuSeqlens: Tensor;
  /** i32 [N], last stage: the token each row must predict (labels shifted within each sequence; -100 = none). */
  targets?: Tensor;
  /** f32 [N], last stage: each row's weight in its adapter's loss (1/target tokens of the step). */
  weights?: Tensor;
}

export interface MicroBatch {
  id: number;
  numTokens: number;
  segments: Segment[];
  tensors: MicroBatchTensors;
}

/** A BatchLoRA micro-batch as the supervisor builds it (host memory). */
export interface MicroBatchData {
  id: number;
  segments: Segment[];
  /** i32 [N] token ids */
  tokens: Int32Array;
  /** i32 [N] position within own sequence */
  positions: Int32Array;
  /** i32 [nseq + 1] */
  cuSeqlens: Int32Array;
  /** i32 [N] next-token targets (-100 = none), shifted within each sequence */
  targets: Int32Array;
  /** f32 [N] per-row loss weight: 1 / target tokens of the adapter's step, 0 where no target */
  weights: Float32Array;
}

export function checkSegments(mb: MicroBatch): void {
  let prev = 0;
  for (const s of mb.segments) {
    if (!(s.rowStart >= prev && s.rowEnd > s.rowStart && s.rowEnd <= mb.numTokens)) {
      throw new Error(
        `micro-batch ${mb.id}: segment of adapter ${s.adapter} [${s.rowStart}, ${s.rowEnd}) is out of order or outside 0..${mb.numTokens}`,
      );
    }
    prev = s.rowEnd;
  }
}
