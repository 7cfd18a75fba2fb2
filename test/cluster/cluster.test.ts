// Training across hosts, for real: network namespaces joined by a bridge (one per host), a
// nats-server with user/password auth in one of them, `mlora stage serve` in the others, and
// `mlora train --cluster` run from inside a host namespace. A 3-stage, 2-adapter run with its
// stages on three hosts ends with adapters bitwise equal to the same run in one process; a
// stage host killed with SIGKILL mid-run is replaced by a free registered host and the run
// still ends bitwise equal, and so does one that loses its link or hangs (SIGSTOP); a wrong
// password and a host with a different model are refused with clear errors.
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { spawnSync, type ChildProcess } from 'node:child_process';
import t from 'tap';
import type * as Tap from 'tap';
import { Topology } from '../../scripts/cluster/netns.js';
import { natsServerBinary, startNatsServer } from '../../scripts/cluster/nats-server.js';
import { tinyModelIn, tinyModelWithLayers } from '../support/models.js';
import { smallConfig, writeJson } from '../cli/util.js';
import { clusterSkip, CLI } from './util.js';

const skip = await clusterSkip();

interface Proc {
  child: ChildProcess;
  out: () => string;
  exited: Promise<number | null>;
}

function run(topo: Topology, host: string, args: string[]): Proc {
  const child = topo.spawn(host, process.execPath, [CLI, ...args]);
  let out = '';
  child.stdout!.on('data', (b) => (out += b));
  child.stderr!.on('data', (b) => (out += b));
  const exited = new Promise<number | null>((r) => child.once('exit', (code) => r(code)));
  return { child, out: () => out, exited };
}

