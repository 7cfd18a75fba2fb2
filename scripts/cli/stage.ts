// mlora stage serve --cluster nats://user:pass@host:4222 [--name NAME] [--devices cpu:0,...]
// Offers this host's devices to training runs over NATS (see actors/transport/host.ts) until
// SIGINT/SIGTERM.
import os from 'node:os';
import { parseCommandArgs, usageError, type Command } from './args.js';
import { StageHost } from '../../actors/transport/host.js';
import { parseBytes } from '../../lib/tensor.js';

const USAGE = `usage: mlora stage serve --cluster URL [options]

Registers this host's devices with the cluster (a NATS server with JetStream) and runs the
stages a training run (mlora train --cluster URL) places on them.

options:
  --cluster URL     nats://user:password@host:4222, nats://TOKEN@host:4222, or tls://... (required)
  --name NAME       this host's name in the cluster (default: the hostname)
  --devices LIST    devices offered, e.g. cpu:0 or cuda:0,cuda:1 (default: cpu:0)
  --memory BYTES    byte budget per device (default: a share of 80% of RAM)
  --threads N       CPU threads per device (default: the cores shared evenly)
  --model DIR       this host's copy of the model (default: the path the run sends)
  --lease-ms N      registration lease (default 15000; the bucket's TTL when this host creates it)
  --tls-ca FILE     CA certificate of the server (TLS)
  --tls-cert FILE   client certificate (mutual TLS), with --tls-key FILE
  --nkey FILE       nkey seed file (instead of user/password)`;

const CMD: Command = { name: 'stage serve', usage: USAGE };

export async function main(argv: string[]): Promise<number> {
  const [sub, ...rest] = argv;
  if (sub === '--help' || sub === '-h') return (console.log(USAGE), 0);
  if (sub !== 'serve') return usageError({ name: 'stage', usage: USAGE }, `unknown subcommand '${sub ?? ''}'`);
  const parsed = parseCommandArgs(CMD, rest, {
    cluster: { type: 'string' },
    name: { type: 'string' },
    devices: { type: 'string' },
    memory: { type: 'string' },
    threads: { type: 'string' },
    model: { type: 'string' },
    'lease-ms': { type: 'string' },
    'tls-ca': { type: 'string' },
    'tls-cert': { type: 'string' },
    'tls-key': { type: 'string' },
    nkey: { type: 'string' },
  });
  if (typeof parsed === 'number') return parsed;
  const a = parsed.values;
  if (!a.cluster) return usageError(CMD, '--cluster URL is required');
  const host = await StageHost.start({
    url: a.cluster,
    name: a.name ?? os.hostname(),
    devices: (a.devices ?? 'cpu:0')
      .split(',')
      .map((s) => s.trim())
      .filter(Boolean),
    ...(a.memory ? { memory: parseBytes(a.memory) } : {}),
    ...(a.threads ? { threads: Number(a.threads) } : {}),
    ...(a.model ? { model: a.model } : {}),
    ...(a['lease-ms'] ? { leaseMs: Number(a['lease-ms']) } : {}),
    auth: {
      ...(a['tls-ca'] ? { tlsCa: a['tls-ca'] } : {}),
      ...(a['tls-cert'] ? { tlsCert: a['tls-cert'] } : {}),
      ...(a['tls-key'] ? { tlsKey: a['tls-key'] } : {}),
      ...(a.nkey ? { nkeySeed: a.nkey } : {}),
    },
    log: (s) => console.log(s),
  });
  console.log(`mlora stage serve: ${host.name} ready`);
  await new Promise<void>((resolve) => {
    process.once('SIGINT', resolve);
    process.once('SIGTERM', resolve);
  });
  await host.close();
  return 0;
}
