// The schedule that ran, as data: stage × time grid printing, each stage's busy fraction and
// the bubble ratio. Records come from the stages (actors/protocol.ts ScheduleRecord).
import type { ScheduleRecord } from './record.js';

export interface Utilisation {
  /** Wall time from the first start to the last end of the training work (F, B, H, S), ms. */
  spanMs: number;
  /** Busy fraction of each stage within the span: training work and evaluation forwards alike. */
  busy: number[];
  /** The part of `busy` that was evaluation (E records). */
  evalBusy: number[];
  /** 1 − mean busy fraction: the share of stage-time spent idle. */
  bubble: number;
}

/**
 * Busy fractions over the training span. An evaluation inside the span is work a stage does (its
 * forwards keep the stage as busy as training ones), so it counts as busy, not as bubble; the
 * evaluations before the first and after the last training record lie outside the span.
 */
export function utilisation(records: ScheduleRecord[], stages: number, from?: number, to?: number): Utilisation {
  const rs = records.filter((r) => r.kind !== 'E');
  if (!rs.length) return { spanMs: 0, busy: new Array(stages).fill(0), evalBusy: new Array(stages).fill(0), bubble: 0 };
  const t0 = from ?? Math.min(...rs.map((r) => r.start));
  const t1 = to ?? Math.max(...rs.map((r) => r.end));
  const span = Math.max(1e-9, t1 - t0);
  const busy = new Array<number>(stages).fill(0);
  const evalBusy = new Array<number>(stages).fill(0);
  for (const r of records) {
    const o = Math.max(0, Math.min(r.end, t1) - Math.max(r.start, t0));
    busy[r.stage]! += o;
    if (r.kind === 'E') evalBusy[r.stage]! += o;
  }
  const frac = busy.map((b) => b / span);
  return {
    spanMs: span,
    busy: frac,
    evalBusy: evalBusy.map((b) => b / span),
    bubble: 1 - frac.reduce((a, b) => a + b, 0) / stages,
  };
}

/**
 * A stage × time grid: one row per stage, `width` columns over the span; each cell shows the
 * kind of work that covered most of it (F forward, B backward, S optimizer step, E evaluation, · idle),
 * lower-case when the cell is less than half busy.
 */
export function renderGrid(records: ScheduleRecord[], stages: number, width = 80): string {
  const train = records.filter((r) => r.kind !== 'E');
  if (!train.length) return '(no work recorded)';
  const t0 = Math.min(...train.map((r) => r.start));
  const t1 = Math.max(...train.map((r) => r.end));
  const rs = records.filter((r) => r.end > t0 && r.start < t1);
  const dt = (t1 - t0) / width || 1;
  const lines: string[] = [];
  for (let s = 0; s < stages; s++) {
    const cells: string[] = [];
    for (let c = 0; c < width; c++) {
      const a = t0 + c * dt,
        b = a + dt;
      const cover: Record<string, number> = {};
      for (const r of rs) {
        if (r.stage !== s) continue;
        const o = Math.min(r.end, b) - Math.max(r.start, a);
        if (o > 0) cover[r.kind] = (cover[r.kind] ?? 0) + o;
      }
      const best = Object.entries(cover).sort((x, y) => y[1] - x[1])[0];
      if (!best) cells.push('·');
      else cells.push(best[1] >= dt / 2 ? best[0] : best[0].toLowerCase());
    }
    lines.push(`stage ${s} |${cells.join('')}|`);
  }
  const u = utilisation(records, stages);
  lines.push(
    `         ${u.spanMs.toFixed(0)} ms; busy ${pct(u.busy)}` +
      (u.evalBusy.some((b) => b > 0) ? ` (evaluation ${pct(u.evalBusy)})` : '') +
      `; bubble ${(100 * u.bubble).toFixed(1)}%`,
  );
  return lines.join('\n');
}

const pct = (xs: number[]) => xs.map((b) => `${(100 * b).toFixed(0)}%`).join(' / ');

/** The order each stage ran its work in: per stage, "F3 B3 F4 ..." (for comparing runs and simulations). */
export function stageOrder(records: ScheduleRecord[], stages: number): string[][] {
  const out: string[][] = Array.from({ length: stages }, () => []);
  for (const r of [...records].sort((a, b) => a.start - b.start))
    if (r.kind === 'F' || r.kind === 'B') out[r.stage]!.push(`${r.kind}${r.mb}`);
  return out;
}

/**
 * The steady part of a run: from the moment every adapter in `adapters` has finished its
 * `lead`-th optimizer step (its S record on every stage) to the moment each has finished
 * `lead + steps` of them, so a benchmark window holds `steps` steps of every adapter and neither
 * the pipeline's fill nor its drain (a long training run pays those once, not every step).
 * Undefined when the records hold fewer steps.
 */
export function steadyWindow(
  records: ScheduleRecord[],
  adapters: number[],
  lead: number,
  steps: number,
): { from: number; to: number } | undefined {
  const stages = new Set(records.map((r) => r.stage));
  let from = -Infinity,
    to = -Infinity;
  for (const a of adapters)
    for (const s of stages) {
      const ends = records
        .filter((r) => r.kind === 'S' && r.stage === s && r.adapters.includes(a))
        .map((r) => r.end)
        .sort((x, y) => x - y);
      if (ends.length < lead + steps || lead < 1) return undefined;
      from = Math.max(from, ends[lead - 1]!);
      to = Math.max(to, ends[lead + steps - 1]!);
    }
  return to > from ? { from, to } : undefined;
}
