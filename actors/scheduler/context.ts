// What the scheduler's roles share. Placement (placement.ts), admission (admission.ts), the
// optimizer steps (step.ts) and rollback (rollback.ts) each get the JobScheduler they belong to
// as a SchedulerContext: its state, and the entry points of the other roles they call. Each
// role's file imports only this, never another role's file, so no two of them import each other.
import type { FaultSpec } from '../../lib/faults.js';
import type { AdapterState } from '../../lib/lora/state.js';
import type { Pipeline } from '../pipeline.js';
import type { Job } from './job.js';
import type { SchedulerHooks } from './job-types.js';
import type { MemoryLedger } from './memory.js';

export interface SchedulerOptions {
  /** BatchLoRA: several adapters per micro-batch message. */
  batchlora: boolean;
  /** Micro-batch messages in flight in the pipeline. */
  inflight: number;
  /** Micro-batches of one adapter's step in flight (default: lib/schedule/packing.ts microBatchesInFlight). */
  inflightPerAdapter?: number;
  /** Most adapters per message (default: lib/schedule/packing.ts adaptersPerMessage). */
  adaptersPerMicroBatch?: number;
}

export interface SchedulerContext {
  readonly jobs: ReadonlyMap<number, Job>;
  readonly pipeline: Pipeline;
  readonly hooks: SchedulerHooks;
  readonly options: SchedulerOptions;
  readonly ledger: MemoryLedger;
  /** Micro-batch messages in flight, by message id (admission adds and removes them). */
  readonly inflight: Map<number, Promise<void>>;
  /** Steps, baselines and rollbacks in flight. */
  readonly stepping: ReadonlySet<Promise<void>>;
  /**
   * Evaluation messages in flight and waiting to go out: they hold shared slots too, so they
   * count against the admission limit (Steps.evaluate).
   */
  readonly evaluations: { inflight: Set<Promise<unknown>>; waiting: number };
  /** No more admitting or placing (stop(), or the run failed). */
  readonly stopping: boolean;
  /** How many times wake() was called. */
  readonly wakes: number;
  /** nan: faults not injected yet (rollback.ts takes them out as it injects them). */
  readonly nanFaults: FaultSpec[];
  wake(): void;
  /** Micro-batch messages admitted at most now (Admission.limit). */
  readonly admissionLimit: number;
  quiesce(job: Job, rollbackToo?: boolean): Promise<void>;
  /** Nothing in flight: no micro-batch, step or rollback (the ledger can measure). */
  idle(): boolean;
  /** Holds `work` as a step in flight (stop(), quiesce() and exportAll() wait for it); `after` runs when it ends. */
  hold(work: Promise<void>, after?: () => void): void;
  /** Runs fn with the job held as stepping. */
  track(job: Job, fn: () => Promise<void>): void;
  failJob(job: Job, message: string): void;
  /** True when `e` means the pipeline failed for good (the scheduler then saves and stops every job). */
  pipelineFailed(e: unknown): boolean;
  /** The id of the next micro-batch message (training or evaluation). */
  nextMessageId(): number;

  // the roles' entry points that the other roles call
  /** Placement: runs fn after every earlier change of what is on the stages. */
  exclusive<T>(fn: () => Promise<T>): Promise<T>;
  /** Placement: removes a job's adapter from every stage and gives its bytes back. */
  takeOff(job: Job): Promise<void>;
  /** Steps: the job's last micro-batch of a step is done. */
  optimizerStep(job: Job, stepTargetTokens: number): Promise<void>;
  /** Steps: the held-out loss and prompt samples before the first step. */
  baseline(job: Job, initial: AdapterState): Promise<void>;
  /** Steps: the job's last step is done. */
  finish(job: Job): Promise<void>;
  /** Rollback: a NaN/Inf loss or gradient norm. */
  nonFinite(job: Job, why: string): void;
  /** Rollback: the `nan:` fault for the job's next step, if there is one. */
  injectNaN(job: Job): void;
}
