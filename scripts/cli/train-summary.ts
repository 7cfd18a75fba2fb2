// What `mlora train` prints at the end of a run: the summary table (steps, losses, held-out
// loss before -> after, tokens, time; the greedy samples), with the earlier runs' records of a
// resumed run read back from its metrics.jsonl.
import fs from 'node:fs';
import type { Job } from '../../actors/scheduler/job.js';
import type { JobEvent } from '../../actors/protocol.js';

type Ev<T extends JobEvent['type']> = Extract<JobEvent, { type: T }>;

/** The end-of-run table; `events` are this run's and, on a resume, the earlier runs' (the step-0 eval, the first samples). */
export function summaryTable(jobs: Job[], seconds: number, bubble: number | undefined, events: JobEvent[]): string {
  const rows = [['adapter', 'state', 'steps', 'final loss', 'eval loss before -> after', 'eval ppl', 'tokens', 'time']];
  for (const j of jobs) {
    const t = j.finishedAt && j.startedAt ? (j.finishedAt - j.startedAt) / 1000 : 0;
    const before =
      j.baselineEval ?? events.find((e): e is Ev<'eval'> => e.type === 'eval' && e.adapter === j.name && e.step === 0);
    const evalLoss = j.lastEval ? `${before ? `${before.loss.toFixed(4)} -> ` : ''}${j.lastEval.loss.toFixed(4)}` : '-';
    rows.push([
      j.name,
      j.state,
      `${j.step}/${j.totalSteps}`,
      Number.isFinite(j.lastLoss) ? j.lastLoss.toFixed(4) : '-',
      evalLoss,
      j.lastEval ? j.lastEval.perplexity.toFixed(2) : '-',
      String(j.tokens),
      `${t.toFixed(1)}s`,
    ]);
  }
  const w = rows[0]!.map((_, i) => Math.max(...rows.map((r) => r[i]!.length)));
  const lines = rows.map((r) => r.map((c, i) => (i === 0 ? c.padEnd(w[i]!) : c.padStart(w[i]!))).join('  '));
  lines.splice(1, 0, w.map((n) => '-'.repeat(n)).join('  '));
  const tokens = jobs.reduce((s, j) => s + j.tokens, 0);
  lines.push(
    '',
    `overall: ${tokens} tokens in ${seconds.toFixed(1)} s = ${Math.round(tokens / Math.max(1e-9, seconds))} tokens/s` +
      (bubble !== undefined ? `; bubble ratio ${(100 * bubble).toFixed(1)}%` : ''),
  );
  const samples = events.filter((e): e is Ev<'sample'> => e.type === 'sample');
  const one = (s: string) => JSON.stringify(s.length > 200 ? `${s.slice(0, 200)}…` : s);
  for (const j of jobs) {
    const mine = samples.filter((e) => e.adapter === j.name);
    const prompts = [...new Set(mine.map((e) => e.prompt))];
    if (!prompts.length) continue;
    lines.push('', `[${j.name}] greedy samples`);
    for (const p of prompts) {
      lines.push(`  prompt ${one(p)}`);
      for (const when of ['before', 'after'] as const) {
        const e = mine.filter((x) => x.prompt === p && x.when === when).at(-1);
        if (e) lines.push(`    ${when.padEnd(6)} (step ${e.step}): ${one(e.text)}`);
      }
    }
  }
  return lines.join('\n');
}

/** Metrics records already in an output (a resumed run's earlier runs), as events; none when there is no file. */
export function earlierEvents(file: string): JobEvent[] {
  let text: string;
  try {
    text = fs.readFileSync(file, 'utf8');
  } catch {
    return [];
  }
  const out: JobEvent[] = [];
  for (const line of text.split('\n')) {
    if (!line.trim()) continue;
    try {
      const r = JSON.parse(line) as JobEvent & { time: string | number };
      if (typeof r.time === 'string') r.time = Date.parse(r.time);
      out.push(r as JobEvent);
    } catch {
      // a line cut short by a crash: the rest is still read
    }
  }
  return out;
}
