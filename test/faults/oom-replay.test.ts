// Out-of-memory errors that keep coming back while the recovery replays: an error during a
// replay ends that attempt at once (no hang), the next attempt runs, and once the stage has
// failed more often than maxStageFailures the run stops cleanly with a StageFailure naming the
// stage and the cause, within a bounded time.
import t from 'tap';
import { adapters, run } from './harness.js';
import { tinyModel } from '../support/models.js';
import { tmpDir } from '../support/files.js';

const model = await tinyModel(0);
const cfg = adapters(tmpDir(t, 'oom-replay'), ['a', 'b']);
// the first fires in normal running; the next two at the following micro-batch messages of
// stage 1, i.e. during the replays of that recovery
const r = await run({
  model,
  adapters: cfg,
  faults: ['oom:stage=1,after=10', 'oom:stage=1,after=11', 'oom:stage=1,after=12'],
  maxStageFailures: 2,
});
t.ok(r.error, `the run stopped: ${r.error?.message}`);
t.match(r.error?.name ?? '', 'StageFailure', 'with a StageFailure, not a timeout');
t.match(
  r.error?.message ?? '',
  /stage 1 \(cpu:1\) failed 3 times \(limit 2\); last: oom: .*out of memory/,
  'naming the stage and the cause',
);
t.ok(
  r.faults.some((f) => f.fatal && f.fault === 'oom'),
  'a fatal oom fault event was reported',
);
t.ok(
  [...r.states.values()].every((s) => s === 'failed'),
  `every job ended failed (${[...r.states.values()].join(', ')})`,
);
await r.sup.close();
