// The cluster test harness itself: a namespace topology with a real, authenticating
// nats-server in one host, reached from another host over the bridge (and not from this
// namespace), torn down completely; a dead run's leftovers are removed by the next run.
import { spawnSync } from 'node:child_process';
import { mkdirSync, writeFileSync } from 'node:fs';
import t from 'tap';
import { netnsUnavailable, removeLeftovers, Topology } from '../../scripts/cluster/netns.js';
import { natsServerBinary, startNatsServer } from '../../scripts/cluster/nats-server.js';
import { clusterSkip, nodeInHost } from './util.js';

const skip = await clusterSkip();

t.test('a nats-server with auth in a namespace, reached from another namespace host', { skip }, async (t) => {
  const topo = new Topology('harness', ['hub', 'a']);
  t.teardown(() => topo.teardown());
  const { binary } = await natsServerBinary();
  const nats = await startNatsServer({
    binary: binary!,
    user: 'mlora',
    password: 's3cret-pw',
    topology: topo,
    host: 'hub',
  });
  t.teardown(() => nats.stop());
  t.equal(nats.address, `nats://${topo.host('hub').ip}:4222`);
  const probe = (url: string) =>
    nodeInHost(
      topo,
      'a',
      `
    import { clusterConnect } from './dist/actors/transport/connect.js';
    try {
      const nc = await clusterConnect(${JSON.stringify(url)}, 'probe');
      const sub = nc.subscribe('probe', { callback: (_e, m) => m.respond(new TextEncoder().encode('pong:' + m.string())) });
      const r = await nc.request('probe', 'ping', { timeout: 5000 });
      console.log(r.string(), nc.info.max_payload);
      sub.unsubscribe();
      await nc.close();
    } catch (e) { console.log('ERR', e.message); }`,
    );
  const ok = await probe(nats.url);
  t.match(ok, /^pong:ping 1048576/, 'request/reply through the bridge, with the credentials');
  const bad = await probe(nats.url.replace('s3cret-pw', 'wrong'));
  t.match(bad, /ERR .*refused the credentials/, `a wrong password is refused: ${bad.trim()}`);
  // this namespace has no route to the test subnet: the topology is isolated
  const here = spawnSync('ip', ['route', 'get', topo.host('hub').ip], { encoding: 'utf8' });
  t.notMatch(here.stdout, /dev br0|dev eth0 .*10\.231/, 'no route from the root namespace into the topology');
});

t.test(
  "teardown removes every namespace; a dead run's leftovers go at the next start",
  { skip: skip ?? netnsUnavailable() },
  async (t) => {
    const topo = new Topology('harness', ['x', 'y']);
    t.equal(topo.remaining().length, 3, 'bridge + 2 hosts');
    topo.teardown();
    t.same(topo.remaining(), []);
    // a leftover: namespaces with a marker whose owner process is gone
    const prefix = 'mlc-harness-dead00';
    spawnSync('ip', ['netns', 'add', `${prefix}-br`]);
    mkdirSync('/tmp/mlora-netns', { recursive: true });
    const dead = spawnSync(process.execPath, ['-e', 'console.log(process.pid)'], { encoding: 'utf8' });
    writeFileSync(`/tmp/mlora-netns/${prefix}`, dead.stdout.trim());
    const removed = removeLeftovers('harness');
    t.same(removed, [`${prefix}-br`]);
  },
);
