// The embedded demo, as a new user runs it (`mlora train` with no config), in fast mode on the
// tiny preset: four adapters on the demo datasets over two CPU stages. Every adapter's loss
// goes down, and every output a user is promised is there and well-formed.
import t from 'tap';
import fs from 'node:fs';
import path from 'node:path';
import { loadAdapter } from '../../lib/io/peft.js';
import { listCheckpoints } from '../../lib/io/checkpoint.js';
import { mlora, readMetrics } from './util.js';

const NAMES = ['capitals', 'arithmetic', 'reverse', 'sentiment'];

t.test('mlora train --fast: the demo end to end', async (t) => {
  const dir = t.testdir();
  const out = path.join(dir, 'out');
  const r = mlora(['train', '--fast', '--output', out, '--devices', 'cpu:0,cpu:1', '--threads', '1'], { MLORA_CACHE: path.join(dir, 'cache') });
  t.equal(r.code, 0, r.err);
  t.match(r.out, /making the tiny model \(seed 0\) in .*tiny-seed0 \(once\)/);
  t.match(r.out, /4 adapters on data\/demo\/ \(capitals, arithmetic, reverse, sentiment\)/);
  t.match(r.out, /stage 0 on cpu:0: layers 0-0 \+ embedding(?: \+ norm\/head\/loss of \d+% of the targeted rows \(training\))?\nstage 1 on cpu:1: layers 1-1 \+ norm\/head\/loss/);
  for (const n of NAMES) t.match(r.out, new RegExp(`\\n${n} +done +8/8 +\\d+\\.\\d{4} `), `${n}: a row in the summary table`);
  t.match(r.out, /overall: \d+ tokens in [\d.]+ s = \d+ tokens\/s; bubble ratio [\d.]+%/);

  const recs = readMetrics(out);
  const steps = recs.filter((x) => x.type === 'step');
  t.equal(steps.length, 4 * 8, 'one step record per adapter step');
  for (const s of steps) {
    t.ok(
      typeof s.time === 'string' && !Number.isNaN(Date.parse(s.time)) && Number.isFinite(s.loss) && Number.isFinite(s.lr) &&
        Number.isFinite(s.gradNorm) && Number.isInteger(s.tokens) && Number.isInteger(s.step),
      `record ${String(s.adapter)} step ${String(s.step)} has time, loss, lr, tokens, gradNorm`,
    );
  }
  for (const n of NAMES) {
    const mine = steps.filter((x) => x.adapter === n);
    const loss = mine.map((x) => x.loss as number);
    t.same(mine.map((x) => x.step), [1, 2, 3, 4, 5, 6, 7, 8], `${n}: steps 1..8 in order`);
    t.ok(loss.at(-1)! < loss[0]!, `${n}: loss goes down, ${loss[0]!.toFixed(4)} → ${loss.at(-1)!.toFixed(4)}`);
    const mean = (a: number[]) => a.reduce((x, y) => x + y, 0) / a.length;
    t.ok(mean(loss.slice(-2)) < mean(loss.slice(0, 2)), `${n}: mean of the last two steps below the first two`);
    t.ok(mine.every((x, i) => i === 0 || (x.tokens as number) > (mine[i - 1]!.tokens as number)), `${n}: tokens grow`);
    t.ok(recs.some((x) => x.type === 'done' && x.adapter === n && x.steps === 8), `${n}: a done record`);
    t.ok(recs.some((x) => x.type === 'checkpoint' && x.adapter === n && x.step === 4), `${n}: a checkpoint record at step 4`);

    // The PEFT adapter: loads, matches the demo's settings, trained (B no longer zero).
    const ad = loadAdapter(path.join(out, n));
    const pairs = ad.layers.flatMap((l) => Object.values(l));
    t.equal(ad.layers.length, 2, `${n}: PEFT adapter over both layers`);
    t.equal(pairs.length, 2 * ad.targetModules.length, `${n}: one A/B pair per layer and target`);
    t.ok(pairs.every((p) => p.b.some((v) => v !== 0)), `${n}: every B was trained away from zero`);
    const cks = listCheckpoints(path.join(out, n));
    t.same(cks.map((c) => [c.step, c.complete]), [[4, true]], `${n}: one complete checkpoint, at step 4`);
    t.same(loadAdapter(cks[0]!.dir).targetModules, ad.targetModules, `${n}: the checkpoint is itself a loadable PEFT adapter`);
  }
  const demoR = { capitals: 8, arithmetic: 16, reverse: 8, sentiment: 4 } as const;
  for (const n of NAMES) t.equal(loadAdapter(path.join(out, n)).r, demoR[n as keyof typeof demoR], `${n}: r as configured`);

  const html = fs.readFileSync(path.join(out, 'report.html'), 'utf8');
  t.match(html, /^<!doctype html>/);
  t.match(html, /<\/html>$/);
  t.match(html, /<h2>Training loss<\/h2><figure><svg data-chart="loss"/);
  t.match(html, /<h2>Stage utilisation over time<\/h2><figure class="wide"><svg data-chart="stages"/);
  const loss = /<svg data-chart="loss".*?<\/svg>/.exec(html)?.[0] ?? '';
  t.same([...loss.matchAll(/<g data-series="([^"]+)"><title>[^<]*<\/title><polyline /g)].map((m) => m[1]).sort(), [...NAMES].sort(), 'one loss curve per adapter');
  // (test/cli/report.test.ts checks every chart in a browser)
});

t.test('--dry-run prints the split, memory per stage and admission order, and trains nothing', async (t) => {
  const dir = t.testdir();
  const out = path.join(dir, 'out');
  const r = mlora(['train', '--fast', '--dry-run', '--output', out, '--devices', 'cpu:0,cpu:1', '--memory', '1GiB'], { MLORA_CACHE: path.join(dir, 'cache') });
  t.equal(r.code, 0, r.err);
  t.match(r.out, /model .*tiny-seed0: 2 layers, hidden 64, 4\/2 heads, vocab 512/);
  t.match(r.out, /stage 0 on cpu:0: layers 0-0 \+ embedding(?: \+ norm\/head\/loss of \d+% of the targeted rows \(training\))?\nstage 1 on cpu:1: layers 1-1 \+ norm\/head\/loss/);
  // 4 adapters on 2 stages: about 2 messages per stage, one adapter each (lib/schedule/packing.ts)
  t.match(r.out, /memory per stage \(largest planned micro-batch: \d+ tokens from 1 adapter\(s\), 4 in flight\):/);
  for (const s of [0, 1]) {
    t.match(r.out, new RegExp(`  stage ${s} cpu:${s} \\(\\d+ threads?\\): base [\\d.]+ KiB \\(linears [\\d.]+ KiB f32, rest [\\d.]+ KiB\\), adapters [\\d.]+ KiB, activations [\\d.]+ [KM]iB × 2, scratch [\\d.]+ [KM]iB; total [\\d.]+ [KM]iB of 1(\\.0)? GiB, headroom [\\d.]+ MiB`));
  }
  t.match(r.out, /admission order: capitals, arithmetic, reverse, sentiment/);
  t.match(r.out, /estimated throughput: ~\d+ tokens\/s/);
  t.notMatch(r.out, /step 1\//, 'no training step');
  t.notOk(fs.existsSync(out), 'nothing written to the output folder');
});
