// What the scheduler needs of a pipeline of stages, whatever carries the micro-batches:
// LocalPipeline (actors/local.ts: every stage in this thread; tests and the single-device
// trainer) or ActorPipeline (actors/runtime.ts: one stage worker per device).
import type { LoraSpec } from '../lib/lora/adapter.js';
import type { LlamaConfig } from '../lib/model/config.js';
import type { MicroBatchData, SegmentSpec, StagePlan } from '../lib/model/batch.js';
import type { AdapterState, StepParams } from '../lib/lora/state.js';
import type { ScheduleRecord } from '../lib/schedule/record.js';

export interface Pipeline {
  readonly config: LlamaConfig;
  readonly plans: StagePlan[];
  readonly devices: string[];
  /** Most tokens one micro-batch message may hold. */
  readonly maxTokens: number;
  addAdapter(id: number, spec: LoraSpec, state: AdapterState): Promise<void>;
  removeAdapter(id: number): Promise<void>;
  exportAdapter(id: number): Promise<AdapterState>;
  /** Forward + loss + backward of one micro-batch through every stage; resolves with per-row losses. */
  train(mb: MicroBatchData): Promise<Float32Array>;
  /**
   * train() of a micro-batch of one adapter's next optimizer step, sent before that adapter's
   * step now under way (step(), called or about to be) has been applied: every stage runs its
   * forward only once it has applied the step there, so the result is the same as train() after
   * step() returned, and the micro-batch waits in the stages' queues instead of a round trip
   * through the scheduler. Absent: the scheduler waits for the step.
   */
  trainAfterStep?(mb: MicroBatchData): Promise<Float32Array>;
  /** Forward + loss only (no gradients, nothing saved). */
  evaluate(mb: MicroBatchData): Promise<Float32Array>;
  /** Σ grad² of an adapter over all stages. */
  gradSumsq(id: number): Promise<number>;
  /**
   * AdamW on every stage. With `measure`, Σ grad² over all stages (before the step) comes back
   * with it: one round trip when no clipping needs the norm first.
   */
  step(id: number, p: StepParams, measure?: boolean): Promise<{ sumsq?: number }>;
  /** Fault injection: makes an adapter's weights NaN (on the first stage). */
  poison(id: number): Promise<void>;
  /** Bytes per device: budget, used now, the most used since the stage started. */
  memory(): Promise<Array<{ device: string; budget: number; used: number; peak: number }>>;
  /** Bytes a micro-batch of these segments (and numSeqs packed sequences) would hold on each stage while in flight. */
  activationBytes(numTokens: number, segments: SegmentSpec[], numSeqs?: number): number[];
  /**
   * The part of activationBytes() a stage holds only while it runs the micro-batch (scratch, and
   * on the last stage everything): a stage that runs one message at a time holds at most one
   * message's transient bytes at once. Absent: every byte counts for every message in flight.
   */
  transientBytes?(numTokens: number, segments: SegmentSpec[], numSeqs?: number): number[];
  /** Bytes one adapter's slice takes on each stage. */
  adapterBytes(spec: LoraSpec): number[];
  schedule(): ScheduleRecord[];
  close(): Promise<void>;
  /**
   * Set by the supervisor: called when a stage ran out of memory on a micro-batch (which the
   * pipeline replays). Returns the new admission limit (micro-batch messages in flight), for the
   * fault report.
   */
  onOutOfMemory?: (stage: number) => number | undefined;
}
