#!/usr/bin/env node
// System packages the test suite uses beyond npm's: a Chromium for the report.html browser test
// (driven by playwright-core). Run by scripts/run-tests.mjs before the tests. Where one is
// missing and we are root on a Debian-like system, `apt-get update && apt-get install -y` puts
// it there (bounded by a timeout, output summarized); otherwise, or when that fails, it says
// why and the test that needs it skips with that reason. Never fails the test run itself.
import { spawnSync } from 'node:child_process';
import { existsSync } from 'node:fs';
import { pathToFileURL } from 'node:url';

/** Where the browser test looks for Chromium (MLORA_CHROMIUM overrides). */
export const CHROMIUM_CANDIDATES = ['/usr/bin/chromium', '/usr/bin/chromium-browser'];

export function findChromium() {
  if (process.env.MLORA_CHROMIUM) return existsSync(process.env.MLORA_CHROMIUM) ? process.env.MLORA_CHROMIUM : undefined;
  return CHROMIUM_CANDIDATES.find((p) => existsSync(p));
}

const TIMEOUT_MS = Number(process.env.MLORA_APT_TIMEOUT_MS ?? 600_000);

/** Runs a command with a deadline; returns ok and the last lines of its output. */
function run(cmd, args, timeout) {
  const r = spawnSync(cmd, args, { encoding: 'utf8', timeout, env: { ...process.env, DEBIAN_FRONTEND: 'noninteractive' }, maxBuffer: 64 * 1024 * 1024 });
  const text = `${r.stdout ?? ''}${r.stderr ?? ''}`.trim().split('\n');
  const why = r.error ? (r.error.code === 'ETIMEDOUT' ? `timed out after ${Math.round(timeout / 1000)} s` : r.error.message) : r.status !== 0 ? `exit ${r.status}` : '';
  return { ok: !why, why, tail: text.slice(-3).join(' | ') };
}

/**
 * Makes sure a Chromium is installed; returns { chromium } or { chromium: undefined, reason }.
 * `log` gets one line per thing done.
 */
export function ensureChromium(log = (s) => console.error(s)) {
  const found = findChromium();
  if (found) return { chromium: found };
  if (process.env.MLORA_CHROMIUM) return { reason: `MLORA_CHROMIUM is ${process.env.MLORA_CHROMIUM}, which does not exist` };
  if (process.env.MLORA_NO_SYSTEM_INSTALL) return { reason: 'chromium is not installed (MLORA_NO_SYSTEM_INSTALL is set: not installing it)' };
  if (process.platform !== 'linux' || typeof process.getuid !== 'function' || process.getuid() !== 0) {
    return { reason: 'chromium is not installed and this is not root on Linux (install it: apt-get install chromium, or set MLORA_CHROMIUM)' };
  }
  if (!existsSync('/usr/bin/apt-get')) return { reason: 'chromium is not installed and there is no apt-get here (set MLORA_CHROMIUM to a Chromium binary)' };
  const t0 = Date.now();
  log('ensure-system-deps: chromium is missing; apt-get update && apt-get install -y chromium (for the report.html browser test)');
  const up = run('apt-get', ['update'], TIMEOUT_MS);
  if (!up.ok) return { reason: `apt-get update failed (${up.why}): ${up.tail}` };
  const inst = run('apt-get', ['install', '-y', '--no-install-recommends', 'chromium'], Math.max(1000, TIMEOUT_MS - (Date.now() - t0)));
  if (!inst.ok) return { reason: `apt-get install chromium failed (${inst.why}): ${inst.tail}` };
  const now = findChromium();
  if (!now) return { reason: `apt-get install chromium ran but no chromium is at ${CHROMIUM_CANDIDATES.join(' or ')}` };
  log(`ensure-system-deps: installed ${now} in ${((Date.now() - t0) / 1000).toFixed(0)} s`);
  return { chromium: now };
}

if (import.meta.url === pathToFileURL(process.argv[1] ?? '').href) {
  const r = ensureChromium();
  console.log(r.chromium ? `chromium: ${r.chromium}` : `chromium: not available: ${r.reason}`);
}
