// Every message and shared type between the supervisor and the stages, in one file.
// Requests carry integer ids; replies name the id they answer. Tensor data never travels
// inside a message: it lives in SharedArrayBuffer slots (actors/shm.ts) named by slot index.
import type { BaseFormat } from '../lib/model/weights.js';
import type { LoraSpec } from '../lib/lora/adapter.js';
import type { LlamaConfig } from '../lib/model/config.js';
import type { MicroBatchData, Segment, SegmentSpec, StagePlan } from '../lib/model/batch.js';
import type { AdapterState, StepParams } from '../lib/lora/state.js';
import type { FaultSpec } from '../lib/faults.js';
import type { ScheduleRecord } from '../lib/schedule/record.js';
import type { WireError } from '../lib/errors.js';
import type { MessagePort } from 'node:worker_threads';

/**
 * A monotonic clock in ms shared by every thread of the process (CLOCK_MONOTONIC via
 * process.hrtime), unlike performance.now(), whose origin is each worker thread's own start.
 */
export function clockMs(): number {
  return Number(process.hrtime.bigint()) / 1e6;
}

/**
 * What the supervisor needs from a pipeline of stages, whatever carries the messages:
 * LocalPipeline (stages in this thread; tests and the single-device trainer) or
 * ActorPipeline (one worker thread per device, SharedArrayBuffer slots).
 */
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

// ---- the actor messages (ActorPipeline): supervisor ⇄ stage worker, stage ⇄ stage

export interface InitMsg {
  type: 'init';
  id: number;
  stage: number;
  plan: StagePlan;
  modelDir: string;
  device: string;
  threads: number;
  budget: number;
  /** CPU ids to pin the stage's compute threads to, one per thread (lib/schedule/cores.ts); absent: not pinned. */
  cores?: number[];
  /** Activation recomputation (StageOptions.recompute). */
  recompute?: boolean;
  /** The frozen base's compute dtype and quantization (lib/model/weights.ts). */
  base?: BaseFormat;
  /** SharedArrayBuffers of the slot slab (actors/shm.ts). */
  slab: SharedArrayBuffer;
  slotCount: number;
  slotBytes: number;
  /** Fault injection for this stage (see lib/faults.ts). */
  faults: FaultSpec[];
  /** Int32 per fault, set to 1 by the stage just before that fault takes effect (a restarted stage gets only the ones not fired). */
  faultFlags?: SharedArrayBuffer;
  heartbeatMs: number;
  /** The pipeline's time origin on the clockMs() clock: every stage stamps its records relative to it. */
  epochMs: number;
  /** Number of stages in the pipeline (the last one turns a Forward into a Backward). */
  stages: number;
  /** Recovery epoch the stage starts at: a restarted stage ignores what its neighbours still send for a dropped attempt. */
  minEpoch: number;
}

/**
 * Hands a stage the MessagePort to a neighbour (transferred with the message): Forward goes
 * out on `next`, Backward on `prev`, straight to the other worker, not through the supervisor.
 * Sent at start and whenever a neighbour is restarted (its old port is closed).
 */
export interface LinkMsg {
  type: 'link';
  id: number;
  side: 'prev' | 'next';
  port: MessagePort;
}

export interface ForwardMsg {
  type: 'forward';
  /** Recovery epoch: a stage discards messages of an older epoch (they belong to a dropped attempt). */
  epoch: number;
  mb: number;
  numTokens: number;
  nseq: number;
  segments: Segment[];
  /** Optimizer version each adapter must have reached on this stage before this forward runs. */
  versions: Record<number, number>;
  /** Slot holding the micro-batch header data (tokens, positions, targets, ...). */
  metaSlot: number;
  /** Slot with the input hidden states (non-first stages). */
  inSlot: number;
  /** Slot the output hidden states go to (non-last stages). */
  outSlot: number;
  /** hidden[s] = the slot of stage s's output (S-1 of them): a stage names the next stage's slots itself. */
  hidden: number[];
  /** Slot of dL/d(hidden) that travels back through the stages (-1: no backward). */
  gradSlot: number;
  /**
   * Head share (StagePlan.headShare): rows [headRow, numTokens) get their norm/head/loss on the
   * stage before the last; the last stage puts the final hidden states in `headSlot` and sends
   * HeadMsg. numTokens: no share (evaluation, one stage, or no share in the split).
   */
  headRow: number;
  headSlot: number;
  train: boolean;
}

