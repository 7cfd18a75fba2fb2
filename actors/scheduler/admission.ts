// Admission and BatchLoRA packing: which micro-batches enter the pipeline next. Runnable jobs
// are taken by priority, then the one furthest behind in its steps (lib/schedule/fairness.ts),
// then round-robin; up to adaptersPerMessage of them (lib/schedule/
// packing.ts, the rule --dry-run and the README follow too) share one message when their tokens
// fit the pipeline's maxTokens; the message is launched only if what it would hold fits on
// every stage next to what is in flight (the memory ledger). Its losses come back to
// `completed`, which hands a job's last micro-batch of a step to the optimizer step.
import { adaptersPerMessage, microBatchesInFlight } from '../../lib/schedule/packing.js';
import { admissionOrder, inFlightLimit, progress } from '../../lib/schedule/fairness.js';
import type { MicroBatchData } from '../../lib/model/batch.js';
import { assemble, microSerial } from './assemble.js';
import type { Job } from './job.js';
import type { SourceMicroBatch } from './job-types.js';
import type { SchedulerContext } from './context.js';

/**
 * The micro-batches of one message, one per job, in segment order. `ahead`: the message's one
 * micro-batch belongs to the step after the job's step under way (Pipeline.trainAfterStep), and
 * `stepAt` is the job's step count when it went out.
 */
type Parts = Array<{ job: Job; mb: SourceMicroBatch; ahead?: boolean; stepAt?: number }>;

export class Admission {
  /** Micro-batch messages admitted at most (options.inflight, less after an out-of-memory). */
  limit: number;
  /** The most micro-batch messages that were in flight at once (diagnostics). */
  peakInflight = 0;
  /** Round-robin among equal priorities: the job id that goes first next time. */
  private rr = 0;

  constructor(private readonly s: SchedulerContext) {
    this.limit = s.options.inflight;
  }

  /**
   * A stage ran out of memory although admission said the micro-batches fit: the accounting was
   * wrong, so admit half as many from now on (at least one). The failed micro-batch itself is
   * replayed by the pipeline; a stage that keeps failing at one in flight stops the run.
   */
  shrink(): number {
    this.limit = Math.max(1, Math.floor(this.limit / 2));
    return this.limit;
  }

  /**
   * A job whose optimizer step is under way may send its next step's micro-batch now: the
   * stages run it once they have the step, and the scheduler's round trip between the step's
   * end and the next admission leaves the chain of the adapter's micro-batches. A pending nan:
   * fault keeps the job out (it is injected at a step's first micro-batch, admitted normally).
   */
  private ahead(job: Job, limit: number): boolean {
    if (!this.s.pipeline.trainAfterStep || this.s.pipeline.plans.length <= 1) return false;
    if (this.s.nanFaults.some((f) => f.adapter === job.name)) return false;
    return job.canAdmitAhead(limit);
  }

  private runnable(): Job[] {
    const running = [...this.s.jobs.values()].filter((j) => j.state === 'running');
    const limit = microBatchesInFlight(
      running.length,
      this.s.pipeline.plans.length,
      this.limit,
      this.s.options.inflightPerAdapter,
    );
    // the adapter furthest behind first, with its whole step in flight (lib/schedule/fairness.ts)
    const prog = (j: Job) => progress(j.step, j.admittedInStep, j.microCount, j.totalSteps);
    const lead = Math.max(0, ...running.map(prog));
    const fixed = this.s.options.inflightPerAdapter !== undefined || this.s.pipeline.plans.length <= 1;
    const all = running.filter((j) => {
      const l = fixed ? limit : inFlightLimit(prog(j), lead, limit, j.microCount);
      return j.canAdmit(l) || this.ahead(j, l);
    });
    return admissionOrder(all, (j) => ({ id: j.id, priority: j.priority, progress: prog(j) }), this.rr);
  }

  private running(): number {
    let n = 0;
    for (const j of this.s.jobs.values()) if (j.state === 'running') n++;
    return n;
  }

