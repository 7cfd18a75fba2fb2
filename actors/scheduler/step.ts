// A job's optimizer step and what follows it on schedule: the learning rate, the global
// gradient norm (clipping needs it over every stage before the step), AdamW on every stage, the
// `step` event, held-out evaluation, checkpoints, and at the end the finished adapter and its
// prompt samples.
import { lrAt } from '../../lib/lora/schedule.js';
import type { AdapterState, StepParams } from '../../lib/lora/state.js';
import { assemble } from './assemble.js';
import type { Job } from './job.js';
import type { SchedulerContext } from './context.js';

export class Steps {
  constructor(private readonly s: SchedulerContext) {}

  /** Runs when the last micro-batch of the job's step is done (Admission.completed). */
  async optimizerStep(job: Job, stepTargetTokens: number): Promise<void> {
    const { pipeline, hooks } = this.s;
    job.stepping = true;
    job.stepUnderWay = true;
    this.s.wake(); // the next step's micro-batches may go out now (Admission.ahead)
    try {
      const c = job.config;
      const lr = lrAt(c.optimizer.lr * job.lrScale, c.schedule, job.step, job.totalSteps);
      const params = (gradScale: number): StepParams => ({
        lr,
        beta1: c.optimizer.betas[0],
        beta2: c.optimizer.betas[1],
        eps: c.optimizer.eps,
        weightDecay: c.optimizer.weight_decay,
        step: job.step + 1,
        gradScale,
      });
      const clip = c.max_grad_norm;
      // clipping needs the global norm over every stage before the step; without clipping the
      // norm (for the metrics) comes back with the step, in one round trip
      const gradNorm =
        clip !== undefined
          ? Math.sqrt(await pipeline.gradSumsq(job.id))
          : Math.sqrt((await pipeline.step(job.id, params(1), true)).sumsq ?? NaN);
      if (!Number.isFinite(gradNorm)) {
        // what went out ahead of this step waits for it on the stages: it gets the step anyway
        // (its losses and the weights are dropped with the adapter, or replaced by the rollback)
        if (clip !== undefined && job.ahead.admitted > 0) await pipeline.step(job.id, params(1));
        this.s.nonFinite(job, `gradient norm became ${gradNorm} at step ${job.step + 1}`);
        return;
      }
      if (clip !== undefined) await pipeline.step(job.id, params(Math.min(1, clip / (gradNorm + 1e-6))));
      // in the same turn as the stages' answer (no admission runs in between): from here on a
      // micro-batch of the next step goes out the ordinary way, not ahead of a step
      job.stepUnderWay = false;
      // cancelled (or failed) while the step ran: it must not go on to finish() and turn 'done'
      if (job.terminal()) return;
      job.step++;
      const loss = job.stepLoss / Math.max(1, stepTargetTokens);
      job.lastLoss = loss;
      job.emit({
        type: 'step',
        adapter: job.name,
        step: job.step,
        totalSteps: job.totalSteps,
        loss,
        lr,
        tokens: job.tokens,
        gradNorm,
        time: Date.now(),
      });
      job.nextStep();
      // (a micro-batch of the next step may have gone out ahead of this one: the step after is then begun)
      const last = job.step >= job.totalSteps || (job.admittedInStep === 0 && job.peek() === null);
      if (job.evalSource && c.eval && (job.step % c.eval.every === 0 || last)) await this.evaluate(job);
      const saving = c.save_every !== undefined && job.step % c.save_every === 0 && !last;
      const rollsBack = c.on_nan.action === 'rollback';
      // one export serves the checkpoint and the rollback point (which follows the checkpoints, also when nothing is written)
      const state = saving && (hooks.checkpoint || rollsBack) ? await pipeline.exportAdapter(job.id) : undefined;
      if (state && rollsBack) job.setRollbackPoint(state);
      if (hooks.checkpoint && state) {
        let path: string;
        try {
          path = await hooks.checkpoint(job, state);
        } catch (e) {
          // a full disk or an unwritable output: the previous checkpoint stays valid (a save is written aside, then swapped in)
          throw new Error(
            `could not write the checkpoint at step ${job.step}: ${(e as Error).message}; training of '${job.name}' stopped, its newest complete checkpoint is kept (free space or fix the output, then --resume)`,
          );
        }
        job.emit({ type: 'checkpoint', adapter: job.name, step: job.step, path, time: Date.now() });
      }
      if (last) await this.finish(job);
    } catch (e) {
      if (!this.s.pipelineFailed(e)) this.s.failJob(job, (e as Error).message);
    } finally {
      job.stepUnderWay = false;
      job.stepping = false;
      // the next step was complete before this one ended (it had gone out ahead of it)
      const next = job.pendingStep;
      job.pendingStep = undefined;
      if (next !== undefined && !job.terminal() && !job.rollingBack) this.s.hold(this.optimizerStep(job, next));
    }
  }

