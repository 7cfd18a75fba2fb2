#!/usr/bin/env node
// The NATS server the cluster tests and `mlora stage serve` users need (Debian's nats-server).
// The same pattern as the other system dependencies the tests use: where it is missing and we
// are root on a Debian-like system, `apt-get update && apt-get install -y nats-server` puts it
// there (bounded by a timeout, output summarized); otherwise, or when that fails, it says why and
// the tests that need it skip with that reason. Never fails the test run itself.
import { spawnSync } from 'node:child_process';
import { existsSync } from 'node:fs';
import { pathToFileURL } from 'node:url';

export const NATS_CANDIDATES = ['/usr/sbin/nats-server', '/usr/bin/nats-server', '/usr/local/bin/nats-server'];

export function findNatsServer() {
  if (process.env.MLORA_NATS_SERVER)
    return existsSync(process.env.MLORA_NATS_SERVER) ? process.env.MLORA_NATS_SERVER : undefined;
  return NATS_CANDIDATES.find((p) => existsSync(p));
}

const TIMEOUT_MS = Number(process.env.MLORA_APT_TIMEOUT_MS ?? 300_000);

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

/** Makes sure nats-server is installed; returns { natsServer } or { reason }. */
export function ensureNatsServer(log = (s) => console.error(s)) {
  const found = findNatsServer();
  if (found) return { natsServer: found };
  if (process.env.MLORA_NATS_SERVER)
    return { reason: `MLORA_NATS_SERVER is ${process.env.MLORA_NATS_SERVER}, which does not exist` };
  if (process.env.MLORA_NO_SYSTEM_INSTALL)
    return { reason: 'nats-server is not installed (MLORA_NO_SYSTEM_INSTALL is set: not installing it)' };
  if (process.platform !== 'linux' || typeof process.getuid !== 'function' || process.getuid() !== 0) {
    return {
      reason:
        'nats-server is not installed and this is not root on Linux (install it: apt-get install nats-server, or set MLORA_NATS_SERVER)',
    };
  }
  if (!existsSync('/usr/bin/apt-get'))
    return { reason: 'nats-server is not installed and there is no apt-get here (set MLORA_NATS_SERVER)' };
  const t0 = Date.now();
  log('ensure-nats: nats-server is missing; apt-get update && apt-get install -y nats-server (for the cluster tests)');
  const up = run('apt-get', ['update'], TIMEOUT_MS);
  if (!up.ok) return { reason: `apt-get update failed (${up.why}): ${up.tail}` };
  const inst = run(
    'apt-get',
    ['install', '-y', '--no-install-recommends', 'nats-server'],
    Math.max(1000, TIMEOUT_MS - (Date.now() - t0)),
  );
  if (!inst.ok) return { reason: `apt-get install nats-server failed (${inst.why}): ${inst.tail}` };
  const now = findNatsServer();
  if (!now)
    return { reason: `apt-get install nats-server ran but no nats-server is at ${NATS_CANDIDATES.join(' or ')}` };
  log(`ensure-nats: installed ${now} in ${((Date.now() - t0) / 1000).toFixed(0)} s`);
  return { natsServer: now };
}

if (import.meta.url === pathToFileURL(process.argv[1] ?? '').href) {
  const r = ensureNatsServer();
  console.log(r.natsServer ? `nats-server: ${r.natsServer}` : `nats-server: not available: ${r.reason}`);
}
