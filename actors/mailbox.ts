// The order a stage actor (actors/stage.ts) takes its messages in. Control first (steps,
// drops, management calls: they are short and others wait on them). Then a head share: the
// last stage waits for its answer, and the head adds to no adapter's gradient, so taking it out
// of turn changes no sum's order. Then, before the last stage, a Forward before a Backward: the
// Forward is the next stage's work, while a Backward only ends its micro-batch, and with every
// adapter's next micro-batch waiting on its optimizer step, a next stage left without work
// idles (the bubble of the demo: docs/benchmarks.md). Memory is no reason to prefer the
// Backward: admission holds each message's bytes on every stage while it is in flight. Backwards
// (and the last stage's head answers) among themselves stay first in, first out: that is the
// order every stage adds the gradients of one adapter's micro-batches in.

/** A stage's mailbox: one queue per lane, each in arrival order. */
export interface Lanes<C, B extends { type: string }, F> {
  control: C[];
  /** Backward, the head share and its answer. */
  backward: B[];
  forward: F[];
}

/**
 * Takes the stage's next message out of its lanes (undefined: nothing it can run now). `last`:
 * this is the last stage; `ready`: a Forward may run (its adapters' optimizer steps are there).
 */
export function takeNext<C, B extends { type: string }, F>(
  lanes: Lanes<C, B, F>,
  last: boolean,
  ready: (f: F) => boolean,
): C | B | F | undefined {
  if (lanes.control.length) return lanes.control.shift();
  const h = lanes.backward.findIndex((m) => m.type === 'head');
  if (h >= 0) return lanes.backward.splice(h, 1)[0];
  const i = lanes.forward.findIndex(ready);
  if (!last && i >= 0) return lanes.forward.splice(i, 1)[0];
  if (lanes.backward.length) return lanes.backward.shift();
  if (i >= 0) return lanes.forward.splice(i, 1)[0];
  return undefined;
}