  /** Held-out loss over the job's eval data. */
  async evaluate(job: Job): Promise<{ loss: number; perplexity: number; tokens: number }> {
    const src = job.evalSource!();
    let sum = 0;
    let count = 0;
    for (let mb = src.next(); mb; mb = src.next()) {
      const data = assemble(this.s.nextMessageId(), [{ adapter: job.id, serial: 0, mb }], mb.numTokens, true);
      const losses = await this.evalMessage(data);
      for (let i = 0; i < losses.length; i++) sum += losses[i]!;
      count += mb.numTargetTokens;
    }
    const loss = sum / Math.max(1, count);
    const r = { loss, perplexity: Math.exp(loss), tokens: count };
    job.lastEval = r;
    job.emit({
      type: 'eval',
      adapter: job.name,
      step: job.step,
      loss,
      perplexity: r.perplexity,
      tokens: count,
      time: Date.now(),
    });
    return r;
  }

  /**
   * One evaluation message, within the admission limit: a job evaluates while its next step's
   * micro-batch may be in flight (Admission.ahead), and every message holds shared slots. A
   * waiting evaluation keeps new training messages out, so it is not passed over.
   */
  private async evalMessage(data: ReturnType<typeof assemble>): Promise<Float32Array> {
    const { inflight, evaluations: e } = this.s;
    e.waiting++;
    try {
      while (inflight.size + e.inflight.size >= this.s.admissionLimit)
        await Promise.race([...inflight.values(), ...e.inflight]).catch(() => {});
    } finally {
      e.waiting--;
    }
    const p = this.s.pipeline.evaluate(data);
    e.inflight.add(p);
    try {
      return await p;
    } finally {
      e.inflight.delete(p);
      this.s.wake();
    }
  }

  /** Before the first step: the held-out loss (step 0) and the prompts' completions, for the before -> after comparison. */
  async baseline(job: Job, initial: AdapterState): Promise<void> {
    if (job.evalSource) job.baselineEval = await this.evaluate(job);
    await this.samples(job, initial, 'before');
  }

  private async samples(job: Job, state: AdapterState, when: 'before' | 'after'): Promise<void> {
    const { hooks } = this.s;
    if (!hooks.sample || !job.config.eval?.prompts.length) return;
    let got: Array<{ prompt: string; text: string }>;
    try {
      got = await hooks.sample(job, state);
    } catch (e) {
      // the samples are for people to read: without them the adapter still trains (or is still done)
      job.emit({
        type: 'error',
        adapter: job.name,
        message: `could not sample eval.prompts ${when} training: ${(e as Error).message}`,
        time: Date.now(),
      });
      return;
    }
    for (const s of got) job.emit({ type: 'sample', adapter: job.name, step: job.step, when, ...s, time: Date.now() });
  }

  /** The job's last step is done: its samples, its adapter written, then off the stages. */
  async finish(job: Job): Promise<void> {
    const state = await this.s.pipeline.exportAdapter(job.id);
    await this.samples(job, state, 'after');
    if (this.s.hooks.finish) job.outputPath = await this.s.hooks.finish(job, state);
    job.emit({
      type: 'done',
      adapter: job.name,
      steps: job.step,
      loss: job.lastLoss,
      path: job.outputPath,
      time: Date.now(),
    });
    job.setState('done');
    await this.s.takeOff(job);
  }
}
