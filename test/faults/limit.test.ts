// The same stage failing again and again: past maxStageFailures the run stops cleanly with an
// error naming the stage and the cause, and every adapter's last consistent state is saved.
import t from 'tap';
import { loadCheckpoint, latestCheckpoint } from '../../lib/io/checkpoint.js';
import { loraSpec } from '../../actors/scheduler/prepare.js';
import { adapters, run, stateDiff } from './harness.js';
import { tinyModel } from '../support/models.js';
import { tmpDir } from '../support/files.js';
import { Supervisor } from '../../actors/index.js';

const model = await tinyModel(0);
const dir = tmpDir(t, 'limit');
const cfg = adapters(dir, ['a', 'b'], 6);
const out = tmpDir(t, 'limit-out');
const crashes = Array.from({ length: 5 }, () => 'crash:stage=1,after=12');
const r = await run({ model, adapters: cfg, faults: crashes, maxStageFailures: 3, output: out });
t.ok(r.error, 'the run stops');
t.match(
  r.error?.message ?? '',
  /stage 1 \(cpu:1\) failed 4 times \(limit 3\); last: crash: worker exited with code 70/,
  `the error names the stage and the cause: ${r.error?.message}`,
);
t.equal(r.faults.filter((f) => !f.fatal).length, 3, '3 recoveries');
t.equal(r.faults.filter((f) => f.fatal).length, 1, 'then a fatal fault event');
await r.sup.close();
const { config } = (await import('../../lib/io/hf-model.js')).openModelDir(model);
for (const a of cfg) {
  t.equal(r.states.get(a.name), 'failed', `${a.name} stopped`);
  const ck = latestCheckpoint(`${out}/${a.name}`);
  t.ok(ck, `${a.name}: a complete checkpoint was saved (${ck?.dir})`);
  if (!ck) continue;
  const saved = loadCheckpoint(ck.dir, config, loraSpec(a));
  t.ok(saved.meta.step >= 1, `${a.name}: checkpoint at step ${saved.meta.step}`);
  // the saved state is exactly the state after that many steps of a fault-free run (constant lr)
  const ref = await run({ model, adapters: [{ ...a, max_steps: saved.meta.step }] });
  t.equal(
    stateDiff(saved.state, ref.finals.get(a.name)),
    '',
    `${a.name}: checkpoint bitwise equal to a fault-free run of ${saved.meta.step} steps`,
  );
}
void Supervisor;
