// The NATS transport on a real nats-server (loopback, a port the kernel picks, user/password
// auth, a small max_payload so every message is chunked): control messages of any size keep
// their typed arrays bit for bit, a slot's bytes land in the receiver's SharedArrayBuffer in
// order before the control message sent after them, the sender never has more than `window`
// chunks unanswered, a missing peer or a wrong run is a clear LinkError, a wrong password a
// clear refusal that does not print the password.
import { randomBytes } from 'node:crypto';
import t from 'tap';
import { natsServerBinary, startNatsServer } from '../../scripts/cluster/nats-server.js';
import { clusterConnect, describe, parseClusterUrl } from '../../actors/transport/connect.js';
import { LinkError, LinkSender, listen } from '../../actors/transport/link.js';

const { binary, reason } = await natsServerBinary();

t.test('parseClusterUrl and describe', async (t) => {
  t.same(parseClusterUrl('nats://u:p%40ss@10.0.0.1:4333'), {
    servers: '10.0.0.1:4333',
    user: 'u',
    pass: 'p@ss',
    tls: false,
  });
  t.same(parseClusterUrl('tls://tok@host'), { servers: 'host:4222', token: 'tok', tls: true });
  t.equal(describe('nats://u:secret@h:1'), 'nats://u:***@h:1');
  t.equal(describe('nats://tok@h:1'), 'nats://***@h:1');
  t.throws(() => parseClusterUrl('http://h'), /scheme must be nats:\/\/ or tls:\/\//);
});

t.test('transport over a real nats-server', { skip: reason }, async (t) => {
  const MAX = 64 * 1024;
  const srv = await startNatsServer({
    binary: binary!,
    user: 'mlora',
    password: 'pw-' + randomBytes(6).toString('hex'),
    maxPayload: MAX,
  });
  t.teardown(() => srv.stop());
  const a = await clusterConnect(srv.url, 'a');
  const b = await clusterConnect(srv.url, 'b');
  t.teardown(() => Promise.all([a.close(), b.close()]));
  t.equal(a.info!.max_payload, MAX);

  const sab = new SharedArrayBuffer(4 * MAX + 4096);
  const got: unknown[] = [];
  const sawAtControl: number[] = [];
  const target = new Uint8Array(sab);
  const sub = listen(b, {
    subject: 'test.b',
    admit: (run) => (run === 'run-1' ? undefined : `refused: run '${run}' did not claim this host`),
    onMessage: (m) => {
      got.push(m);
      sawAtControl.push(target[3 * MAX + 100]!);
    },
    sink: (_slot, off, len) => new Uint8Array(sab, off, len),
  });
  t.teardown(() => sub.unsubscribe());
  await b.flush();
  const tx = new LinkSender(a, { to: 'test.b', run: 'run-1', window: 4 });
  t.ok(tx.chunk < MAX, `chunks of ${tx.chunk} bytes under max_payload ${MAX}`);

  // a control message of ~3 max_payloads with typed arrays
  const params = new Float32Array(50_000).map((_, i) => Math.sin(i) * 1e-3);
  params[7] = -0;
  params[9] = Number.MIN_VALUE;
  const sent = {
    type: 'addAdapter',
    id: 3,
    adapter: 1,
    state: { params, m: new Float32Array(4), v: new Float32Array(4), version: 2 },
  };
  // a slot's bytes (3.5 max_payloads), then the control message: it arrives after them
  const data = new Uint8Array(randomBytes(3.5 * MAX));
  const p1 = tx.sendSlot(0, 0, data);
  const p2 = tx.send(sent);
  await Promise.all([p1, p2]);
  t.equal(
    Buffer.compare(Buffer.from(target.subarray(0, data.length)), Buffer.from(data)),
    0,
    'slot bytes arrive intact',
  );
  t.equal(sawAtControl[0], data[3 * MAX + 100], 'the control message sent after the slot saw its bytes');
  const r = got[0] as typeof sent;
  t.ok(r.state.params instanceof Float32Array, 'typed arrays stay typed');
  t.equal(
    Buffer.compare(
      Buffer.from(r.state.params.buffer, r.state.params.byteOffset, r.state.params.byteLength),
      Buffer.from(params.buffer),
    ),
    0,
    'bitwise',
  );
  t.equal(tx.slotBytesSent, data.length);

  // a run that did not claim the receiver is refused, with the receiver's reason
  const other = new LinkSender(a, { to: 'test.b', run: 'run-2' });
  await t.rejects(other.send({ type: 'memory', id: 1 }), {
    name: 'LinkError',
    kind: 'refused',
    message: /run 'run-2' did not claim/,
  });

  // nobody listening: 'gone', at once, and the link stays failed
  const nobody = new LinkSender(a, { to: 'test.nobody', run: 'run-1', timeoutMs: 5_000 });
  await t.rejects(nobody.send({ type: 'x' }), { kind: 'gone', message: /no responders/ });
  await t.rejects(nobody.sendSlot(0, 0, new Uint8Array(10)), LinkError);

  // flow control: a receiver that answers late never sees more than `window` chunks unanswered
  let open = 0;
  let most = 0;
  const held: Array<() => void> = [];
  const slow = b.subscribe('test.slow', {
    callback: (_e, m) => {
      open++;
      most = Math.max(most, open);
      held.push(() => (open--, m.respond(new Uint8Array(0))));
    },
  });
  t.teardown(() => slow.unsubscribe());
  const releaser = setInterval(() => held.splice(0).forEach((f) => f()), 20);
  t.teardown(() => clearInterval(releaser));
  await b.flush();
  const wtx = new LinkSender(a, { to: 'test.slow', run: 'r', window: 3, chunkBytes: 4096 });
  await wtx.sendSlot(0, 0, new Uint8Array(40 * 4096));
  t.ok(most >= 2 && most <= 3, `at most 3 chunks unanswered (saw ${most})`);
});

t.test('a wrong password is refused clearly, without printing it', { skip: reason }, async (t) => {
  const srv = await startNatsServer({ binary: binary!, user: 'mlora', password: 'right-pw' });
  t.teardown(() => srv.stop());
  const err = await clusterConnect(srv.url.replace('right-pw', 'wrong-pw'), 'x').then(
    () => undefined,
    (e: Error) => e,
  );
  t.match(
    err?.message,
    /cannot connect to the cluster at nats:\/\/mlora:\*\*\*@127\.0\.0\.1:\d+: the server refused the credentials/,
  );
  t.notMatch(err?.message, /wrong-pw/);
});

t.test('probe: answered outside the queue, "gone" once the peer closed', { skip: reason }, async (t) => {
  const srv = await startNatsServer({ binary: binary!, user: 'mlora', password: 'probe-pw' });
  t.teardown(() => srv.stop());
  const a = await clusterConnect(srv.url, 'a');
  const b = await clusterConnect(srv.url, 'b');
  t.teardown(() => a.close());
  // a receiver that never answers chunks (a transfer stuck on it) but answers probes
  b.subscribe('test.p', {
    callback: (_e, m) => {
      if (m.headers?.get('m-k') === 'n') m.respond(new Uint8Array(0));
    },
  });
  await b.flush();
  const tx = new LinkSender(a, { to: 'test.p', run: 'r', timeoutMs: 3_000 });
  const stuck = tx.sendSlot(0, 4, new Uint8Array(100));
  stuck.catch(() => {});
  await tx.probe({ type: 'keepalive' }, 2_000);
  t.pass('the probe was answered while a transfer waited');
  await b.close();
  // the server drops the closed peer's subscription a moment later: then probes find no responders
  let kind = '';
  for (let i = 0; i < 20 && kind !== 'gone'; i++)
    kind = await tx.probe({ type: 'keepalive' }, 500).then(
      () => 'answered',
      (e: LinkError) => e.kind,
    );
  t.equal(kind, 'gone', 'no responders once the peer is gone');
  await t.rejects(stuck, { name: 'LinkError', kind: 'timeout' });
});
