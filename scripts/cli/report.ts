// report.html: one self-contained page for a person to read after a run (inline SVG and a few
// lines of inline script, nothing fetched: it opens offline and can be mailed around). What
// ran (config, machine, run id), how each adapter did (held-out loss before -> after, greedy
// samples before and after), and how the run went: training and eval loss, learning rate,
// tokens/s, memory per stage against its budget, stage utilisation, with faults, recoveries
// and rollbacks marked on the time axes.
import fs from 'node:fs';
import path from 'node:path';
import type { JobEvent } from '../../actors/protocol.js';
import type { ScheduleRecord } from '../../lib/schedule/record.js';
import { utilisation } from '../../lib/schedule/grid.js';
import { formatBytes } from '../../lib/tensor.js';

const COLORS = ['#1f77b4', '#d62728', '#2ca02c', '#9467bd', '#ff7f0e', '#17becf', '#8c564b', '#e377c2'];
const esc = (s: string) => s.replace(/[&<>"]/g, (c) => ({ '&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;' })[c]!);
type Ev<T extends JobEvent['type']> = Extract<JobEvent, { type: T }>;

/** A stage fault as the pipeline reported it (train.ts onFault), with the wall time it was seen. */
export interface ReportFault {
  time: number;
  stage: number;
  fault: string;
  detail: string;
  recoveredMs?: number;
  replayed?: number;
  fatal?: boolean;
}

export interface MemorySample {
  /** Wall time (ms). */
  time: number;
  stages: Array<{ device: string; budget: number; used: number; peak: number }>;
}

export interface ReportInput {
  output: string;
  /** The run header written to metrics.jsonl (run id, start, mlora version, machine, config hash). */
  header: Record<string, unknown>;
  /** The training config as parsed (defaults filled in). */
  config: unknown;
  /** Every event by step: the earlier runs' (a resume) and this run's. */
  events: JobEvent[];
  /** This run's events (the time axes). */
  runEvents: JobEvent[];
  faults: ReportFault[];
  schedule: ScheduleRecord[];
  stages: number;
  devices: string[];
  memory: MemorySample[];
  /** Wall time (ms) the run started; the time axes count seconds from it, the stage records from the pipeline's start, taken as the same. */
  t0: number;
}

interface Series {
  name: string;
  color: string;
  points: Array<[number, number]>;
  dash?: boolean;
}
interface Marker {
  x: number;
  label: string;
  color: string;
}

const W = 540,
  H = 300,
  PL = 62,
  PR = 16,
  PT = 16,
  PB = 40;

function ticks(lo: number, hi: number, n = 5): number[] {
  if (!(hi > lo)) return [lo];
  const raw = (hi - lo) / n;
  const mag = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 2.5, 5, 10].map((m) => m * mag).find((s) => s >= raw) ?? raw;
  const out: number[] = [];
  for (let v = Math.ceil(lo / step) * step; v <= hi + step * 1e-9; v += step) out.push(Number(v.toPrecision(12)));
  return out;
}

const fmt = (v: number) =>
  v === 0 ? '0' : Math.abs(v) >= 1e4 || Math.abs(v) < 1e-2 ? v.toExponential(1) : Number(v.toPrecision(3)).toString();

/** A line chart as inline SVG: each series a <g data-series>, markers as labelled vertical lines. */
function lineChart(
  id: string,
  series: Series[],
  o: { x: string; y: string; yFmt?: (v: number) => string; markers?: Marker[]; yMin?: number },
): string {
  const live = series.filter((s) => s.points.length);
  if (!live.length) return `<p class="empty" data-chart="${id}">Nothing was recorded.</p>`;
  const xs = live.flatMap((s) => s.points.map((p) => p[0])),
    ys = live.flatMap((s) => s.points.map((p) => p[1]));
  let x0 = Math.min(...xs),
    x1 = Math.max(...xs);
  for (const m of o.markers ?? []) {
    x0 = Math.min(x0, m.x);
    x1 = Math.max(x1, m.x);
  }
  if (x1 === x0) x1 = x0 + 1;
  let y0 = o.yMin ?? Math.min(...ys),
    y1 = Math.max(...ys);
  if (y1 === y0) {
    y0 -= Math.abs(y0) * 0.05 || 0.5;
    y1 += Math.abs(y1) * 0.05 || 0.5;
  } else if (o.yMin === undefined) {
    const pad = (y1 - y0) * 0.05;
    y0 -= pad;
    y1 += pad;
  }
  const sx = (x: number) => PL + ((W - PL - PR) * (x - x0)) / (x1 - x0);
  const sy = (y: number) => H - PB - ((H - PT - PB) * (y - y0)) / (y1 - y0);
  const yf = o.yFmt ?? fmt;
  let svg = `<svg data-chart="${id}" viewBox="0 0 ${W} ${H}" xmlns="http://www.w3.org/2000/svg" role="img" aria-label="${esc(o.y)} over ${esc(o.x)}">`;
  for (const v of ticks(y0, y1))
    svg += `<line class="grid" x1="${PL}" x2="${W - PR}" y1="${sy(v).toFixed(1)}" y2="${sy(v).toFixed(1)}"/><text class="tick" x="${PL - 6}" y="${(sy(v) + 4).toFixed(1)}" text-anchor="end">${esc(yf(v))}</text>`;
  for (const v of ticks(x0, x1, 6))
    svg += `<text class="tick" x="${sx(v).toFixed(1)}" y="${H - PB + 16}" text-anchor="middle">${esc(fmt(v))}</text>`;
  svg += `<line class="axis" x1="${PL}" y1="${H - PB}" x2="${W - PR}" y2="${H - PB}"/><line class="axis" x1="${PL}" y1="${PT}" x2="${PL}" y2="${H - PB}"/>`;
  svg += `<text class="label" x="${(PL + W - PR) / 2}" y="${H - 6}" text-anchor="middle">${esc(o.x)}</text><text class="label" x="12" y="${(PT + H - PB) / 2}" transform="rotate(-90 12 ${(PT + H - PB) / 2})" text-anchor="middle">${esc(o.y)}</text>`;
  for (const m of o.markers ?? []) {
    svg += `<g class="marker" data-marker="${esc(m.label)}"><line x1="${sx(m.x).toFixed(1)}" x2="${sx(m.x).toFixed(1)}" y1="${PT}" y2="${H - PB}" stroke="${m.color}" stroke-dasharray="4 3"/><title>${esc(m.label)}</title></g>`;
  }
  for (const s of live) {
    const pts = s.points.map(([x, y]) => `${sx(x).toFixed(1)},${sy(y).toFixed(1)}`);
    svg += `<g data-series="${esc(s.name)}"><title>${esc(s.name)}</title>`;
    if (s.points.length > 1)
      svg += `<polyline fill="none" stroke="${s.color}" stroke-width="2"${s.dash ? ' stroke-dasharray="6 4"' : ''} points="${pts.join(' ')}"/>`;
    if (s.points.length <= 40)
      for (const [x, y] of s.points)
        svg += `<circle cx="${sx(x).toFixed(1)}" cy="${sy(y).toFixed(1)}" r="2.5" fill="${s.color}"><title>${esc(s.name)}: ${esc(fmt(x))}, ${esc(yf(y))}</title></circle>`;
    svg += '</g>';
  }
  svg += '</svg>';
  const legend = live
    .map(
      (s) =>
        `<span class="key" data-key="${esc(s.name)}"><i style="background:${s.color}${s.dash ? ';opacity:.5' : ''}"></i>${esc(s.name)}</span>`,
    )
    .join('');
  return `<figure>${svg}<figcaption>${legend}</figcaption></figure>`;
}

function bySeries<T extends { adapter: string }>(
  events: T[],
  color: Map<string, string>,
  point: (e: T) => [number, number] | undefined,
): Series[] {
  const m = new Map<string, Array<[number, number]>>();
  for (const e of events) {
    const p = point(e);
    if (p && Number.isFinite(p[1])) (m.get(e.adapter) ?? m.set(e.adapter, []).get(e.adapter)!).push(p);
  }
  return [...m].map(([name, points]) => ({ name, color: color.get(name) ?? '#555', points }));
}

/**
 * Tokens/s of all adapters over time: the tokens of the steps that ended in each of about 24
 * equal windows of the run, over the window (steps end in bursts; a rate between two
 * consecutive steps would be mostly noise).
 */
function throughput(steps: Array<Ev<'step'>>, t0: number): Array<[number, number]> {
  if (steps.length < 2) return [];
  const sorted = [...steps].sort((a, b) => a.time - b.time);
  const prev = new Map<string, number>();
  const done: Array<[number, number]> = []; // (seconds, tokens of this step)
  for (const s of sorted) {
    // a step's tokens: its cumulative count less the one before (the first step of an adapter in this run: its average)
    const before = prev.get(s.adapter);
    done.push([(s.time - t0) / 1000, before === undefined ? s.tokens / Math.max(1, s.step) : s.tokens - before]);
    prev.set(s.adapter, s.tokens);
  }
  const a = done[0]![0],
    b = done.at(-1)![0];
  const w = Math.max((b - a) / 24, 0.5);
  const n = Math.max(1, Math.ceil((b - a) / w));
  const sums = new Array<number>(n).fill(0);
  for (const [t, tok] of done) sums[Math.min(n - 1, Math.floor((t - a) / w))]! += tok;
  return sums.map((v, i) => [a + (i + 0.5) * w, v / w]);
}

function stageChart(sched: ScheduleRecord[], stages: number, devices: string[], markers: Marker[]): string {
  const rs = sched.filter((r) => r.kind !== 'E');
  if (!rs.length) return '<p class="empty" data-chart="stages">No stage work was recorded.</p>';
  const rowH = 26,
    P = 120,
    WW = 1100;
  const HH = stages * rowH + 44;
  const t1 = Math.max(...rs.map((r) => r.end), ...markers.map((m) => m.x * 1000));
  const sx = (t: number) => P + ((WW - P - 16) * t) / Math.max(1e-9, t1);
  const color: Record<string, string> = { F: '#1f77b4', B: '#d62728', S: '#2ca02c' };
  const u = utilisation(sched, stages);
  let svg = `<svg data-chart="stages" viewBox="0 0 ${WW} ${HH}" xmlns="http://www.w3.org/2000/svg" role="img" aria-label="stage utilisation over time">`;
  for (let s = 0; s < stages; s++) {
    svg += `<text class="label" x="4" y="${s * rowH + 24}">${esc(devices[s] ?? `stage ${s}`)} · ${(100 * u.busy[s]!).toFixed(0)}% busy</text>`;
    svg += `<g data-series="stage ${s}">`;
    for (const r of rs.filter((x) => x.stage === s)) {
      svg += `<rect x="${sx(r.start).toFixed(1)}" y="${s * rowH + 10}" width="${Math.max(0.5, sx(r.end) - sx(r.start)).toFixed(1)}" height="${rowH - 8}" fill="${color[r.kind]}"/>`;
    }
    svg += '</g>';
  }
  for (const m of markers) {
    svg += `<g class="marker" data-marker="${esc(m.label)}"><line x1="${sx(m.x * 1000).toFixed(1)}" x2="${sx(m.x * 1000).toFixed(1)}" y1="4" y2="${stages * rowH + 14}" stroke="${m.color}" stroke-width="2"/><title>${esc(m.label)}</title></g>`;
  }
  for (const v of ticks(0, t1 / 1000, 8))
    svg += `<text class="tick" x="${sx(v * 1000).toFixed(1)}" y="${HH - 18}" text-anchor="middle">${fmt(v)} s</text>`;
  svg += '</svg>';
  return `<figure class="wide">${svg}<figcaption><span class="key"><i style="background:#1f77b4"></i>forward</span><span class="key"><i style="background:#d62728"></i>backward</span><span class="key"><i style="background:#2ca02c"></i>optimizer step</span> · bubble ${(100 * u.bubble).toFixed(1)}%</figcaption></figure>`;
}

function table(head: string[], rows: string[][], cls = ''): string {
  return `<table class="${cls}"><thead><tr>${head.map((h) => `<th>${h}</th>`).join('')}</tr></thead><tbody>${rows.map((r) => `<tr>${r.map((c) => `<td>${c}</td>`).join('')}</tr>`).join('')}</tbody></table>`;
}

export function renderReport(r: ReportInput): string {
  const names = [
    ...new Set(r.events.filter((e) => 'adapter' in e && e.adapter).map((e) => (e as { adapter: string }).adapter)),
  ];
  const color = new Map(names.map((n, i) => [n, COLORS[i % COLORS.length]!]));
  // a resumed run redoes the steps after its checkpoint: the later record of a step stands
  const latest = <T extends { adapter: string; step: number }>(xs: T[]) =>
    [...new Map(xs.map((x) => [`${x.adapter}\0${x.step}`, x])).values()].sort((a, b) => a.step - b.step);
  const steps = latest(r.events.filter((e): e is Ev<'step'> => e.type === 'step'));
  const evals = latest(r.events.filter((e): e is Ev<'eval'> => e.type === 'eval'));
  const samples = r.events.filter((e): e is Ev<'sample'> => e.type === 'sample');
  const rollbacks = r.runEvents.filter((e): e is Ev<'rollback'> => e.type === 'rollback');
  const errors = r.runEvents.filter((e): e is Ev<'error'> => e.type === 'error');
  const sec = (t: number) => (t - r.t0) / 1000;

  // markers on the time axes: stage faults (and their recovery), rollbacks, adapters that stopped
  const timeMarkers: Marker[] = [];
  for (const f of r.faults) {
    timeMarkers.push({
      x: sec(f.time),
      label: `${f.fault} on stage ${f.stage}: ${f.detail}${f.fatal ? ' (run stopped)' : ''}`,
      color: '#d62728',
    });
    if (f.recoveredMs !== undefined)
      timeMarkers.push({
        x: sec(f.time + f.recoveredMs),
        label: `stage ${f.stage} recovered after ${Math.round(f.recoveredMs)} ms, ${f.replayed ?? 0} micro-batch(es) replayed`,
        color: '#2ca02c',
      });
  }
  for (const b of rollbacks)
    timeMarkers.push({
      x: sec(b.time),
      label: `[${b.adapter}] rollback from step ${b.fromStep} to ${b.toStep}: ${b.reason}`,
      color: '#ff7f0e',
    });
  for (const e of errors) timeMarkers.push({ x: sec(e.time), label: `[${e.adapter}] ${e.message}`, color: '#7f0000' });
  const stepMarkers: Marker[] = rollbacks.map((b) => ({
    x: b.fromStep,
    label: `[${b.adapter}] rollback ${b.fromStep} -> ${b.toStep}`,
    color: '#ff7f0e',
  }));

  const lossChart = lineChart(
    'loss',
    bySeries(steps, color, (e) => [e.step, e.loss]),
    { x: 'optimizer step', y: 'training loss', markers: stepMarkers },
  );
  const evalChart = lineChart(
    'eval',
    bySeries(evals, color, (e) => [e.step, e.loss]),
    { x: 'optimizer step (0 = before training)', y: 'held-out loss' },
  );
  const lrChart = lineChart(
    'lr',
    bySeries(steps, color, (e) => [e.step, e.lr]),
    { x: 'optimizer step', y: 'learning rate', yMin: 0 },
  );
  const runSteps = r.runEvents.filter((e): e is Ev<'step'> => e.type === 'step');
  const tps = lineChart('throughput', [{ name: 'all adapters', color: '#333', points: throughput(runSteps, r.t0) }], {
    x: 'seconds since the run started',
    y: 'tokens / s',
    yMin: 0,
    markers: timeMarkers,
  });
  // bytes used per stage; its budget as a dashed line when it is near enough to be read on the
  // same axis, else named in the legend (a CPU budget of GiB against MiB used would flatten the lines)
  const mib = (b: number) => b / 2 ** 20;
  const memSeries: Series[] = [];
  const maxUsed = Math.max(0, ...r.memory.flatMap((m) => m.stages.map((x) => x.peak)));
  for (let s = 0; s < r.stages; s++) {
    const c = COLORS[s % COLORS.length]!;
    const dev = r.devices[s] ?? `stage ${s}`;
    const budget = r.memory.map((m) => m.stages[s]?.budget ?? 0).find((b) => b > 0);
    const near = budget !== undefined && budget <= 4 * maxUsed;
    memSeries.push({
      name: `${dev} used${budget && !near ? ` (budget ${formatBytes(budget)})` : ''}`,
      color: c,
      points: r.memory.filter((m) => m.stages[s]).map((m) => [sec(m.time), mib(m.stages[s]!.used)]),
    });
    if (budget && near && r.memory.length)
      memSeries.push({
        name: `${dev} budget`,
        color: c,
        dash: true,
        points: [
          [sec(r.memory[0]!.time), mib(budget)],
          [sec(r.memory.at(-1)!.time), mib(budget)],
        ],
      });
  }
  const memChart = lineChart('memory', memSeries, {
    x: 'seconds since the run started',
    y: 'MiB',
    yMin: 0,
    markers: timeMarkers,
  });
  const gradChart = lineChart(
    'gradnorm',
    bySeries(steps, color, (e) => [e.step, e.gradNorm]),
    { x: 'optimizer step', y: 'gradient norm (before clipping)', yMin: 0, markers: stepMarkers },
  );

  // per adapter: how far it got and the held-out loss before -> after
  const summary = names.map((n) => {
    const st = steps.filter((e) => e.adapter === n);
    const ev = evals.filter((e) => e.adapter === n);
    const done = r.runEvents.find((e): e is Ev<'done'> => e.type === 'done' && e.adapter === n);
    const err = errors.filter((e) => e.adapter === n).at(-1);
    const lastStep = st.at(-1);
    const before = ev.find((e) => e.step === 0),
      after = ev.at(-1);
    const state = done ? 'done' : err ? 'failed' : 'unfinished';
    return [
      `<span class="dot" style="background:${color.get(n)}"></span>${esc(n)}`,
      `<span class="state ${state}">${state}</span>`,
      lastStep ? `${lastStep.step}/${lastStep.totalSteps}` : '-',
      lastStep ? lastStep.loss.toFixed(4) : '-',
      after
        ? `${before && before !== after ? `${before.loss.toFixed(4)} → ` : ''}<b>${after.loss.toFixed(4)}</b>`
        : '-',
      after ? after.perplexity.toFixed(2) : '-',
      lastStep ? String(lastStep.tokens) : '-',
    ];
  });

  const prompts = names.flatMap((n) => {
    const mine = samples.filter((s) => s.adapter === n);
    return [...new Set(mine.map((s) => s.prompt))].map((p) => {
      const pick = (w: 'before' | 'after') => mine.filter((s) => s.prompt === p && s.when === w).at(-1);
      const b = pick('before'),
        a = pick('after');
      const cell = (s: typeof b) =>
        s ? `<pre>${esc(s.text)}</pre><small>step ${s.step}</small>` : '<small>not sampled</small>';
      return [esc(n), `<pre>${p ? esc(p) : '<i>(empty: BOS)</i>'}</pre>`, cell(b), cell(a)];
    });
  });

  const faultRows = [
    ...r.faults.map((f) => [
      `${sec(f.time).toFixed(1)} s`,
      `stage ${f.stage}`,
      esc(f.fault),
      esc(f.detail),
      f.fatal
        ? 'run stopped'
        : f.recoveredMs !== undefined
          ? `recovered in ${Math.round(f.recoveredMs)} ms, ${f.replayed ?? 0} replayed`
          : '-',
    ]),
    ...rollbacks.map((b) => [
      `${sec(b.time).toFixed(1)} s`,
      esc(b.adapter),
      'rollback',
      esc(b.reason),
      `step ${b.fromStep} → ${b.toStep}, lr × ${b.lrScale}`,
    ]),
    ...errors.map((e) => [
      `${sec(e.time).toFixed(1)} s`,
      esc(e.adapter),
      'error',
      esc(e.message),
      r.runEvents.some((d) => d.type === 'done' && d.adapter === e.adapter)
        ? 'the adapter went on and finished'
        : 'adapter stopped',
    ]),
  ];

  const h = r.header;
  const m = (h.machine ?? {}) as Record<string, unknown>;
  const peaks = r.memory.at(-1)?.stages ?? [];
  const facts: Array<[string, string]> = [
    ['run', `${esc(String(h.run ?? '-'))} (${esc(String(h.mode ?? ''))})`],
    ['started', esc(String(h.start ?? '-'))],
    ['mlora', esc(String(h.mlora ?? '-'))],
    ['config', `${esc(String(h.config_file ?? '-'))} · hash ${esc(String(h.config_hash ?? '-'))}`],
    [
      'CPU',
      `${esc(String(m.cpu ?? '-'))} · ${esc(String(m.cores ?? '-'))} cores · GEMM kernel ${esc(String(m.gemm_kernel ?? '-'))}`,
    ],
    [
      'GPU',
      m.cuda_gemm
        ? `${esc(String(m.cuda_devices))} CUDA device(s) · GEMM ${esc(String(m.cuda_gemm))}`
        : `${esc(String(m.cuda_devices ?? 0))} CUDA device(s)`,
    ],
    [
      'stages',
      r.devices
        .map(
          (d, s) =>
            `${esc(d)}${peaks[s] ? ` (peak ${formatBytes(peaks[s]!.peak)}${peaks[s]!.budget ? ` of ${formatBytes(peaks[s]!.budget)}` : ''})` : ''}`,
        )
        .join(', '),
    ],
    ['system', `${esc(String(m.os ?? '-'))} · node ${esc(String(m.node ?? '-'))}`],
  ];

  return `<!doctype html><html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1"><title>mlora report ${esc(String(h.run ?? ''))}</title>
<style>
:root{--fg:#1d2330;--muted:#667085;--line:#e4e7ec;--card:#fff;--bg:#f6f7f9}
*{box-sizing:border-box}body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:var(--fg);background:var(--bg);margin:0;padding:24px}
main{max-width:1140px;margin:0 auto}h1{font-size:22px;margin:0 0 4px}h2{font-size:16px;margin:0 0 10px}.sub{color:var(--muted);margin:0 0 18px}
section{background:var(--card);border:1px solid var(--line);border-radius:10px;padding:16px 18px;margin:0 0 16px}
.grid2{display:grid;grid-template-columns:repeat(auto-fit,minmax(460px,1fr));gap:16px}.grid2 section{margin:0}
table{border-collapse:collapse;width:100%}th,td{padding:6px 10px;border-bottom:1px solid var(--line);text-align:left;vertical-align:top}th{font-weight:600;color:var(--muted);font-size:12px;text-transform:uppercase;letter-spacing:.03em}
td:nth-child(n+3){font-variant-numeric:tabular-nums}.facts td:first-child{color:var(--muted);width:90px}
.dot{display:inline-block;width:10px;height:10px;border-radius:50%;margin-right:6px}.state{padding:1px 8px;border-radius:10px;font-size:12px}.done{background:#dcfae6;color:#067647}.failed{background:#fee4e2;color:#b42318}.unfinished{background:#fef0c7;color:#93370d}
figure{margin:0}svg{width:100%;height:auto;display:block}figure.wide svg{min-width:700px}.wide{overflow-x:auto}
figcaption{display:flex;flex-wrap:wrap;gap:4px 14px;color:var(--muted);font-size:12px;margin-top:4px}.key{cursor:pointer;user-select:none}.key.off{opacity:.35}.key i{display:inline-block;width:12px;height:3px;vertical-align:middle;margin-right:5px}
svg text{font:11px system-ui,sans-serif;fill:#475467}svg .label{font-size:12px;fill:#344054}.grid{stroke:#eef0f3}.axis{stroke:#98a2b3}
pre{margin:0;white-space:pre-wrap;word-break:break-word;font:12.5px/1.4 ui-monospace,SFMono-Regular,Menlo,monospace}.samples td{width:30%}.samples td:first-child{width:10%}small{color:var(--muted)}
details pre{background:#f9fafb;border:1px solid var(--line);border-radius:6px;padding:10px;max-height:420px;overflow:auto}.empty{color:var(--muted)}
</style></head><body><main>
<h1>mlora training report</h1><p class="sub">${esc(String(h.start ?? ''))} · ${names.length} adapter(s) on ${r.stages} stage(s) · written to ${esc(r.output)}</p>
<section><h2>Adapters</h2>${table(['adapter', 'state', 'steps', 'final loss', 'held-out loss before → after', 'eval ppl', 'tokens'], summary)}</section>
${prompts.length ? `<section><h2>Greedy samples before and after training</h2>${table(['adapter', 'prompt', 'before', 'after'], prompts, 'samples')}</section>` : ''}
<div class="grid2">
<section><h2>Training loss</h2>${lossChart}</section>
<section><h2>Held-out loss</h2>${evalChart}</section>
<section><h2>Learning rate</h2>${lrChart}</section>
<section><h2>Gradient norm</h2>${gradChart}</section>
<section><h2>Throughput</h2>${tps}</section>
<section><h2>Memory per stage against its budget</h2>${memChart}</section>
</div>
<section style="margin-top:16px"><h2>Stage utilisation over time</h2>${stageChart(r.schedule, r.stages, r.devices, timeMarkers)}</section>
<section><h2>Faults, recoveries and rollbacks</h2>${faultRows.length ? table(['when', 'where', 'what', 'detail', 'outcome'], faultRows) : '<p class="empty">None: every stage ran without a fault.</p>'}</section>
<section><h2>Run and machine</h2>${table(['', ''], facts, 'facts').replace(/<thead>.*?<\/thead>/, '')}
<details><summary>Training config (defaults filled in)</summary><pre>${esc(JSON.stringify(r.config, null, 2))}</pre></details></section>
</main>
<script>
// clicking a legend entry hides or shows that series in its chart
document.querySelectorAll('figcaption .key[data-key]').forEach(function (k) {
  k.addEventListener('click', function () {
    var svg = k.closest('figure').querySelector('svg');
    var g = Array.prototype.find.call(svg.querySelectorAll('g[data-series]'), function (x) { return x.getAttribute('data-series') === k.getAttribute('data-key'); });
    if (!g) return;
    var off = k.classList.toggle('off');
    g.style.display = off ? 'none' : '';
  });
});
</script>
</body></html>`;
}

export function writeReport(r: ReportInput): string {
  const file = path.join(r.output, 'report.html');
  fs.writeFileSync(file, renderReport(r));
  return file;
}
