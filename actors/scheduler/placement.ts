// Placement and residency: which adapters are on the stages. Waiting jobs (loaded, or parked)
// go on by priority when the memory ledger has room; a job that does not fit asks running jobs
// of lower priority to park (preemption at a step boundary: their state goes to host memory);
// ended jobs leave. Every change of what is on the stages runs one at a time (`exclusive`),
// because it changes the ledger's accounting.
import type { Job } from './job.js';
import type { SchedulerContext } from './context.js';

export class Placement {
  /** Placing, parking and removing adapters run one at a time (they change the accounting). */
  private residency: Promise<unknown> = Promise.resolve();
  /** The placement pass running now. */
  pass: Promise<void> | undefined;
  /** The scheduler's wake count when the last pass began. */
  private placedAt = -1;

  constructor(private readonly s: SchedulerContext) {}

  /** Runs fn after every earlier residency change has finished. */
  exclusive<T>(fn: () => Promise<T>): Promise<T> {
    const r = this.residency.then(fn);
    this.residency = r.catch(() => {});
    return r;
  }

  /**
   * Starts a placement pass unless one is running or nothing happened since the last one began
   * (the loop calls this on every turn; without that check a job that waits for room made the
   * loop start pass after pass, a microtask spin that starved the stages' messages).
   */
  place(): void {
    const s = this.s;
    if (this.pass || s.stopping || this.placedAt === s.wakes || ![...s.jobs.values()].some((j) => j.waiting())) return;
    this.placedAt = s.wakes;
    this.pass = this.exclusive(() => this.placeWaiting())
      .then(
        (changed) => {
          if (changed) s.wake();
        },
        (e: Error) => {
          for (const j of s.jobs.values()) if (j.waiting()) s.failJob(j, `placing adapters failed: ${e.message}`);
        },
      )
      .finally(() => (this.pass = undefined));
  }

  /**
   * The mLoRA task scheduler. Puts waiting jobs (loaded or parked) on the stages, highest
   * priority first, equal priorities first come first served (a job that must wait holds up
   * those behind it). A job that does not fit asks running jobs of lower priority (lowest
   * first, newest first) to park at their next step boundary: their LoRA weights, AdamW
   * moments and data position go to host memory and their adapter leaves every stage; they
   * come back, unchanged, when there is room. Returns whether anything changed.
   */
  private async placeWaiting(): Promise<boolean> {
    const { jobs, pipeline, ledger } = this.s;
    if (!ledger.restFree || this.s.idle()) await this.measure();
    const restFree = ledger.restFree!; // replaced only by measure(), which runs here (one pass at a time)
    const S = pipeline.plans.length;
    let changed = false;
    for (;;) {
      for (const j of jobs.values()) j.parkRequested = false;
      ledger.promised = new Array<number>(S).fill(0);
      const waiting = [...jobs.values()]
        .filter((j) => j.waiting())
        .sort((a, b) => b.priority - a.priority || a.id - b.id);
      for (const job of waiting) {
        const need = pipeline.adapterBytes(job.spec);
        const held = ledger.residentBytes(S);
        const never = need.findIndex((b, s) => b > restFree[s]! + held[s]!);
        if (never >= 0) {
          this.s.failJob(
            job,
            `adapter '${job.name}' needs ${need[never]} bytes on ${pipeline.devices[never]}, ` +
              `only ${restFree[never]! + held[never]!} are there besides the model: give the device more memory or lower lora.r`,
          );
          continue;
        }
        if (need.every((b, s) => b <= restFree[s]! - ledger.inUse(s))) {
          await this.putOnStages(job, need);
          changed = true;
          continue;
        }
        if (need.every((b, s) => b <= restFree[s]!)) {
          ledger.promised = need; // fits once the micro-batches in flight are done
          break;
        }
        const room = restFree.slice();
        const lower = [...jobs.values()]
          .filter((j) => ledger.isResident(j.id) && j.state === 'running' && j.priority < job.priority)
          .sort((a, b) => a.priority - b.priority || b.id - a.id);
        const victims: Job[] = [];
        for (const v of lower) {
          if (need.every((b, s) => b <= room[s]!)) break;
          victims.push(v);
          ledger.residentOf(v.id)!.forEach((b, s) => (room[s]! += b));
        }
        if (need.every((b, s) => b <= room[s]!)) for (const v of victims) v.parkRequested = true;
        break;
      }
      const ready = [...jobs.values()].filter((j) => j.parkRequested && j.state === 'running' && j.atStepBoundary());
      if (!ready.length) return changed;
      for (const j of ready) await this.park(j);
      changed = true;
    }
  }

  /** Reads what is free on each stage; only exact when nothing is in flight. */
  private async measure(): Promise<void> {
    this.s.ledger.measure(await this.s.pipeline.memory());
  }

  /** Adds a waiting job's adapter to every stage (fresh, resumed from a checkpoint, or unparked). */
  private async putOnStages(job: Job, bytes: number[]): Promise<void> {
    const parked = job.parked;
    // Taken before the call: each stage allocates the adapter when the call reaches its control
    // lane, ahead of any Forward queued there, while the scheduler goes on admitting during the
    // round trip; bytes still free in the ledger then (a parked job's, just given back) would be
    // spent twice. They come back only if no stage kept the adapter.
    this.s.ledger.addResident(job.id, bytes);
    try {
      await this.s.pipeline.addAdapter(job.id, job.spec, parked ? parked.state : job.prepared!.initial);
    } catch (e) {
      this.s.ledger.giveBack(this.s.ledger.dropResident(job.id)!);
      throw e;
    }
    if (parked) {
      job.restoreSource(parked.source);
      job.parked = undefined;
      job.setState('running');
      return;
    }
    const initial = job.prepared!.initial;
    if (job.config.on_nan.action === 'rollback') job.setRollbackPoint(initial);
    job.prepared = undefined;
    job.startedAt = Date.now();
    if (job.step >= job.totalSteps) await this.s.finish(job);
    else {
      job.setState('running');
      // tracked like a step (nothing of the job is admitted meanwhile), not awaited: it must not hold up placement
      if (job.step === 0 && job.config.eval) this.s.track(job, () => this.s.baseline(job, initial));
    }
  }

  /** Moves a job at a step boundary off the stages into host memory. */
  private async park(job: Job): Promise<void> {
    const state = await this.s.pipeline.exportAdapter(job.id);
    const source = job.sourceState();
    await this.takeOff(job);
    job.parked = { state, source };
    job.parkRequested = false;
    job.setState('parked');
  }

  /** Removes a job's adapter from every stage and gives its bytes back. */
  async takeOff(job: Job): Promise<void> {
    const bytes = this.s.ledger.dropResident(job.id);
    if (!bytes) return;
    await this.s.pipeline.removeAdapter(job.id);
    this.s.ledger.giveBack(bytes);
  }

  /** Takes a finished/failed/cancelled job's adapter off the stages (a parked job's state is dropped). */
  async retire(job: Job): Promise<void> {
    await this.s.quiesce(job);
    job.parked = undefined;
    job.prepared = undefined;
    try {
      await this.exclusive(() => this.takeOff(job));
    } catch {
      /* already gone */
    }
    this.s.wake();
  }
}
