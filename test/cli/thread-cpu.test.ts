// The benchmarks' account of the cores by kind of thread (scripts/cli/thread-cpu.ts): which
// threads count as what. The times themselves are measured, never asserted.
import fs from 'node:fs';
import t from 'tap';
import { openDevice } from '../../lib/tensor.js';
import { machineIdle, threadTimes, threadTimesSince } from '../../scripts/cli/thread-cpu.js';

const noProc = !fs.existsSync('/proc/self/task') && 'no /proc/self/task here';

t.test('the main thread and a device compute thread are told apart', { skip: noProc }, async (t) => {
  const d = openDevice('cpu:0', { threads: 1, budget: 1 << 24 });
  const y = d.alloc('f32', [1024]);
  const before = threadTimes();
  await d.run([{ op: 'fill', y, value: 1 }]);
  const after = threadTimes();
  t.ok(after.has('main JS'), 'this thread');
  t.ok(after.has('compute'), "the device's leader thread");
  t.notOk(after.has('stage JS'), 'no stage actor here');
  const since = threadTimesSince(before, after);
  t.ok(
    [...since.values()].every((x) => x.runMs >= 0 && x.waitMs >= 0),
    'counters only grow',
  );
  const m = machineIdle();
  t.ok(m.idleMs >= 0 && m.stealMs >= 0);
  y.free();
});
