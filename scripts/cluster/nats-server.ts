// Starts a real nats-server (Debian's, 2.9+) for the cluster tests and benchmark: user/password
// authentication, JetStream on (the KV bucket of registered hosts lives there), in a temp dir
// that goes away with it. On loopback it takes a port the kernel picks (-p -1) and reads the one
// it got from the server's log, so nothing depends on a port being free; inside a namespace
// host it listens on that host's address and the default port.
import { spawn, type ChildProcess } from 'node:child_process';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import type { Topology } from './netns.js';

export interface NatsServerOptions {
  user: string;
  password: string;
  /** Run inside this topology host (default: on 127.0.0.1 in this namespace). */
  topology?: Topology;
  host?: string;
  /** Largest message the server accepts (bytes; nats-server's default is 1 MiB). */
  maxPayload?: number;
  /** nats-server binary (from scripts/ensure-system-deps.mjs). */
  binary: string;
  startTimeoutMs?: number;
  /** Require TLS with this certificate and key (PEM files). */
  tls?: { cert: string; key: string };
  /** Limit the user to these subjects (as README's cluster.conf does). */
  permissions?: { publish: string[]; subscribe: string[] };
}

export interface NatsServer {
  /** nats://user:password@address:port */
  url: string;
  /** The same without credentials. */
  address: string;
  proc: ChildProcess;
  log(): string;
  stop(): Promise<void>;
}

/** nats-server's config syntax quotes strings with double quotes; refuse what would need escaping. */
function q(s: string): string {
  if (!/^[A-Za-z0-9._\-/:>$*]+$/.test(s))
    throw new Error(`nats-server config value '${s}' has characters this launcher does not quote`);
  return `"${s}"`;
}

export async function startNatsServer(o: NatsServerOptions): Promise<NatsServer> {
  const dir = mkdtempSync(path.join(os.tmpdir(), 'mlora-nats-'));
  const listen = o.topology ? `${o.topology.host(o.host!).ip}:4222` : '127.0.0.1:-1';
  const conf = [
    `listen: ${listen}`,
    `max_payload: ${o.maxPayload ?? 1048576}`,
    `jetstream { store_dir: ${q(path.join(dir, 'js'))}, max_memory_store: 64MB, max_file_store: 256MB }`,
    ...(o.tls ? [`tls { cert_file: ${q(o.tls.cert)}, key_file: ${q(o.tls.key)}, timeout: 5 }`] : []),
    `authorization { users: [ { user: ${q(o.user)}, password: ${q(o.password)}${o.permissions ? `, permissions: { publish: [${o.permissions.publish.map(q).join(', ')}], subscribe: [${o.permissions.subscribe.map(q).join(', ')}] }` : ''} } ] }`,
    '',
  ].join('\n');
  writeFileSync(path.join(dir, 'cluster.conf'), conf);
  const args = ['-c', path.join(dir, 'cluster.conf')];
  const proc = o.topology
    ? o.topology.spawn(o.host!, o.binary, args)
    : spawn(o.binary, args, { stdio: ['ignore', 'pipe', 'pipe'] });
  let log = '';
  const collect = (b: Buffer) => {
    log = (log + b.toString()).slice(-64 * 1024);
  };
  proc.stdout!.on('data', collect);
  proc.stderr!.on('data', collect);
  const stop = async () => {
    if (proc.exitCode === null && proc.signalCode === null) {
      const gone = new Promise<void>((r) => proc.once('exit', () => r()));
      proc.kill('SIGTERM');
      const t = setTimeout(() => proc.kill('SIGKILL'), 5_000);
      await gone;
      clearTimeout(t);
    }
    rmSync(dir, { recursive: true, force: true });
  };
  const deadline = o.startTimeoutMs ?? 20_000;
  const address = await new Promise<string>((resolve, reject) => {
    const timer = setTimeout(
      () => done(new Error(`nats-server did not get ready within ${deadline} ms; its log:\n${log}`)),
      deadline,
    );
    const check = () => {
      const m = /Listening for client connections on ([0-9.]+:\d+)/.exec(log);
      if (m && /Server is ready/.test(log)) done(undefined, m[1]);
    };
    const onExit = (code: number | null) =>
      done(new Error(`nats-server exited (code ${code}) while starting; its log:\n${log}`));
    const done = (e?: Error, addr?: string) => {
      clearTimeout(timer);
      proc.stdout!.off('data', check);
      proc.stderr!.off('data', check);
      proc.off('exit', onExit);
      if (e) reject(e);
      else resolve(addr!);
    };
    proc.stdout!.on('data', check);
    proc.stderr!.on('data', check);
    proc.once('exit', onExit);
  }).catch(async (e) => {
    await stop();
    throw e;
  });
  return {
    url: `${o.tls ? 'tls' : 'nats'}://${o.user}:${o.password}@${address}`,
    address: `${o.tls ? 'tls' : 'nats'}://${address}`,
    proc,
    log: () => log,
    stop,
  };
}

/** The nats-server binary, installing it where missing (see scripts/ensure-system-deps.mjs); or why not. */
export async function natsServerBinary(): Promise<{ binary?: string; reason?: string }> {
  const url = new URL('../../../scripts/ensure-system-deps.mjs', import.meta.url);
  const m = (await import(url.href)) as {
    ensureNatsServer(log?: (s: string) => void): { natsServer?: string; reason?: string };
  };
  const r = m.ensureNatsServer();
  return r.natsServer ? { binary: r.natsServer } : { reason: r.reason ?? 'nats-server is not available' };
}
