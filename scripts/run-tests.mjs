#!/usr/bin/env node
// Runs the compiled tap suite (dist/test/**/*.test.js) and ends with the plain summary line
// CI reads: "N passed, N failed" (", N skipped" when some were skipped), counted over every
// assertion, taken from tap's own closing summary.
import { spawn } from 'node:child_process';
import { readdirSync } from 'node:fs';
import { createRequire } from 'node:module';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { ensureChromium } from './ensure-system-deps.mjs';

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
const require = createRequire(path.join(root, 'package.json'));
const tapBin = path.join(path.dirname(require.resolve('tap/package.json')), 'dist/esm/run.mjs');
const files = process.argv.slice(2).map((f) => f.replace(/^test\//, 'dist/test/').replace(/\.ts$/, '.js'));
// The tests are the sources under test/ (compiled to dist/test/): a compiled file whose source
// was moved or deleted is stale and never runs.
function findTests(dir) {
  return readdirSync(path.join(root, dir), { withFileTypes: true }).flatMap((e) =>
    e.isDirectory()
      ? findTests(path.join(dir, e.name))
      : e.name.endsWith('.test.ts')
        ? [path.join('dist', dir, e.name.replace(/\.ts$/, '.js'))]
        : [],
  );
}
const tests = files.length ? files : findTests('test').sort();
// the report's browser test needs a Chromium: installed here where missing and possible, else
// the test skips with the reason found here
const env = { ...process.env };
if (tests.some((f) => f.endsWith('report.test.js'))) {
  const c = ensureChromium();
  if (c.chromium) env.MLORA_CHROMIUM = c.chromium;
  else env.MLORA_CHROMIUM_MISSING = c.reason;
}
const args = [tapBin, '--reporter=tap', '--plugin=!@tapjs/typescript', ...tests];
const child = spawn(process.execPath, args, { cwd: root, stdio: ['ignore', 'pipe', 'inherit'], env });
let tail = '';
child.stdout.on('data', (chunk) => {
  process.stdout.write(chunk);
  tail = (tail + chunk.toString()).slice(-4096);
});
child.on('close', (code) => {
  const m = /# \{ total: (\d+), pass: (\d+)(?:, fail: (\d+))?(?:, skip: (\d+))?(?:, todo: (\d+))?/.exec(tail);
  const pass = m ? Number(m[2]) : 0;
  let fail = m ? Number(m[3] ?? 0) : 0;
  const skip = m ? Number(m[4] ?? 0) : 0;
  if (code !== 0 && fail === 0) fail = 1; // a file that crashed before it could report
  console.log(`\n${pass} passed, ${fail} failed${skip ? `, ${skip} skipped` : ''}`);
  process.exit(code ?? 1);
});
