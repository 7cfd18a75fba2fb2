// The stage host against a real nats-server on loopback: it registers its devices (memory,
// threads) under a lease; a device obeys only the run that claimed it; a claim lapses when its
// run falls silent; Init with another model's fingerprint is refused with what differs; a host
// that closes takes its record away at once, one that loses its connection within the lease;
// registration and claims also work over TLS within the subject permissions of README's cluster.conf.
import { spawnSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import t from 'tap';
import { natsServerBinary, startNatsServer } from '../../scripts/cluster/nats-server.js';
import { clusterConnect } from '../../actors/transport/connect.js';
import { StageHost, type FromHost } from '../../actors/transport/host.js';
import { LinkSender, listen } from '../../actors/transport/link.js';
import { listDevices, openRegistry } from '../../actors/transport/registry.js';
import { openModelDir } from '../../lib/io/hf-model.js';
import { modelFingerprint } from '../../lib/io/fingerprint.js';
import { tinyModel, tinyModelWithLayers } from '../support/models.js';
import { balanceSplit } from '../../lib/schedule/split.js';

const { binary, reason } = await natsServerBinary();

/** Polls `f` until it is true (every 50 ms, at most `ms`). */
async function until(f: () => Promise<boolean>, ms: number): Promise<boolean> {
  for (const t0 = Date.now(); Date.now() - t0 < ms; await new Promise((r) => setTimeout(r, 50)))
    if (await f()) return true;
  return false;
}

t.test('stage host: registration, claims, fingerprint, leases', { skip: reason }, async (t) => {
  const srv = await startNatsServer({ binary: binary!, user: 'mlora', password: randomBytes(8).toString('hex') });
  t.teardown(() => srv.stop());
  const host = await StageHost.start({
    url: srv.url,
    name: 'h1',
    devices: ['cpu:0'],
    memory: 1 << 30,
    threads: 2,
    leaseMs: 1500,
  });
  t.teardown(() => host.close());
  const nc = await clusterConnect(srv.url, 'test');
  t.teardown(() => nc.close());
  const kv = await openRegistry(nc, 1500);
  const devs = await listDevices(nc, kv);
  t.match(devs, [
    {
      id: 'h1/cpu:0',
      host: 'h1',
      device: 'cpu:0',
      kind: 'cpu',
      memory: 1 << 30,
      threads: 2,
      subject: 'mlora.stage.h1.cpu_0',
    },
  ]);
  t.notOk(devs[0]!.claimedBy, 'free');

  const to = devs[0]!.subject;
  const h1 = async () => (await listDevices(nc, kv)).find((d) => d.id === 'h1/cpu:0');
  const run1 = new LinkSender(nc, { to, run: 'run-1' });
  const run2 = new LinkSender(nc, { to, run: 'run-2' });
  await t.rejects(run1.send({ type: 'keepalive' }), {
    kind: 'refused',
    message: /h1\/cpu:0 is not claimed by run run-1 \(claim it first\)/,
  });
  await run1.send({ type: 'claim', leaseMs: 60_000 }, { 'm-claim': '1' });
  t.ok(await until(async () => (await h1())?.claimedBy === 'run-1', 5_000), 'the registry shows the claim');
  await t.rejects(run2.send({ type: 'claim', leaseMs: 60_000 }, { 'm-claim': '1' }), {
    kind: 'refused',
    message: /h1\/cpu:0 is claimed by another run/,
  });
  await t.rejects(
    run2.send({ type: 'release' }),
    { kind: 'refused', message: /claimed by another run/ },
    'another run cannot release it either',
  );

  // Init with the fingerprint of another model: refused, saying what differs
  const replies: FromHost[] = [];
  const sub = listen(nc, {
    subject: 'test.sup',
    admit: () => undefined,
    onMessage: (m) => replies.push(m as FromHost),
    sink: () => new Uint8Array(0),
  });
  t.teardown(() => sub.unsubscribe());
  const mine = await tinyModel();
  const theirs = await tinyModelWithLayers(3);
  const config = openModelDir(mine).config;
  const init = {
    type: 'init',
    id: 0,
    stage: 0,
    plan: balanceSplit(config, [1]).plans[0]!,
    modelDir: mine,
    device: 'h1/cpu:0',
    threads: 1,
    budget: 1 << 28,
    slotCount: 4,
    slotBytes: 4096,
    faults: [],
    heartbeatMs: 200,
    originMs: 0,
    fingerprint: modelFingerprint(openModelDir(theirs)),
    replyTo: 'test.sup',
  };
  await run1.send({ type: 'remote-init', init });
  t.ok(await until(async () => replies.length > 0, 10_000), 'an answer');
  t.match(replies[0], {
    type: 'error',
    stage: 0,
    error: {
      code: 'ERR_MLORA_CRASH',
      message:
        /h1\/cpu:0 refuses the run's model: the model at .* is not the supervisor's: config\.json differs .*the tensor headers differ \(21 tensors, .*; 30 tensors/,
    },
  });

  await run1.send({ type: 'release' });
  t.ok(await until(async () => ((d) => !!d && !d.claimedBy)(await h1()), 5_000), 'free again after release');

  // a claim whose run falls silent lapses
  await run2.send({ type: 'claim', leaseMs: 300 }, { 'm-claim': '1' });
  t.ok(await until(async () => (await h1())?.claimedBy === 'run-2', 5_000));
  t.ok(await until(async () => ((d) => !!d && !d.claimedBy)(await h1()), 5_000), 'the silent run lost its claim');

  // a host that loses its connection vanishes within its lease; one that closes, at once
  const h2 = await StageHost.start({ url: srv.url, name: 'h2', devices: ['cpu:0'], leaseMs: 1500 });
  t.ok((await listDevices(nc, kv)).some((d) => d.id === 'h2/cpu:0'));
  await h2.nc.close();
  t.ok(await until(async () => !(await listDevices(nc, kv)).some((d) => d.id === 'h2/cpu:0'), 6_000), 'lease expired');
  await h2.close();
  await host.close();
  t.same(await listDevices(nc, kv), [], 'a closed host deregisters');
});

t.test(
  "TLS and the subject permissions of README's cluster.conf",
  {
    skip:
      reason ?? (spawnSync('openssl', ['version']).status === 0 ? undefined : 'no openssl to make a test certificate'),
  },
  async (t) => {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'mlora-tls-'));
    t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }));
    const cert = path.join(dir, 'cert.pem');
    const key = path.join(dir, 'key.pem');
    const r = spawnSync(
      'openssl',
      [
        'req',
        '-x509',
        '-newkey',
        'rsa:2048',
        '-nodes',
        '-keyout',
        key,
        '-out',
        cert,
        '-days',
        '1',
        '-subj',
        '/CN=localhost',
        '-addext',
        'subjectAltName=IP:127.0.0.1,DNS:localhost',
      ],
      { encoding: 'utf8', timeout: 60_000 },
    );
    t.equal(r.status, 0, `openssl: ${r.stderr.slice(-300)}`);
    const srv = await startNatsServer({
      binary: binary!,
      user: 'mlora',
      password: 'tls-pw',
      tls: { cert, key },
      permissions: {
        publish: ['mlora.>', '$JS.API.>', '$KV.mlora_hosts.>', '_INBOX.>'],
        subscribe: ['mlora.>', '_INBOX.>'],
      },
    });
    t.teardown(() => srv.stop());
    t.match(srv.url, /^tls:\/\//);
    const noCa = await StageHost.start({ url: srv.url, name: 'tls0', devices: ['cpu:0'] }).then(
      () => undefined,
      (e: Error) => e,
    );
    t.match(
      noCa?.message,
      /cannot connect to the cluster at tls:\/\/mlora:\*\*\*@.*certificate/,
      'an unknown certificate is refused',
    );
    const host = await StageHost.start({ url: srv.url, name: 'tls1', devices: ['cpu:0'], auth: { tlsCa: cert } });
    t.teardown(() => host.close());
    const nc = await clusterConnect(srv.url, 'test', { tlsCa: cert });
    t.teardown(() => nc.close());
    const kv = await openRegistry(nc);
    const [dev] = await listDevices(nc, kv);
    t.equal(dev?.id, 'tls1/cpu:0', 'registered through TLS, within the permissions');
    await new LinkSender(nc, { to: dev!.subject, run: 'r' }).send(
      { type: 'claim', leaseMs: 10_000 },
      { 'm-claim': '1' },
    );
    t.ok(
      await until(async () => (await listDevices(nc, kv)).find((d) => d.id === 'tls1/cpu:0')?.claimedBy === 'r', 5_000),
      'claimed within the permissions',
    );
  },
);
