// report.html of a real run (two adapters, eval with prompts, a stage crash that is recovered)
// opened in a real browser: headless Chromium driven by playwright-core. The page renders with
// no console errors, fetches nothing but itself (it opens offline), every chart has its series,
// the fault and its recovery are marked on the time axes, the samples and the machine are there,
// and a legend click hides its series. Skips, saying why, where no Chromium can run
// (scripts/ensure-system-deps.mjs installs one when the tests run as root).
import t from 'tap';
import fs from 'node:fs';
import path from 'node:path';
import { ROOT, mlora, readMetrics, smallConfig, writeJson } from './util.js';
import { tinyModelIn } from '../support/models.js';
import { DEMO_DATA } from '../support/files.js';

const deps = (await import(path.join(ROOT, 'scripts/ensure-system-deps.mjs'))) as {
  findChromium(): string | undefined;
};
const chromium = deps.findChromium();
const skip = chromium
  ? false
  : (process.env.MLORA_CHROMIUM_MISSING ??
    'no Chromium at /usr/bin/chromium (run the tests through scripts/run-tests.mjs as root to install it, or set MLORA_CHROMIUM)');

t.test('report.html renders in Chromium with every chart, sample and fault', { skip }, async (t) => {
  const dir = t.testdir();
  const model = await tinyModelIn(path.join(dir, 'model'));
  const out = path.join(dir, 'out');
  const cfg = smallConfig(model, out, { steps: 4, saveEvery: 2 });
  const adapters: Array<Record<string, unknown>> = cfg.adapters.map((a) => ({ ...a }));
  adapters[0]!.eval = {
    data: path.join(DEMO_DATA, 'capitals.jsonl'),
    every: 2,
    prompts: ['The capital of Peru is', 'a <b>&'],
    max_new_tokens: 4,
  };
  const r = mlora([
    'train',
    writeJson(path.join(dir, 'c.json'), { ...cfg, adapters }),
    '--fault',
    'crash:stage=1,after=6',
  ]);
  t.equal(r.code, 0, r.err);
  t.ok(
    readMetrics(out).some((x) => x.type === 'fault' && x.stage === 1),
    'the crash happened and was recovered',
  );
  const file = path.join(out, 'report.html');
  const html = fs.readFileSync(file, 'utf8');
  t.notMatch(
    html.replace(/xmlns="http:\/\/www\.w3\.org\/2000\/svg"/g, ''),
    /(?:src|href)\s*=\s*["']?(?:https?:)?\/\//i,
    'nothing is loaded from the network',
  );

  const { chromium: browser } = await import('playwright-core');
  // generous limits: a loaded machine (the whole suite, in parallel) starts Chromium slowly
  const b = await browser.launch({ executablePath: chromium!, args: ['--no-sandbox'], timeout: 180_000 });
  t.teardown(() => b.close());
  const page = await b.newPage({ viewport: { width: 1200, height: 900 } });
  page.setDefaultTimeout(120_000);
  const problems: string[] = [];
  const requests: string[] = [];
  page.on('console', (m) => {
    if (m.type() === 'error' || m.type() === 'warning') problems.push(`${m.type()}: ${m.text()}`);
  });
  page.on('pageerror', (e) => problems.push(`page error: ${e.message}`));
  page.on('request', (q) => requests.push(q.url()));
  await page.goto(`file://${file}`, { waitUntil: 'load', timeout: 120_000 });
  t.same(problems, [], 'no console errors or warnings');
  t.same(requests, [`file://${file}`], 'the page requests nothing but itself');

  const series = (chart: string) =>
    page.$$eval(`svg[data-chart="${chart}"] g[data-series]`, (gs) => gs.map((g) => g.getAttribute('data-series')));
  const names = ['capitals', 'arithmetic'];
  for (const chart of ['loss', 'lr', 'gradnorm'])
    t.same((await series(chart)).sort(), [...names].sort(), `${chart}: one series per adapter`);
  t.same(await series('eval'), ['capitals'], 'eval: the adapter with eval data');
  t.same(await series('throughput'), ['all adapters']);
  t.same(
    (await series('memory')).map((s) => s!.replace(/ \(budget .*\)$/, '')),
    ['cpu:0 used', 'cpu:1 used'],
    'memory: one series per stage',
  );
  t.same(await series('stages'), ['stage 0', 'stage 1']);
  for (const chart of ['loss', 'eval', 'lr', 'gradnorm', 'throughput', 'memory']) {
    const drawn = await page.$$eval(
      `svg[data-chart="${chart}"] g[data-series] :is(polyline, circle)`,
      (xs) => xs.length,
    );
    t.ok(drawn > 0, `${chart}: the series are drawn (${drawn} shapes)`);
  }
  const evalSteps = await page.$$eval('svg[data-chart="eval"] g[data-series] circle title', (ts) =>
    ts.map((x) => x.textContent),
  );
  t.match(evalSteps[0], /^capitals: 0, /, 'the held-out loss starts at step 0');
  for (const chart of ['throughput', 'stages']) {
    const marks = await page.$$eval(`svg[data-chart="${chart}"] g.marker`, (ms) =>
      ms.map((m) => m.getAttribute('data-marker')),
    );
    t.ok(
      marks.some((m) => /^crash on stage 1/.test(m ?? '')) &&
        marks.some((m) => /^stage 1 recovered after \d+ ms/.test(m ?? '')),
      `${chart}: the crash and its recovery are marked (${marks.join('; ')})`,
    );
  }
  const samples = await page.$$eval('table.samples tbody tr', (rows) =>
    rows.map((r) => [...r.querySelectorAll('td')].map((td) => td.textContent)),
  );
  t.equal(samples.length, 2, 'one row per prompt');
  t.equal(samples[1]![1], 'a <b>&', 'prompt text is shown as text, not markup');
  t.match(samples[0]![2], /step 0$/);
  t.match(samples[0]![3], /step 4$/);
  const facts = await page.$eval('table.facts', (x) => x.textContent ?? '');
  t.match(facts, /GEMM kernel \S+/, 'the machine and its GEMM kernel');
  t.match(facts, /hash [0-9a-f]{16}/, 'the config hash');
  t.match(await page.textContent('details pre'), /"name": "capitals"/, 'the config');
  t.match(
    await page.textContent('section'),
    /capitals\s*done\s*4\/4\s*[\d.]+\s*[\d.]+ → [\d.]+/,
    'the summary shows held-out loss before → after',
  );

  await page.click('svg[data-chart="loss"] ~ figcaption .key[data-key="capitals"]');
  t.equal(
    await page.$eval('svg[data-chart="loss"] g[data-series="capitals"]', (g) => getComputedStyle(g).display),
    'none',
    'a legend click hides its series',
  );
  const shot = path.join(dir, 'report.png');
  await page.screenshot({ path: shot, fullPage: true });
  t.ok(fs.statSync(shot).size > 10_000, 'the page paints');
});
