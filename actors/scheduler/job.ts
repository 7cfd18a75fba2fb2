// One adapter job's state as the scheduler sees it: its state machine (queued → loading →
// running ⇄ paused/parked → done/failed/cancelled), its position in its data and in its current
// optimizer step, and the stream of events a caller reads with job.events().
import type { AdapterConfig } from '../../lib/config.js';
import type { LoraSpec } from '../../lib/lora/adapter.js';
import { cloneState, type AdapterState } from '../../lib/lora/state.js';
import type { JobEvent, JobState } from '../protocol.js';
import type { MicroBatchSource, PreparedJob, SchedulerHooks, SourceMicroBatch } from './job-types.js';

/** A pull-based queue behind job.events(). */
class EventQueue<T> {
  private items: T[] = [];
  private waiters: Array<(r: IteratorResult<T>) => void> = [];
  private closed = false;
  push(v: T) {
    const w = this.waiters.shift();
    if (w) w({ value: v, done: false });
    else this.items.push(v);
  }
  close() {
    this.closed = true;
    for (const w of this.waiters.splice(0)) w({ value: undefined as never, done: true });
  }
  async *iterate(): AsyncGenerator<T> {
    for (;;) {
      if (this.items.length) {
        yield this.items.shift()!;
        continue;
      }
      if (this.closed) return;
      const r = await new Promise<IteratorResult<T>>((res) => this.waiters.push(res));
      if (r.done) return;
      yield r.value;
    }
  }
}

/** What a job asks of the scheduler that runs it (JobScheduler, actors/scheduler/scheduler.ts). */
export interface JobOwner {
  readonly hooks: Pick<SchedulerHooks, 'onEvent'>;
  /** Waits until nothing of the job is in flight. */
  quiesce(job: Job): Promise<void>;
  /** Something changed: the scheduler's loop takes another turn. */
  wake(): void;
  /** Takes an ended job's adapter off the stages. */
  retire(job: Job): Promise<void>;
}

export class Job {
  state: JobState = 'queued';
  step = 0;
  totalSteps = 0;
  spec!: LoraSpec;
  source!: MicroBatchSource;
  evalSource?: () => MicroBatchSource;
  /** Micro-batch messages of this job in flight. */
  inflight = 0;
  admittedInStep = 0;
  doneInStep = 0;
  microCount = 0;
  stepping = false;
  /**
   * Between the start of an optimizer step and the stages' answer: micro-batches of the next
   * step may go out now (Pipeline.trainAfterStep), each stage runs them once it has the step.
   */
  stepUnderWay = false;
  /** What went out ahead of the step under way: it belongs to the next step (nextStep() moves it there). */
  ahead: {
    admitted: number;
    /** The data position before the first of them: where the next step starts. */
    source?: unknown;
    /** Completions that came back before the step under way ended: row-loss sum and tokens. */
    done: Array<{ loss: number; tokens: number; last: boolean; target: number }>;
  } = { admitted: 0, done: [] };
  /** The next step was complete while the step before still ran (its evaluation, say): its target tokens; it runs then. */
  pendingStep: number | undefined;
  stepLoss = 0;
  tokens = 0;
  /** The part of `tokens` from the current step's micro-batches (not in a checkpoint, whose data position is the step's start). */
  tokensInStep = 0;
  lastLoss = NaN;
  lastEval?: { loss: number; perplexity: number };
  /** The held-out loss before the first step (eval configured, a run from step 0). */
  baselineEval?: { loss: number; perplexity: number };
  /** Loaded and waiting for room on the stages (placed by the scheduler, by priority). */
  prepared?: PreparedJob;
  /** Preempted: its state in host memory while it is off the stages (see Placement.placeWaiting). */
  parked?: { state: AdapterState; source: unknown };
  /** A higher-priority job needs this job's memory: it parks at its next step boundary. */
  parkRequested = false;
  /** on_nan: rollback: the learning rate is lrScale × the configured one, lowered at each rollback. */
  lrScale = 1;
  rollbacks = 0;
  /** Where a rollback returns to: the state, data position and counters of the last checkpoint (or the start). */
  rollbackPoint?: { state: AdapterState; source: unknown; step: number; tokens: number };
  /** Between a NaN and the restored checkpoint: nothing of this job is admitted. */
  rollingBack = false;
  error?: string;
  outputPath?: string;
  startedAt = 0;
  finishedAt = 0;
  private peeked: SourceMicroBatch | null | undefined;
  private readonly queue = new EventQueue<JobEvent>();
  readonly done: Promise<void>;
  private resolveDone!: () => void;

  constructor(
    readonly id: number,
    readonly config: AdapterConfig,
    private readonly owner: JobOwner,
  ) {
    this.done = new Promise((r) => (this.resolveDone = r));
  }

  get name(): string {
    return this.config.name;
  }
  get priority(): number {
    return this.config.priority;
  }

  events(): AsyncGenerator<JobEvent> {
    return this.queue.iterate();
  }

  async pause(): Promise<void> {
    if (this.state === 'running') this.setState('paused');
    await this.owner.quiesce(this);
  }

