// What one call of the stage program works on: which layers the stage holds, and the
// micro-batch of BatchLoRA segments whose rows it runs.
import type { Tensor } from '../tensor.js';
import type { LoraSpec } from '../lora/adapter.js';

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
