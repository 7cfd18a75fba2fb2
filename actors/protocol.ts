// Every message between the actor pipeline and its stages (and between neighbouring stages),
// one interface per message, each tagged by `type`, and the events a job streams to its user.
// Tensor data never travels inside a message: it lives in SharedArrayBuffer slots
// (actors/shm.ts) named by slot index.
//
// Two planes carry them (actors/rpc.ts says why each call is on the one it is on):
// - the ordered path: these messages on the stage's own port, into its priority mailbox
//   (actors/stage.ts). Forward, Backward and the head share go from stage to stage; Step,
//   Poison and Drop are requests with an integer id, answered by a ReplyMsg naming it, because
//   their order against the micro-batches matters; Link hands over a port.
// - the control plane: comlink calls on a second port (StageApi in actors/rpc.ts) for requests
//   whose order against the hot path does not matter (adapter load/export/evict, memory and
//   gradient queries, shutdown). They are not messages of this file.
import type { BaseFormat } from '../lib/model/weights.js';
import type { Segment, StagePlan } from '../lib/model/batch.js';
import type { StepParams } from '../lib/lora/state.js';
import type { StageSnapshot } from './shm.js';
import type { FaultSpec } from '../lib/faults.js';
import type { ScheduleRecord } from '../lib/schedule/record.js';
import type { WireError } from '../lib/errors.js';
import type { MessagePort } from 'node:worker_threads';

// ---- pipeline → stage worker, stage → stage

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
  originMs: number;
  /** Number of stages in the pipeline (the last one turns a Forward into a Backward). */
  stages: number;
  /** Recovery epoch the stage starts at: a restarted stage ignores what its neighbours still send for a dropped attempt. */
  minEpoch: number;
  /** The stage's end of its control-plane port: comlink serves StageApi (actors/rpc.ts) on it. */
  control: MessagePort;
}

/**
 * Hands a stage the MessagePort to a neighbour (transferred with the message): Forward goes
 * out on `next`, Backward on `prev`, straight to the other worker, not through the pipeline's thread.
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

/** Fault injection: makes an adapter's weights NaN (stage 0). */
export interface PoisonMsg {
  type: 'poison';
  id: number;
  adapter: number;
}

/** Recovery: forget every micro-batch in flight and discard messages of epochs below `epoch`. */
export interface DropMsg {
  type: 'drop';
  id: number;
  epoch: number;
}

/** What the pipeline posts to a stage worker (InitMsg is its workerData, not a message). */
export type ToStage = ForwardMsg | BackwardMsg | HeadMsg | HeadedMsg | StepMsg | PoisonMsg | DropMsg | LinkMsg;

/** The requests among them: answered by a ReplyMsg with their id. */
export type StageRequest = StepMsg | PoisonMsg | DropMsg | LinkMsg;

// ---- stage worker → pipeline

/** The stage loaded its weights and takes messages. */
export interface ReadyMsg {
  type: 'ready';
  id: number;
  stage: number;
}

/** The answer to a StageRequest. */
export interface ReplyMsg {
  type: 'reply';
  id: number;
  /** A StepMsg's: StepReply. */
  value?: unknown;
  error?: WireError;
}

/** What a stage answers a StepMsg with. */
export interface StepReply {
  /** Σ grad² of the slice before the step (StepMsg.measure). */
  sumsq?: number;
  /** The slice after the step: recovery's snapshot. */
  snapshot: StageSnapshot;
}

export function isStepReply(v: unknown): v is StepReply {
  return typeof v === 'object' && v !== null && 'snapshot' in v;
}

/**
 * mb is through the pipeline (losses in its meta slot): sent by the last stage after an
 * evaluation or a one-stage training message, by stage 0 after the last Backward. Forward and
 * Backward between stages go straight from stage to stage (LinkMsg).
 */
export interface DoneMsg {
  type: 'done';
  epoch: number;
  stage: number;
  mb: number;
}

/** A micro-batch (mb) or the stage itself (no mb: it could not start) failed. */
export interface StageErrorMsg {
  type: 'error';
  epoch: number;
  stage: number;
  mb?: number;
  error: WireError;
}

export interface HeartbeatMsg {
  type: 'heartbeat';
  stage: number;
  handled: number;
  busyMs: number;
}

/** One piece of work done (forward, backward, head share, step, evaluation), for the schedule grid. */
export interface RecordMsg {
  type: 'record';
  rec: ScheduleRecord;
}

export type FromStage = ReadyMsg | ReplyMsg | DoneMsg | StageErrorMsg | HeartbeatMsg | RecordMsg;

// ---- events a job streams to its user

/** A job's state changed. */
export interface JobStateEvent {
  type: 'state';
  adapter: string;
  state: JobState;
  time: number;
}

/** An optimizer step of the job's adapter is through. */
export interface JobStepEvent {
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

export interface JobEvalEvent {
  type: 'eval';
  adapter: string;
  step: number;
  loss: number;
  perplexity: number;
  tokens: number;
  time: number;
}

export interface JobCheckpointEvent {
  type: 'checkpoint';
  adapter: string;
  step: number;
  path: string;
  time: number;
}

/** A fault was detected (no adapter: a stage's fault, which every job sees). */
export interface JobFaultEvent {
  type: 'fault';
  adapter?: string;
  fault: string;
  detail: string;
  time: number;
}

/** on_nan: rollback: the adapter went back from `fromStep` to its checkpoint at `toStep`; its learning rate is now lrScale × the configured one. */
export interface JobRollbackEvent {
  type: 'rollback';
  adapter: string;
  fromStep: number;
  toStep: number;
  lrScale: number;
  rollbacks: number;
  reason: string;
  time: number;
}

export interface JobDoneEvent {
  type: 'done';
  adapter: string;
  steps: number;
  loss: number;
  path?: string;
  time: number;
}

/** A greedy completion of one of eval.prompts, with the adapter before training or after it. */
export interface JobSampleEvent {
  type: 'sample';
  adapter: string;
  step: number;
  when: 'before' | 'after';
  prompt: string;
  text: string;
  time: number;
}

export interface JobErrorEvent {
  type: 'error';
  adapter: string;
  message: string;
  time: number;
}

export type JobEvent =
  | JobStateEvent
  | JobStepEvent
  | JobEvalEvent
  | JobCheckpointEvent
  | JobFaultEvent
  | JobRollbackEvent
  | JobDoneEvent
  | JobSampleEvent
  | JobErrorEvent;

export type JobState = 'queued' | 'loading' | 'running' | 'paused' | 'parked' | 'done' | 'failed' | 'cancelled';