  async resume(): Promise<void> {
    if (this.state === 'paused') this.setState('running');
    this.owner.wake();
  }

  async cancel(): Promise<void> {
    if (this.terminal()) return;
    this.setState('cancelled');
    await this.owner.quiesce(this);
    await this.owner.retire(this);
  }

  /** @internal Ends the event stream without changing the state (the scheduler closed). */
  endEvents(): void {
    this.queue.close();
  }

  terminal(): boolean {
    return this.state === 'done' || this.state === 'failed' || this.state === 'cancelled';
  }

  /** @internal Placed and not ended: its adapter state is on the stages, or parked in host memory. */
  live(): boolean {
    return !this.terminal() && this.state !== 'queued' && this.state !== 'loading';
  }

  /** @internal */
  emit(ev: JobEvent) {
    this.queue.push(ev);
    this.owner.hooks.onEvent?.(ev);
  }

  /** @internal */
  setState(s: JobState) {
    this.state = s;
    this.emit({ type: 'state', adapter: this.name, state: s, time: Date.now() });
    if (this.terminal()) {
      this.finishedAt = Date.now();
      this.queue.close();
      this.resolveDone();
    }
  }

  private stateBeforePeek: unknown;
  private stepStartState: unknown;

  /** @internal */
  peek(): SourceMicroBatch | null {
    if (this.peeked === undefined) {
      this.stateBeforePeek = this.source.state();
      if (this.admittedInStep === 0) this.stepStartState = this.stateBeforePeek;
      this.peeked = this.source.next();
    }
    return this.peeked;
  }

  /**
   * The data position where the current step starts (for checkpoints): a checkpoint holds the
   * weights after `step` optimizer steps, so a resume redoes a step that was only partly done.
   */
  sourceState(): unknown {
    if (this.admittedInStep > 0) return this.stepStartState;
    return this.peeked === undefined ? this.source.state() : this.stateBeforePeek;
  }

  /** @internal */
  take(): SourceMicroBatch {
    const mb = this.peek()!;
    this.peeked = undefined;
    return mb;
  }

  /** @internal Puts the data loader back to a saved position (unparking, rolling back). */
  restoreSource(state: unknown): void {
    this.source.restore(state);
    this.peeked = undefined;
  }

  /** @internal Keeps a copy of the state now (at a step boundary) to roll back to (on_nan: rollback). */
  setRollbackPoint(state: AdapterState): void {
    this.rollbackPoint = {
      state: cloneState(state),
      source: structuredClone(this.sourceState()),
      step: this.step,
      tokens: this.tokens - this.tokensInStep,
    };
  }

  /** @internal Starts the next optimizer step's counts from zero (a rollback: nothing of the job is in flight). */
  resetStep(): void {
    this.stepLoss = 0;
    this.admittedInStep = 0;
    this.doneInStep = 0;
    this.tokensInStep = 0;
    this.ahead = { admitted: 0, done: [] };
    this.pendingStep = undefined;
  }

  /** @internal After an optimizer step: the next step's counts start with what went out ahead of it. */
  nextStep(): void {
    const a = this.ahead;
    this.resetStep();
    this.admittedInStep = a.admitted;
    if (a.admitted > 0) this.stepStartState = a.source;
    for (const d of a.done) {
      this.stepLoss += d.loss;
      this.tokens += d.tokens;
      this.tokensInStep += d.tokens;
      this.doneInStep++;
      if (d.last || this.doneInStep >= this.microCount) this.pendingStep = d.target;
    }
  }

  /**
   * @internal Whether a micro-batch of the next step may go out before the step under way is
   * applied: not past the last step, not where the job parks, and one message of its own.
   */
  canAdmitAhead(limit: number): boolean {
    if (!this.stepUnderWay || this.state !== 'running' || this.rollingBack || this.parkRequested) return false;
    if (this.inflight >= limit || this.step + 1 >= this.totalSteps) return false;
    const mb = this.peek();
    return mb !== null && this.ahead.admitted < mb.microCount;
  }

  /** @internal Takes a micro-batch of the next step (canAdmitAhead said yes). */
  takeAhead(): SourceMicroBatch {
    if (this.ahead.admitted === 0)
      this.ahead.source = this.peeked === undefined ? this.source.state() : this.stateBeforePeek;
    this.ahead.admitted++;
    return this.take();
  }

  /** @internal Nothing of this job in flight and no step half done: it can leave the stages. */
  atStepBoundary(): boolean {
    return this.inflight === 0 && !this.stepping && !this.rollingBack && this.admittedInStep === 0;
  }

  /** @internal Waiting for room on the stages: loaded, or parked. */
  waiting(): boolean {
    return (this.state === 'loading' && this.prepared !== undefined) || this.state === 'parked';
  }

  /** @internal */
  canAdmit(limit: number): boolean {
    if (this.state !== 'running' || this.stepping || this.rollingBack || this.inflight >= limit) return false;
    if (this.parkRequested && this.admittedInStep === 0) return false; // park at this step boundary
    if (this.step >= this.totalSteps) return false;
    if (this.admittedInStep > 0 && this.admittedInStep >= this.microCount) return false; // wait for the step
    return this.peek() !== null;
  }
}
