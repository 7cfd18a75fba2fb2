// report.html: loss curves per adapter and stage utilisation over time, as inline SVG, for a
// person to look at after a run (no scripts, no network).
import fs from 'node:fs';
import path from 'node:path';
import type { JobEvent } from '../../actors/protocol.js';
import type { ScheduleRecord } from '../../lib/schedule/record.js';
import { utilisation } from '../../lib/schedule/grid.js';

const COLORS = ['#1f77b4', '#d62728', '#2ca02c', '#9467bd', '#ff7f0e', '#17becf', '#8c564b', '#e377c2'];
const esc = (s: string) => s.replace(/[&<>"]/g, (c) => ({ '&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;' })[c]!);

function lossChart(events: JobEvent[]): string {
  const series = new Map<string, Array<[number, number]>>();
  for (const e of events) if (e.type === 'step' && Number.isFinite(e.loss)) (series.get(e.adapter) ?? series.set(e.adapter, []).get(e.adapter)!).push([e.step, e.loss]);
  if (!series.size) return '<p>No steps were recorded.</p>';
  const W = 720, H = 320, P = 48;
  const all = [...series.values()].flat();
  const maxX = Math.max(1, ...all.map((p) => p[0]));
  const minY = Math.min(...all.map((p) => p[1])), maxY = Math.max(...all.map((p) => p[1]));
  const sx = (x: number) => P + ((W - 2 * P) * x) / maxX;
  const sy = (y: number) => H - P - ((H - 2 * P) * (y - minY)) / Math.max(1e-9, maxY - minY);
  let svg = `<svg width="${W}" height="${H}" viewBox="0 0 ${W} ${H}" xmlns="http://www.w3.org/2000/svg" font-family="sans-serif" font-size="11">`;
  svg += `<rect width="${W}" height="${H}" fill="white"/><line x1="${P}" y1="${H - P}" x2="${W - P}" y2="${H - P}" stroke="#333"/><line x1="${P}" y1="${P}" x2="${P}" y2="${H - P}" stroke="#333"/>`;
  for (let i = 0; i <= 4; i++) {
    const y = minY + ((maxY - minY) * i) / 4;
    svg += `<text x="${P - 6}" y="${sy(y) + 4}" text-anchor="end">${y.toFixed(2)}</text><line x1="${P}" y1="${sy(y)}" x2="${W - P}" y2="${sy(y)}" stroke="#eee"/>`;
  }
  svg += `<text x="${W / 2}" y="${H - 12}" text-anchor="middle">optimizer step</text><text x="14" y="${H / 2}" transform="rotate(-90 14 ${H / 2})" text-anchor="middle">training loss</text>`;
  let i = 0;
  for (const [name, pts] of series) {
    const c = COLORS[i % COLORS.length]!;
    svg += `<polyline fill="none" stroke="${c}" stroke-width="2" points="${pts.map(([x, y]) => `${sx(x).toFixed(1)},${sy(y).toFixed(1)}`).join(' ')}"/>`;
    svg += `<rect x="${W - P - 130}" y="${P + 16 * i - 9}" width="10" height="10" fill="${c}"/><text x="${W - P - 115}" y="${P + 16 * i}">${esc(name)}</text>`;
    i++;
  }
  return svg + '</svg>';
}

function stageChart(sched: ScheduleRecord[], stages: number, devices: string[]): string {
  const rs = sched.filter((r) => r.kind !== 'E');
  if (!rs.length) return '<p>No stage work was recorded.</p>';
  const W = 720, rowH = 28, P = 90;
  const H = stages * rowH + 50;
  const t0 = Math.min(...rs.map((r) => r.start)), t1 = Math.max(...rs.map((r) => r.end));
  const sx = (t: number) => P + ((W - P - 20) * (t - t0)) / Math.max(1e-9, t1 - t0);
  const color: Record<string, string> = { F: '#1f77b4', B: '#d62728', S: '#2ca02c' };
  let svg = `<svg width="${W}" height="${H}" viewBox="0 0 ${W} ${H}" xmlns="http://www.w3.org/2000/svg" font-family="sans-serif" font-size="11"><rect width="${W}" height="${H}" fill="white"/>`;
  const u = utilisation(sched, stages);
  for (let s = 0; s < stages; s++) {
    svg += `<text x="4" y="${s * rowH + 24}">${esc(devices[s] ?? `stage ${s}`)} ${(100 * u.busy[s]!).toFixed(0)}%</text>`;
  }
  for (const r of rs) {
    svg += `<rect x="${sx(r.start).toFixed(1)}" y="${r.stage * rowH + 10}" width="${Math.max(0.5, sx(r.end) - sx(r.start)).toFixed(1)}" height="${rowH - 8}" fill="${color[r.kind]}"/>`;
  }
  svg += `<text x="${P}" y="${H - 10}">0 s</text><text x="${W - 20}" y="${H - 10}" text-anchor="end">${((t1 - t0) / 1000).toFixed(1)} s</text>`;
  svg += `<text x="${W / 2}" y="${H - 10}" text-anchor="middle">F forward (blue), B backward (red), S optimizer step (green); bubble ${(100 * u.bubble).toFixed(1)}%</text>`;
  return svg + '</svg>';
}

export function writeReport(output: string, events: JobEvent[], sched: ScheduleRecord[], stages: number, devices: string[]): string {
  const evals = events.filter((e): e is Extract<JobEvent, { type: 'eval' }> => e.type === 'eval');
  const faults = events.filter((e) => e.type === 'fault' || e.type === 'rollback' || e.type === 'error');
  const html = `<!doctype html><html><head><meta charset="utf-8"><title>mlora training report</title>
<style>body{font-family:sans-serif;max-width:800px;margin:24px auto;color:#222}h2{margin-top:32px}td,th{padding:2px 10px;text-align:right}</style></head><body>
<h1>mlora training report</h1><p>${new Date().toISOString()}</p>
<h2>Training loss per adapter</h2>${lossChart(events)}
<h2>Stage utilisation over time</h2>${stageChart(sched, stages, devices)}
${evals.length ? `<h2>Evaluations</h2><table><tr><th>adapter</th><th>step</th><th>loss</th><th>perplexity</th></tr>${evals.map((e) => `<tr><td>${esc(e.adapter)}</td><td>${e.step}</td><td>${e.loss.toFixed(4)}</td><td>${e.perplexity.toFixed(2)}</td></tr>`).join('')}</table>` : ''}
${faults.length ? `<h2>Faults and errors</h2><ul>${faults.map((f) => `<li>${esc(JSON.stringify(f))}</li>`).join('')}</ul>` : ''}
</body></html>`;
  const file = path.join(output, 'report.html');
  fs.writeFileSync(file, html);
  return file;
}
