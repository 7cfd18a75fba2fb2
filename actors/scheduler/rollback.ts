// A NaN/Inf loss or gradient norm in one adapter (on_nan): that adapter stops, or rolls back to
// its last checkpoint (or its start) with a lower learning rate while rollbacks are allowed; the
// other adapters go on. Also the `nan:` fault, which poisons an adapter to test this path.
import { cloneState } from '../../lib/lora/state.js';
import type { Job } from './job.js';
import type { SchedulerContext } from './context.js';

export class Rollback {
  constructor(private readonly s: SchedulerContext) {}

  /** A NaN/Inf loss or gradient norm: the adapter rolls back (on_nan: rollback, while allowed) or stops; the others go on. */
  nonFinite(job: Job, why: string): void {
    const o = job.config.on_nan;
    if (o.action !== 'rollback' || !job.rollbackPoint) {
      this.s.failJob(job, `${why}: adapter stopped (the other adapters go on)`);
      return;
    }
    if (job.rollbacks >= o.max_rollbacks) {
      this.s.failJob(
        job,
        `${why} after ${job.rollbacks} rollback(s) (on_nan.max_rollbacks ${o.max_rollbacks}): adapter stopped (the other adapters go on)`,
      );
      return;
    }
    if (job.rollingBack) return;
    job.rollingBack = true;
    // not awaited: this may run inside the job's own optimizer step, which the rollback waits
    // for; tracked with the steps, so stop() and exportAll() wait for it to end
    this.s.hold(this.rollback(job, why));
  }

  /** Puts a job back to its rollback point with a lower learning rate, once nothing of it is in flight. */
  private async rollback(job: Job, why: string): Promise<void> {
    const { pipeline } = this.s;
    try {
      await this.s.quiesce(job, false);
      if (job.terminal()) return;
      const point = job.rollbackPoint!;
      const from = job.step + 1;
      // one residency change among the others (placement, parking, retiring): the adapter's
      // weights and the job's step and data position change together
      await this.s.exclusive(async () => {
        if (job.terminal() || !this.s.ledger.isResident(job.id)) return; // cancelled meanwhile
        // the same bytes leave and come back: the memory ledger does not change
        await pipeline.removeAdapter(job.id);
        await pipeline.addAdapter(job.id, job.spec, cloneState(point.state));
        job.restoreSource(point.source);
        job.step = point.step;
        job.tokens = point.tokens;
        job.resetStep();
        job.rollbacks++;
        job.lrScale *= job.config.on_nan.lr_factor;
        job.emit({
          type: 'rollback',
          adapter: job.name,
          fromStep: from,
          toStep: point.step,
          lrScale: job.lrScale,
          rollbacks: job.rollbacks,
          reason: why,
          time: Date.now(),
        });
      });
    } catch (e) {
      if (!this.s.pipelineFailed(e)) this.s.failJob(job, `${why}; the rollback failed: ${(e as Error).message}`);
    } finally {
      job.rollingBack = false;
    }
  }

  /** A `nan:adapter=NAME,step=K` fault for this job's next step: poisons its weights, once (called at the step's first micro-batch). */
  injectNaN(job: Job): void {
    const faults = this.s.nanFaults;
    const f = faults.find((x) => x.adapter === job.name && x.step === job.step + 1);
    if (!f) return;
    faults.splice(faults.indexOf(f), 1);
    void this.s.pipeline.poison(job.id);
    job.emit({
      type: 'fault',
      adapter: job.name,
      fault: 'nan',
      detail: `injected NaN weights before step ${job.step + 1}`,
      time: Date.now(),
    });
  }
}
