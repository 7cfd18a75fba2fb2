// Which running adapter's micro-batch enters the pipeline next, so that the adapters of a run
// finish together. Round-robin by message gives every adapter the same number of messages: an
// adapter whose step takes several micro-batches (gradient accumulation) then steps at a fraction
// of the others' rate and ends alone, in a tail where one adapter's step barriers leave the
// pipeline half empty. Instead the adapter furthest behind (by the fraction of its steps done)
// goes first, and an adapter behind the leader may have every micro-batch of its current step in
// flight at once, not only its share of the pipeline. Order changes no bit of any adapter's result:
// each adapter's micro-batches still enter in its own data order and every stage adds their
// gradients first in, first out (lib/schedule/packing.ts).

/** What the order looks at, for one adapter that could send a micro-batch now. */
export interface AdmissionCandidate {
  id: number;
  priority: number;
  /** Fraction of its optimizer steps done, counting the micro-batches of the current step already sent (progress()). */
  progress: number;
}

/** Steps done (the current one in part: `sent` of its `micro` micro-batches) over the total. */
export function progress(step: number, sent: number, micro: number, totalSteps: number): number {
  if (totalSteps <= 0) return 1;
  return (step + (micro > 0 ? Math.min(1, sent / micro) : 0)) / totalSteps;
}

/**
 * Micro-batches of one adapter in flight: `base` (lib/schedule/packing.ts microBatchesInFlight)
 * for the leaders, the whole current step (`micro`) for an adapter behind the one furthest ahead.
 */
export function inFlightLimit(mine: number, lead: number, base: number, micro: number): number {
  return mine < lead ? Math.max(base, micro) : base;
}

/** Higher priority first; then the adapter furthest behind; then round-robin from `rr` among equals. */
export function admissionOrder<T>(items: T[], of: (t: T) => AdmissionCandidate, rr: number): T[] {
  const turn = (id: number) => (id - rr + 1e9) % 1e9;
  const keyed = items.map((t) => ({ t, c: of(t) }));
  keyed.sort((x, y) => y.c.priority - x.c.priority || x.c.progress - y.c.progress || turn(x.c.id) - turn(y.c.id));
  return keyed.map((k) => k.t);
}
