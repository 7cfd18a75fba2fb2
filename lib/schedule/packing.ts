// How the scheduler fills the pipeline: how many adapters share one BatchLoRA message, and how
// many micro-batches of one adapter's step may be in flight at once. The scheduler, the
// --dry-run plan and the README all follow these two functions.
//
// One device: every running adapter in one message (BatchLoRA at its widest). A pipeline of S
// stages: about 2 messages per stage, so while some adapters take their optimizer step the
// others keep every stage busy (no flush). When the running adapters make fewer messages than
// the pipeline holds, each adapter sends several micro-batches of its current step at once
// (GPipe/1F1B within a step): they read the same weights, their gradients are added on every
// stage in the order they were issued (each stage's mailbox and each stage-to-stage channel is
// first in, first out), so the result is bitwise that of running them one after another.

/** Most adapters in one micro-batch message; `override` is pipeline.adapters_per_micro_batch. */
export function adaptersPerMessage(running: number, stages: number, override?: number): number {
  if (override !== undefined) return override;
  if (stages <= 1) return Math.max(1, running);
  return Math.max(1, Math.ceil(running / (2 * stages)));
}

/**
 * Micro-batches of one adapter in flight at once: 1 while the running adapters alone fill the
 * `inflight` messages the pipeline holds, more when they are too few; `override` is
 * pipeline.inflight_per_adapter. One device gains nothing from it (a stage runs one call at a time).
 */
export function microBatchesInFlight(running: number, stages: number, inflight: number, override?: number): number {
  if (override !== undefined) return override;
  if (stages <= 1 || running < 1) return 1;
  const messages = Math.ceil(running / adaptersPerMessage(running, stages));
  return Math.max(1, Math.ceil(inflight / messages));
}