  admit(): void {
    const { pipeline, options, ledger, inflight } = this.s;
    const S = pipeline.plans.length;
    const e = this.s.evaluations;
    while (inflight.size + e.inflight.size + e.waiting < this.limit) {
      // One device: an optimizer step runs on the same device as the next message anyway, so
      // wait for it; the adapter that is stepping then joins that message instead of being
      // left for a message of its own (which would split BatchLoRA into ever smaller batches).
      if (options.batchlora && S === 1 && this.s.stepping.size > 0) return;
      const ready = this.runnable();
      if (!ready.length) return;
      const per = options.batchlora ? adaptersPerMessage(this.running(), S, options.adaptersPerMicroBatch) : 1;
      const chosen: Job[] = [];
      let tokens = 0;
      for (const j of ready) {
        if (chosen.length >= per || (chosen.length && chosen[0]!.stepUnderWay)) break;
        // a micro-batch sent ahead of its job's step travels in a message of its own (its versions differ)
        if (chosen.length && j.stepUnderWay) continue;
        const n = j.peek()!.numTokens;
        if (n > pipeline.maxTokens) {
          this.s.failJob(
            j,
            `a micro-batch of ${n} tokens is larger than the pipeline's max_tokens (${pipeline.maxTokens}, the maxTokens start option): lower micro_batch_size or seq_len`,
          );
          continue;
        }
        if (chosen.length && tokens + n > pipeline.maxTokens) continue;
        chosen.push(j);
        tokens += n;
      }
      if (!chosen.length) continue;
      this.rr = chosen[chosen.length - 1]!.id + 1;
      const parts: Parts = chosen.map((j) =>
        j.stepUnderWay ? { job: j, mb: j.peek()!, ahead: true, stepAt: j.step } : { job: j, mb: j.peek()! },
      );
      const numTokens = parts.reduce((s, p) => s + p.mb.numTokens, 0);
      const numSeqs = parts.reduce((s, p) => s + p.mb.cuSeqlens.length - 1, 0);
      const segs = parts.map((p) => ({ rows: p.mb.numTokens, spec: p.job.spec }));
      const need = pipeline.activationBytes(numTokens, segs, numSeqs);
      const transient = pipeline.transientBytes?.(numTokens, segs, numSeqs) ?? need.map(() => 0);
      const held = need.map((b, s) => b - transient[s]!);
      const short = need.findIndex((_, s) => !ledger.fits(s, held[s]!, transient[s]!));
      if (short >= 0) {
        if (inflight.size === 0 && !ledger.promised.some((b) => b > 0)) {
          for (const p of parts) {
            this.s.failJob(
              p.job,
              `a micro-batch of ${numTokens} tokens needs ${need[short]} bytes of activations on ${pipeline.devices[short]}, ` +
                `only ${ledger.unpromised(short)} are free: lower micro_batch_size or seq_len, or give the device more memory`,
            );
          }
          continue;
        }
        return; // wait for memory to come back
      }
      for (const p of parts)
        if (p.ahead) p.job.takeAhead();
        else p.job.take();
      this.launch(parts, numTokens, held, transient);
    }
  }

  private launch(parts: Parts, numTokens: number, reserve: number[], transient: number[]): void {
    const { pipeline, ledger, inflight } = this.s;
    const data = assemble(
      this.s.nextMessageId(),
      parts.map((p) => ({ adapter: p.job.id, serial: microSerial(p.mb), mb: p.mb })),
      numTokens,
    );
    const ahead = parts[0]!.ahead === true;
    for (const p of parts) {
      p.job.inflight++;
      if (ahead) continue; // counted in the next step (Job.nextStep); no nan: fault is pending (Admission.ahead)
      // at the step's first micro-batch: its others may be in flight with it, and one fault is one attempt of the step
      if (p.job.admittedInStep === 0) this.s.injectNaN(p.job);
      p.job.admittedInStep++;
      p.job.microCount = p.mb.microCount;
    }
    ledger.hold(data.id, reserve, transient);
    const done = (ahead ? pipeline.trainAfterStep!(data) : pipeline.train(data))
      .then(
        (losses) => this.completed(parts, data, losses),
        (e: Error) => {
          if (this.s.pipelineFailed(e)) return;
          for (const p of parts) this.s.failJob(p.job, `micro-batch ${data.id} failed: ${e.message}`);
        },
      )
      .finally(() => {
        ledger.release(data.id, reserve);
        for (const p of parts) p.job.inflight--;
        inflight.delete(data.id);
        this.s.wake();
      });
    inflight.set(data.id, done);
    this.peakInflight = Math.max(this.peakInflight, inflight.size);
  }

  /** A message's row losses came back: each job adds its segment's; a job's last micro-batch of the step starts its optimizer step. */
  private completed(parts: Parts, data: MicroBatchData, losses: Float32Array): void {
    data.segments.forEach((seg, i) => {
      const { job, mb, ahead, stepAt } = parts[i]!;
      if (job.terminal() || job.rollingBack) return;
      let sum = 0;
      for (let r = seg.rowStart; r < seg.rowEnd; r++) sum += losses[r]!;
      const early = ahead && job.step === stepAt; // back before the step it was sent ahead of ended
      if (!Number.isFinite(sum)) {
        this.s.nonFinite(job, `loss became ${sum} at step ${job.step + (early ? 2 : 1)}`);
        return;
      }
      if (early) {
        job.ahead.done.push({ loss: sum, tokens: mb.numTokens, last: mb.lastOfStep, target: mb.stepTargetTokens });
        return;
      }
      job.stepLoss += sum;
      job.tokens += mb.numTokens;
      job.tokensInStep += mb.numTokens;
      job.doneInStep++;
      if (mb.lastOfStep || job.doneInStep >= job.microCount) {
        // the step before may still be evaluating or saving: this one follows it (Steps.optimizerStep)
        if (job.stepping) job.pendingStep = mb.stepTargetTokens;
        else this.s.hold(this.s.optimizerStep(job, mb.stepTargetTokens));
      }
    });
  }
}
