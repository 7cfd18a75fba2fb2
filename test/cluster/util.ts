// Shared by the cluster tests: why they skip here, and running node inside a namespace host.
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { netnsUnavailable, type Topology } from '../../scripts/cluster/netns.js';
import { natsServerBinary } from '../../scripts/cluster/nats-server.js';

export const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../../..');
export const CLI = path.join(ROOT, 'dist/scripts/mlora.js');

/** The reason the namespace cluster tests cannot run here, or undefined. */
export async function clusterSkip(): Promise<string | undefined> {
  const ns = netnsUnavailable();
  if (ns) return ns;
  const nats = await natsServerBinary();
  return nats.reason;
}

/** Runs an ES module's source with node inside a host; resolves with its stdout (bounded: 60 s). */
export function nodeInHost(topo: Topology, host: string, source: string, timeoutMs = 60_000): Promise<string> {
  return new Promise((resolve, reject) => {
    const c = topo.spawn(host, process.execPath, ['--input-type=module', '-e', source], {
      cwd: ROOT,
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    let out = '';
    let err = '';
    c.stdout!.on('data', (b) => (out += b));
    c.stderr!.on('data', (b) => (err += b));
    const timer = setTimeout(() => c.kill('SIGKILL'), timeoutMs);
    c.once('exit', (code) => {
      clearTimeout(timer);
      if (code === 0) resolve(out);
      else reject(new Error(`node in ${host} exited with ${code}: ${err}`));
    });
  });
}