/** The last stage → the stage before: run the head on rows [rowStart, numTokens) (HeadMsg of a ForwardMsg). */
export interface HeadMsg {
  type: 'head';
  epoch: number;
  mb: number;
  numTokens: number;
  nseq: number;
  rowStart: number;
  metaSlot: number;
  /** Final hidden states (all rows). */
  headSlot: number;
  /** dL/d(final hidden) of rows [rowStart, numTokens) goes here. */
  gradSlot: number;
}

/** The share's answer: its rows' losses are in the meta slot, their gradients in the gradient slot. */
export interface HeadedMsg {
  type: 'headed';
  epoch: number;
  mb: number;
}

export interface BackwardMsg {
  type: 'backward';
  epoch: number;
  mb: number;
  /** Slot holding dL/d(output); this stage turns it into dL/d(input) in place. */
  gradSlot: number;
}

export interface StepMsg {
  type: 'step';
  id: number;
  adapter: number;
  params: StepParams;
  /** Also return Σ grad² of the slice, taken before the step. */
  measure?: boolean;
}

export interface ControlMsg {
  type: 'addAdapter' | 'removeAdapter' | 'exportAdapter' | 'gradSumsq' | 'memory' | 'drop' | 'shutdown' | 'poison';
  id: number;
  adapter?: number;
  spec?: LoraSpec;
  state?: AdapterState;
  mbs?: number[];
  /** 'drop': the new minimum epoch. */
  epoch?: number;
}

export type ToStage = InitMsg | ForwardMsg | BackwardMsg | HeadMsg | HeadedMsg | StepMsg | ControlMsg | LinkMsg;

export type FromStage =
  | { type: 'ready'; id: number; stage: number }
  | { type: 'reply'; id: number; value?: unknown; error?: WireError }
  /**
   * mb is through the pipeline (losses in its meta slot): sent by the last stage after an
   * evaluation or a one-stage training message, by stage 0 after the last Backward. Forward
   * and Backward between stages go straight from stage to stage (LinkMsg).
   */
  | { type: 'done'; epoch: number; stage: number; mb: number }
  | { type: 'error'; epoch: number; stage: number; mb?: number; error: WireError }
  | { type: 'heartbeat'; stage: number; handled: number; busyMs: number }
  | { type: 'record'; rec: ScheduleRecord };

// ---- events a job streams to its user

export type JobEvent =
  | { type: 'state'; adapter: string; state: JobState; time: number }
  | {
      type: 'step';
      adapter: string;
      step: number;
      totalSteps: number;
      loss: number;
      lr: number;
      tokens: number;
      gradNorm: number;
      time: number;
    }
  | { type: 'eval'; adapter: string; step: number; loss: number; perplexity: number; tokens: number; time: number }
  | { type: 'checkpoint'; adapter: string; step: number; path: string; time: number }
  | { type: 'fault'; adapter?: string; fault: string; detail: string; time: number }
  /** on_nan: rollback: the adapter went back from `fromStep` to its checkpoint at `toStep`; its learning rate is now lrScale × the configured one. */
  | {
      type: 'rollback';
      adapter: string;
      fromStep: number;
      toStep: number;
      lrScale: number;
      rollbacks: number;
      reason: string;
      time: number;
    }
  | { type: 'done'; adapter: string; steps: number; loss: number; path?: string; time: number }
  /** A greedy completion of one of eval.prompts, with the adapter before training or after it. */
  | {
      type: 'sample';
      adapter: string;
      step: number;
      when: 'before' | 'after';
      prompt: string;
      text: string;
      time: number;
    }
  | { type: 'error'; adapter: string; message: string; time: number };

export type JobState = 'queued' | 'loading' | 'running' | 'paused' | 'parked' | 'done' | 'failed' | 'cancelled';