/** Waits (bounded) until a process printed `re`; rejects with its output when it ends first or the time is up. */
async function waitFor(p: Proc, re: RegExp, ms = 60_000, from = 0): Promise<void> {
  const t0 = Date.now();
  while (!re.test(p.out().slice(from))) {
    if (p.child.exitCode !== null) throw new Error(`exited (${p.child.exitCode}) before printing ${re}:\n${p.out()}`);
    if (Date.now() - t0 > ms) throw new Error(`no ${re} within ${ms} ms:\n${p.out()}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

/** Asserts a clean exit, printing the process's output only when it was not. */
async function exitsZero(t: Tap.Test, p: Proc, what: string, ms?: number): Promise<void> {
  const code = await finish(p, ms);
  t.equal(code, 0, `${what}: exit 0`);
  if (code !== 0) t.comment(p.out().slice(-4000));
}

async function finish(p: Proc, ms = 240_000): Promise<number | null> {
  let timer: NodeJS.Timeout | undefined;
  const code = await Promise.race([
    p.exited,
    new Promise<'timeout'>((r) => (timer = setTimeout(() => r('timeout'), ms))),
  ]);
  clearTimeout(timer);
  if (code === 'timeout') {
    p.child.kill('SIGKILL');
    throw new Error(`did not end within ${ms} ms:\n${p.out()}`);
  }
  return code;
}

function adapterBytes(out: string, name: string): Buffer {
  return fs.readFileSync(path.join(out, name, 'adapter_model.safetensors'));
}

t.test('stages on namespaced hosts over NATS', { skip, timeout: 900_000 }, async (t) => {
  const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'mlora-cluster-'));
  t.teardown(() => fs.rmSync(tmp, { recursive: true, force: true }));
  const topo = new Topology('cluster', ['hub', 'hA', 'hB', 'hC', 'hD', 'hE', 'hF']);
  t.teardown(() => topo.teardown());
  const { binary } = await natsServerBinary();
  const nats = await startNatsServer({
    binary: binary!,
    user: 'mlora',
    password: 'cluster-test-pw',
    topology: topo,
    host: 'hub',
    maxPayload: 256 * 1024,
  });
  t.teardown(() => nats.stop());

  const model = await tinyModelWithLayers(4); // room for 3 stages
  t.teardown(() => fs.rmSync(model, { recursive: true, force: true }));
  const other = await tinyModelIn(path.join(tmp, 'other-model')); // 2 layers: another config

  const serve = (host: string, extra: string[] = []) =>
    run(topo, host, [
      'stage',
      'serve',
      '--cluster',
      nats.url,
      '--name',
      host,
      '--threads',
      '1',
      '--lease-ms',
      '3000',
      ...extra,
    ]);
  const hosts = new Map<string, Proc>();
  for (const h of ['hA', 'hB', 'hC']) hosts.set(h, serve(h));
  hosts.set('hD', serve('hD', ['--model', other]));
  for (const p of hosts.values()) await waitFor(p, /ready/);

  const config = (name: string, devices: string[], modelDir = model, everyRow = false) => {
    const c = smallConfig(modelDir, path.join(tmp, name), { steps: 6, saveEvery: 100 }) as ReturnType<
      typeof smallConfig
    > & { devices: string[] };
    c.devices = devices;
    // the split counts the head on the targeted rows only: training on the prompts too targets every row
    if (everyRow) for (const a of c.adapters) (a as { train_on_inputs?: boolean }).train_on_inputs = true;
    return writeJson(path.join(tmp, `${name}.json`), c);
  };
  const HOSTS = ['hA/cpu:0', 'hB/cpu:0', 'hC/cpu:0'];
  /** A run in one process (worker threads, shared memory): the reference of the bitwise checks. */
  const trainLocally = (configFile: string) =>
    spawnSync(process.execPath, [CLI, 'train', configFile, '--progress', 'none'], {
      encoding: 'utf8',
      timeout: 300_000,
    });
  /** `mlora train CONFIG --cluster URL ...flags` started on hA. */
  const trainOnCluster = (configFile: string, ...flags: string[]) =>
    run(topo, 'hA', ['train', configFile, '--cluster', nats.url, ...flags]);
  /** Every adapter of the run in tmp/`name` bitwise equal to the one of tmp/`ref`. */
  const assertSameAdapters = (t: Tap.Test, ref: string, name: string) => {
    for (const a of ['capitals', 'arithmetic'])
      t.ok(adapterBytes(path.join(tmp, ref), a).equals(adapterBytes(path.join(tmp, name), a)), `${a}: bitwise equal`);
  };

  // the reference: the same 3-stage run in one process (worker threads, shared memory)
  const ref = trainLocally(config('local', ['cpu:0', 'cpu:1', 'cpu:2']));
  t.equal(ref.status, 0, 'one-process run: exit 0');
  if (ref.status !== 0) t.comment(ref.stdout.slice(-2000), ref.stderr.slice(-2000));

  await t.test('--dry-run prints the placement on registered devices', async (t) => {
    const p = trainOnCluster(config('dry', HOSTS), '--dry-run');
    await exitsZero(t, p, 'dry run', 60_000);
    t.match(p.out(), /stage 0 -> hA\/cpu:0 \(cpu, [\d.]+ [GM]iB, 1 thread\)/);
    t.match(p.out(), /stage 2 -> hC\/cpu:0/);
    t.match(p.out(), /stage 1 on hB\/cpu:0: (layers? \d|the MLP of layer \d)/);
  });

  await t.test('3 stages on 3 hosts: bitwise equal to the one-process run', async (t) => {
    const p = trainOnCluster(config('remote', HOSTS), '--progress', 'plain');
    await exitsZero(t, p, 'cluster run');
    assertSameAdapters(t, 'local', 'remote');
  });

  // a head twice the tiny one's, on every row: the split gives stage 1 a share of it, so the last stage's
  // final hidden states go to stage 1's host and the share's rows of the gradient and losses
  // come back (partial slots), all relayed over NATS
  await t.test('a head share on stage 1: 3 stages on 3 hosts bitwise equal to the one-process run', async (t) => {
    const wide = await tinyModelWithLayers(4, 7, 1024);
    t.teardown(() => fs.rmSync(wide, { recursive: true, force: true }));
    const one = trainLocally(config('wide-local', ['cpu:0', 'cpu:1', 'cpu:2'], wide, true));
    t.equal(one.status, 0, 'one-process run: exit 0');
    const p = trainOnCluster(config('wide-remote', HOSTS, wide, true), '--progress', 'plain');
    await exitsZero(t, p, 'cluster run');
    t.match(
      p.out(),
      /stage 1 on hB\/cpu:0: .* \+ norm\/head\/loss of \d+% of the targeted rows/,
      'stage 1 runs a share of the head',
    );
    assertSameAdapters(t, 'wide-local', 'wide-remote');
  });

  await t.test('a wrong password is refused, for a host and for a run', async (t) => {
    const bad = nats.url.replace('cluster-test-pw', 'not-the-password');
    const h = run(topo, 'hE', ['stage', 'serve', '--cluster', bad, '--name', 'hE']);
    t.not(await finish(h, 60_000), 0);
    t.match(
      h.out(),
      /cannot connect to the cluster at nats:\/\/mlora:\*\*\*@10\.231\.0\.\d+:4222: the server refused the credentials/,
    );
    t.notMatch(h.out(), /not-the-password/);
    const r = run(topo, 'hA', ['train', config('badpw', ['hA/cpu:0']), '--cluster', bad]);
    t.not(await finish(r, 60_000), 0);
    t.match(r.out(), /refused the credentials/);
  });

  await t.test("a host whose model differs from the supervisor's is refused", async (t) => {
    const p = trainOnCluster(config('mismatch', ['hA/cpu:0', 'hD/cpu:0']), '--progress', 'none');
    t.not(await finish(p, 120_000), 0);
    t.match(
      p.out(),
      /hD\/cpu:0 refuses the run's model: the model at .*other-model is not the supervisor's: config\.json differs/,
    );
  });

  /**
   * A 3-stage run from hA during which `fault` strikes the host of `stage` after step 2: the run
   * must end cleanly, the fault be detected, the stage restart on `to`, the adapters bitwise
   * equal to the one-process run's.
   */
  const faultRun = async (
    t: Tap.Test,
    name: string,
    devices: string[],
    stage: number,
    to: string,
    fault: () => void,
  ) => {
    const p = trainOnCluster(config(name, devices), '--progress', 'plain');
    await waitFor(p, /step 2\/6/, 240_000);
    fault();
    await exitsZero(t, p, `run ${name}`);
    t.match(p.out(), new RegExp(`fault on stage ${stage}: (crash|hang)`), 'the fault was detected');
    t.match(hosts.get(to)!.out(), new RegExp(`stage ${stage} \\(layers`), `stage ${stage} restarted on ${to}`);
    assertSameAdapters(t, 'local', name);
  };

  await t.test(
    'a stage host killed with SIGKILL: its stage moves to a free host, the run ends bitwise equal',
    async (t) => {
      hosts.set('hE', serve('hE'));
      await waitFor(hosts.get('hE')!, /ready/);
      await faultRun(t, 'killed', HOSTS, 1, 'hE', () => hosts.get('hB')!.child.kill('SIGKILL'));
    },
  );

  await t.test(
    'a stage host that loses its link: detected, its stage moves to a free host, bitwise equal',
    async (t) => {
      hosts.set('hF', serve('hF'));
      await waitFor(hosts.get('hF')!, /ready/);
      await faultRun(t, 'cut', ['hA/cpu:0', 'hE/cpu:0', 'hC/cpu:0'], 2, 'hF', () => topo.setLink('hC', false));
      const seen = hosts.get('hC')!.out().length;
      topo.setLink('hC', true);
      // back on the network, the host reconnects and frees the device its old run left
      await waitFor(hosts.get('hC')!, /free again/, 90_000, seen);
      t.pass('the cut-off host came back and freed its device');
    },
  );

  await t.test(
    'a stage host that hangs (SIGSTOP): detected, its stage moves to a host that came back, bitwise equal',
    async (t) => {
      const hung = hosts.get('hE')!.child;
      t.teardown(() => hung.kill('SIGCONT'));
      await faultRun(t, 'hung', ['hA/cpu:0', 'hE/cpu:0', 'hF/cpu:0'], 1, 'hC', () => hung.kill('SIGSTOP'));
      hung.kill('SIGCONT');
    },
  );

  for (const p of hosts.values()) p.child.kill('SIGTERM');
  await Promise.all([...hosts.values()].map((p) => finish(p, 20_000).catch(() => p.child.kill('SIGKILL'))));
  await nats.stop();
  topo.teardown();
  t.same(topo.remaining(), [], 'no namespace left');
});
