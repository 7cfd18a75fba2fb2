#!/usr/bin/env node
// System packages the tests and the lint use beyond npm's: a Chromium for the report.html browser
// test (driven by playwright-core; run by scripts/run-tests.mjs before the tests) and clang-format
// for `npm run lint` (scripts/clang-format.mjs), and nats-server for the cluster tests
// (scripts/cluster/nats-server.ts). Where one is
// missing and we are root on a Debian-like system, `apt-get update && apt-get install -y` puts
// it there (bounded by a timeout, output summarized); otherwise, or when that fails, it says
// why and the test that needs it skips with that reason. Never fails the test run itself.
import { spawnSync } from 'node:child_process';
import { existsSync } from 'node:fs';
import { pathToFileURL } from 'node:url';

/** Where the browser test looks for Chromium (MLORA_CHROMIUM overrides). */
export const CHROMIUM_CANDIDATES = ['/usr/bin/chromium', '/usr/bin/chromium-browser'];

/** Where the lint looks for clang-format (CLANG_FORMAT overrides). */
export const CLANG_FORMAT_CANDIDATES = ['/usr/bin/clang-format', '/usr/local/bin/clang-format'];

/** Where the cluster tests look for Debian's nats-server (MLORA_NATS_SERVER overrides). */
export const NATS_CANDIDATES = ['/usr/sbin/nats-server', '/usr/bin/nats-server', '/usr/local/bin/nats-server'];

const CHROMIUM = {
  name: 'chromium',
  pkg: 'chromium',
  envVar: 'MLORA_CHROMIUM',
  candidates: CHROMIUM_CANDIDATES,
  purpose: 'for the report.html browser test',
  binary: 'a Chromium binary',
};
const CLANG_FORMAT = {
  name: 'clang-format',
  pkg: 'clang-format',
  envVar: 'CLANG_FORMAT',
  candidates: CLANG_FORMAT_CANDIDATES,
  purpose: 'for npm run lint',
  binary: 'a clang-format binary',
};

const NATS_SERVER = {
  name: 'nats-server',
  pkg: 'nats-server',
  envVar: 'MLORA_NATS_SERVER',
  candidates: NATS_CANDIDATES,
  purpose: 'for the cluster tests',
  binary: 'a nats-server binary',
};

function find(dep) {
  const set = process.env[dep.envVar];
  if (set) return existsSync(set) ? set : undefined;
  return dep.candidates.find((p) => existsSync(p));
}

export function findChromium() {
  return find(CHROMIUM);
}

const TIMEOUT_MS = Number(process.env.MLORA_APT_TIMEOUT_MS ?? 600_000);

/** Runs a command with a deadline; returns ok and the last lines of its output. */
function run(cmd, args, timeout) {
  const r = spawnSync(cmd, args, {
    encoding: 'utf8',
    timeout,
    env: { ...process.env, DEBIAN_FRONTEND: 'noninteractive' },
    maxBuffer: 64 * 1024 * 1024,
  });
  const text = `${r.stdout ?? ''}${r.stderr ?? ''}`.trim().split('\n');
  const why = r.error
    ? r.error.code === 'ETIMEDOUT'
      ? `timed out after ${Math.round(timeout / 1000)} s`
      : r.error.message
    : r.status !== 0
      ? `exit ${r.status}`
      : '';
  return { ok: !why, why, tail: text.slice(-3).join(' | ') };
}

/** Makes sure `dep` is installed; returns { path } or { path: undefined, reason }. */
function ensure(dep, log) {
  const found = find(dep);
  if (found) return { path: found };
  const { name, pkg, envVar } = dep;
  if (process.env[envVar]) return { reason: `${envVar} is ${process.env[envVar]}, which does not exist` };
  if (process.env.MLORA_NO_SYSTEM_INSTALL)
    return { reason: `${name} is not installed (MLORA_NO_SYSTEM_INSTALL is set: not installing it)` };
  if (process.platform !== 'linux' || typeof process.getuid !== 'function' || process.getuid() !== 0) {
    return {
      reason: `${name} is not installed and this is not root on Linux (install it: apt-get install ${pkg}, or set ${envVar})`,
    };
  }
  if (!existsSync('/usr/bin/apt-get'))
    return { reason: `${name} is not installed and there is no apt-get here (set ${envVar} to ${dep.binary})` };
  const t0 = Date.now();
  log(`ensure-system-deps: ${name} is missing; apt-get update && apt-get install -y ${pkg} (${dep.purpose})`);
  const up = run('apt-get', ['update'], TIMEOUT_MS);
  if (!up.ok) return { reason: `apt-get update failed (${up.why}): ${up.tail}` };
  const inst = run(
    'apt-get',
    ['install', '-y', '--no-install-recommends', pkg],
    Math.max(1000, TIMEOUT_MS - (Date.now() - t0)),
  );
  if (!inst.ok) return { reason: `apt-get install ${pkg} failed (${inst.why}): ${inst.tail}` };
  const now = find(dep);
  if (!now) return { reason: `apt-get install ${pkg} ran but no ${name} is at ${dep.candidates.join(' or ')}` };
  log(`ensure-system-deps: installed ${now} in ${((Date.now() - t0) / 1000).toFixed(0)} s`);
  return { path: now };
}

/**
 * Makes sure a Chromium is installed; returns { chromium } or { chromium: undefined, reason }.
 * `log` gets one line per thing done.
 */
export function ensureChromium(log = (s) => console.error(s)) {
  const r = ensure(CHROMIUM, log);
  return r.path ? { chromium: r.path } : { reason: r.reason };
}

/** Makes sure clang-format is installed; returns { clangFormat } or { clangFormat: undefined, reason }. */
export function ensureClangFormat(log = (s) => console.error(s)) {
  const r = ensure(CLANG_FORMAT, log);
  return r.path ? { clangFormat: r.path } : { reason: r.reason };
}

if (import.meta.url === pathToFileURL(process.argv[1] ?? '').href) {
  const r = ensureChromium();
  console.log(r.chromium ? `chromium: ${r.chromium}` : `chromium: not available: ${r.reason}`);
}

/** Makes sure nats-server is installed; returns { natsServer } or { natsServer: undefined, reason }. */
export function ensureNatsServer(log = (s) => console.error(s)) {
  const r = ensure(NATS_SERVER, log);
  return r.path ? { natsServer: r.path } : { reason: r.reason };
}
