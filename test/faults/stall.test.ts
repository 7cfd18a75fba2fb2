// The supervisor's own thread held up (synchronous work, a long GC, a loaded machine) for
// longer than the hang deadline: the stages' heartbeats of that time wait unread behind the
// watchdog's timer, and a healthy stage must not be declared hung for it. The hold-up here is
// a busy loop of 1 s in an event callback, with a 300 ms deadline.
import t from 'tap';
import { Supervisor } from '../../actors/index.js';
import type { FaultEvent } from '../../actors/runtime.js';
import { adapters } from './harness.js';
import { tinyModel } from '../support/models.js';
import { tmpDir } from '../support/files.js';

t.test('a stalled supervisor thread declares no healthy stage hung', async (t) => {
  const model = await tinyModel(0);
  const cfg = adapters(tmpDir(t, 'stall'), ['a', 'b'], 4);
  const faults: FaultEvent[] = [];
  let stalls = 0;
  const sup = await Supervisor.start({
    model,
    devices: ['cpu:0', 'cpu:1'],
    threads: 1,
    heartbeatMs: 50,
    hangTimeoutMs: 300,
    onFault: (f) => faults.push(f),
    onEvent: (e) => {
      if (e.type !== 'step' || e.step > 2) return;
      stalls++;
      const until = performance.now() + 1000;
      while (performance.now() < until) {
        // the thread does nothing else: no message, no timer
      }
    },
  });
  t.teardown(() => sup.close());
  const jobs = cfg.map((a) => sup.submit(a));
  await sup.drain();
  t.equal(stalls, 4, 'the thread stalled 4 times, 1 s each');
  t.same(
    faults.map((f) => `${f.fault} on stage ${f.stage}: ${f.detail}`),
    [],
    'no stage was declared hung',
  );
  t.same(
    jobs.map((j) => j.state),
    ['done', 'done'],
  );
});
