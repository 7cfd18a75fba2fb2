// The schedule that actually ran, as stages record it: the grid printer and the simulator read
// the same records.

/** One recorded piece of work on a stage. */
export interface ScheduleRecord {
  stage: number;
  /** F forward (the last stage: forward + loss + backward), B backward, H a head share, S optimizer step, E evaluation */
  kind: 'F' | 'B' | 'H' | 'S' | 'E';
  mb: number;
  adapters: number[];
  /** ms since the pipeline started (one time base for every stage: see clockMs in actors/clock.ts) */
  start: number;
  end: number;
}
