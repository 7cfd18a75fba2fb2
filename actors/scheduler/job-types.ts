// The contract between the job scheduler and what feeds it jobs (prepare.ts, the CLI, tests):
// where a job's micro-batches come from, what it starts from, and the hooks that save its
// output. Both sides import this file, so neither imports the other for types.
import type { AdapterConfig } from '../../lib/config.js';
import type { MicroBatch as LoaderMicroBatch } from '../../lib/data/loader.js';
import type { LoraSpec } from '../../lib/lora/adapter.js';
import type { AdapterState } from '../../lib/lora/state.js';
import type { JobEvent } from '../protocol.js';

/** One micro-batch of one adapter, as its data loader produces it (lib/data/loader.ts). */
export type SourceMicroBatch = Pick<
  LoaderMicroBatch,
  | 'step'
  | 'microIndex'
  | 'microCount'
  | 'inputIds'
  | 'labels'
  | 'cuSeqlens'
  | 'positions'
  | 'numTokens'
  | 'numTargetTokens'
  | 'stepTargetTokens'
  | 'lastOfStep'
>;

export interface MicroBatchSource {
  readonly totalSteps: number;
  next(): SourceMicroBatch | null;
  state(): unknown;
  restore(state: unknown): void;
}

/** What the scheduler needs to run a job; built by `prepare` from the adapter config. */
export interface PreparedJob {
  spec: LoraSpec;
  source: MicroBatchSource;
  /** Micro-batches of held-out data (a fresh pass each call). */
  evalSource?: () => MicroBatchSource;
  initial: AdapterState;
  /** Resume point: optimizer steps already taken, and the tokens trained on in them. */
  startStep?: number;
  startTokens?: number;
  /** Resumed after NaN rollbacks: the learning-rate multiplier and how many rollbacks there were. */
  lrScale?: number;
  rollbacks?: number;
}

export interface SchedulerHooks {
  /** Loads data and the initial state of a job. */
  prepare(config: AdapterConfig): Promise<PreparedJob>;
  /** Called with every event of every job (metrics files, progress display). */
  onEvent?(ev: JobEvent): void;
  /** Saves a checkpoint; returns its path. */
  checkpoint?(job: JobView, state: AdapterState): Promise<string>;
  /** Saves the finished adapter; returns its path. */
  finish?(job: JobView, state: AdapterState): Promise<string>;
  /** Called by submit() before anything of the job runs: throws to refuse it (earlier results in the output). */
  claim?(config: AdapterConfig): void;
  /** Greedy completions of the job's eval.prompts with the adapter in this state. */
  sample?(job: JobView, state: AdapterState): Promise<Array<{ prompt: string; text: string }>>;
  /** Frees what the hooks hold (JobScheduler.close()). */
  close?(): Promise<void>;
}

/** What a hook sees of a running job (the scheduler's Job, job.ts). */
export interface JobView {
  readonly name: string;
  readonly config: AdapterConfig;
  readonly spec: LoraSpec;
  /** Optimizer steps taken. */
  readonly step: number;
  readonly tokens: number;
  /** The part of `tokens` from micro-batches of the step under way (a checkpoint's data position is that step's start). */
  readonly tokensInStep: number;
  readonly lastLoss: number;
  readonly lrScale: number;
  readonly rollbacks: number;
  /** The data loader's position (restored on resume). */
  sourceState(): unknown;
}
