// The cluster benchmark (docs/benchmarks.md): the bench model's two stages on two namespaced
// hosts over NATS vs two stage actors in one process, the slot bytes one micro-batch moves, the
// NATS link's measured bandwidth between two hosts, and the time to detect and recover from a
// stage host killed with SIGKILL. Needs root (network namespaces) and nats-server.
//   node dist/scripts/bench-cluster.js [--steps N] [--adapters A]
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import { netnsUnavailable, Topology } from './cluster/netns.js';
import { natsServerBinary, startNatsServer } from './cluster/nats-server.js';
import { makeModel } from './cli/make-model.js';

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');
const CLI = path.join(ROOT, 'dist/scripts/mlora.js');
const DATA = path.join(ROOT, 'data/demo');

const a = parseArgs({ options: { steps: { type: 'string' }, adapters: { type: 'string' } } }).values;
const steps = Number(a.steps ?? 3);
const A = Number(a.adapters ?? 4);

const why = netnsUnavailable() ?? (await natsServerBinary()).reason;
if (why) {
  console.error(`bench-cluster: cannot run here: ${why}`);
  process.exit(2);
}
const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'mlora-bench-cluster-'));
const topo = new Topology('bench', ['hub', 'hA', 'hB', 'hC']);
const cleanup = () => {
  topo.teardown();
  fs.rmSync(tmp, { recursive: true, force: true });
};
process.once('exit', cleanup);
try {
  const nats = await startNatsServer({
    binary: (await natsServerBinary()).binary!,
    user: 'bench',
    password: 'bench-pw',
    topology: topo,
    host: 'hub',
    maxPayload: 8 << 20,
  });
  const model = path.join(tmp, 'model');
  await makeModel(model, 'bench', 0);
  const names = ['capitals', 'arithmetic', 'reverse', 'sentiment'];
  const config = (name: string, devices: string[]) => {
    const common = {
      batch_size: 4,
      micro_batch_size: 2,
      seq_len: 128,
      max_steps: steps,
      save_every: 1000,
      schedule: { type: 'constant' },
    };
    const adapters = Array.from({ length: A }, (_, i) => ({
      name: `a${i}`,
      data: path.join(DATA, `${names[i % 4]}.jsonl`),
      lora: {
        r: 16,
        alpha: 32,
        targets: ['q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj'],
      },
      optimizer: { lr: 1e-3 },
      seed: i + 1,
      ...common,
    }));
    const file = path.join(tmp, `${name}.json`);
    fs.writeFileSync(
      file,
      JSON.stringify({
        model,
        output: path.join(tmp, name),
        devices,
        adapters,
        pipeline: { threads: 1 },
        log: { progress: 'plain' },
      }),
    );
    return file;
  };
  const tokensPerS = (out: string) => Number(/= (\d+) tokens\/s/.exec(out)?.[1] ?? NaN);
  const inHost = (host: string, args: string[]) => {
    const c = topo.spawn(host, process.execPath, args);
    let out = '';
    c.stdout!.on('data', (b) => (out += b));
    c.stderr!.on('data', (b) => (out += b));
    return { c, out: () => out, done: new Promise<number | null>((r) => c.once('exit', (code) => r(code))) };
  };
  const waitFor = async (p: { out: () => string }, re: RegExp, ms: number) => {
    for (const t0 = Date.now(); !re.test(p.out()); await new Promise((r) => setTimeout(r, 50)))
      if (Date.now() - t0 > ms) throw new Error(`no ${re}:\n${p.out()}`);
  };

  // 1. two stages in one process (worker threads, shared memory: zero copies)
  const local = spawnSync(process.execPath, [CLI, 'train', config('local', ['cpu:0', 'cpu:1'])], {
    encoding: 'utf8',
    timeout: 600_000,
  });
  const localTps = tokensPerS(local.stdout);

  // 2. the same two stages on two hosts
  const serve = (h: string) =>
    inHost(h, [CLI, 'stage', 'serve', '--cluster', nats.url, '--name', h, '--threads', '1', '--lease-ms', '3000']);
  const hosts = ['hA', 'hB'].map(serve);
  for (const h of hosts) await waitFor(h, /ready/, 30_000);
  const remote = inHost('hA', [CLI, 'train', config('remote', ['hA/cpu:0', 'hB/cpu:0']), '--cluster', nats.url]);
  await remote.done;
  const remoteTps = tokensPerS(remote.out());
  await waitFor(hosts[1]!, /free again/, 30_000);
  const moved = /slot bytes in (\d+), out (\d+), over (\d+) forward messages/.exec(hosts[1]!.out());
  const perMb = moved ? (Number(moved[1]) + Number(moved[2])) / Number(moved[3]) : NaN;

  // 3. the link: 64 MiB of slot bytes from hA to hB through the hub's nats-server
  const linkSrc = (role: 'rx' | 'tx') => `
    import { clusterConnect } from '${path.join(ROOT, 'dist/actors/transport/connect.js')}';
    import { LinkSender, listen } from '${path.join(ROOT, 'dist/actors/transport/link.js')}';
    const nc = await clusterConnect(${JSON.stringify(nats.url)}, '${role}');
    const N = 64 << 20, buf = new Uint8Array(new SharedArrayBuffer(N + 64));
    if ('${role}' === 'rx') {
      listen(nc, { subject: 'bench.bw', admit: () => undefined, onMessage: () => {}, sink: (_s, off, len) => buf.subarray(off, off + len) });
      await nc.flush(); console.log('ready'); await new Promise((r) => setTimeout(r, 120000));
    } else {
      const tx = new LinkSender(nc, { to: 'bench.bw', run: 'bench' });
      await tx.sendSlot(0, 4, buf.subarray(0, 1 << 20));
      const t0 = performance.now();
      await tx.sendSlot(0, 4, buf.subarray(0, N));
      console.log('MBps', (N / 2 ** 20) / ((performance.now() - t0) / 1000), 'chunk', tx.chunk);
      await nc.close();
    }`;
  const rx = inHost('hB', ['--input-type=module', '-e', linkSrc('rx')]);
  await waitFor(rx, /ready/, 30_000);
  const tx = inHost('hA', ['--input-type=module', '-e', linkSrc('tx')]);
  await tx.done;
  rx.c.kill('SIGKILL');
  const bw = /MBps ([\d.]+) chunk (\d+)/.exec(tx.out());

  // 4. recovery: kill hB's host during the run; hC is a free registered host
  const spare = serve('hC');
  await waitFor(spare, /ready/, 30_000);
  const killed = inHost('hA', [CLI, 'train', config('killed', ['hA/cpu:0', 'hB/cpu:0']), '--cluster', nats.url]);
  await waitFor(killed, /step 2\//, 600_000);
  const tKill = Date.now();
  hosts[1]!.c.kill('SIGKILL');
  await killed.done;
  const faults = fs
    .readFileSync(path.join(tmp, 'killed', 'metrics.jsonl'), 'utf8')
    .split('\n')
    .filter(Boolean)
    .map((l) => JSON.parse(l))
    .filter((r) => r.type === 'fault' && r.stage !== undefined);
  const f = faults[0];
  const detectMs = f ? new Date(f.time).getTime() - f.recovery_ms - tKill : NaN;
  const same = ['a0', 'a1'].every((n) =>
    fs
      .readFileSync(path.join(tmp, 'local', n, 'adapter_model.safetensors'))
      .equals(fs.readFileSync(path.join(tmp, 'killed', n, 'adapter_model.safetensors'))),
  );

  console.log(
    `\ncluster bench: bench model, ${A} adapters (r 16, all 7 modules), micro-batch 2 × 128, ${steps} steps, 1 thread per stage`,
  );
  console.log(
    `| layout | tokens/s |\n|---|---:|\n| 2 stages in one process (worker threads, shared memory) | ${localTps} |\n| 2 stages on 2 namespaced hosts over NATS | ${remoteTps} |`,
  );
  console.log(`ratio (hosts / one process): ${(remoteTps / localTps).toFixed(2)}`);
  console.log(
    `slot bytes per micro-batch message on stage 1's host (in + out): ${Math.round(perMb)} (${(perMb / 2 ** 20).toFixed(2)} MiB)`,
  );
  console.log(
    `NATS link hA -> hub -> hB: ${bw ? `${Number(bw[1]).toFixed(0)} MiB/s in chunks of ${bw[2]} bytes` : `failed: ${tx.out()}`}`,
  );
  console.log(
    `SIGKILL of hB: detected after ${Math.round(detectMs)} ms (${f?.detail ?? 'no fault recorded'}), recovered in ${Math.round(f?.recovery_ms ?? NaN)} ms, ${f?.replayed} micro-batch(es) replayed; adapters bitwise equal to the one-process run: ${same}`,
  );
  for (const p of [...hosts, spare]) p.c.kill('SIGTERM');
  await nats.stop();
} finally {
  cleanup();
}
