// Real crashes of stage worker threads (process.exit in the thread) at several points of the
// schedule: while adapters load, early, during gradient accumulation, at optimizer steps and
// during checkpoints. Every run must end with adapters bitwise equal to the fault-free run.
import t from 'tap';
import { listCheckpoints } from '../../lib/io/checkpoint.js';
import { adapters, run, stateDiff } from './harness.js';
import { tinyModel } from '../support/models.js';
import { tmpDir } from '../support/files.js';

const model = await tinyModel(0);
const dir = tmpDir(t, 'crash');
const cfg = adapters(dir, ['a', 'b', 'c']);
const base = await run({ model, adapters: cfg });
t.notOk(base.error, `fault-free run: ${base.error?.message ?? 'ok'} in ${Math.round(base.ms)} ms`);

for (const stage of [0, 1]) {
  for (const after of [2, 11, 24, 45]) {
    const spec = `crash:stage=${stage},after=${after}`;
    const r = await run({ model, adapters: cfg, faults: [spec] });
    t.notOk(r.error, `${spec}: ${r.error?.message ?? 'completed'} in ${Math.round(r.ms)} ms`);
    t.equal(
      r.faults.length,
      1,
      `${spec}: one recovery: ${r.faults.map((f) => `${f.fault} on ${f.stage}: detected in ${f.silentMs?.toFixed(0)} ms, recovered in ${f.recoveredMs?.toFixed(0)} ms, ${f.replayed} replayed`).join('; ')}`,
    );
    t.ok(
      r.faults.every((f) => f.fault === 'crash' && f.recoveredMs! >= 0 && f.replayed !== undefined),
      `${spec}: reported as a crash with timings`,
    );
    for (const a of cfg)
      t.equal(stateDiff(r.finals.get(a.name), base.finals.get(a.name)), '', `${spec}: ${a.name} bitwise equal`);
    t.equal(r.slotsInUse, 0, `${spec}: no shared slot left taken`);
  }
}

// around checkpoints: save after every step, crash at several points; every checkpoint written is complete
const ckptCfg = adapters(dir, ['a', 'b', 'c'], 4, { save_every: 1 });
for (const after of [13, 30]) {
  const out = tmpDir(t, 'crash-ckpt');
  const spec = `crash:stage=1,after=${after}`;
  const r = await run({ model, adapters: ckptCfg, faults: [spec], output: out });
  t.notOk(r.error, `${spec} with checkpoints: ${r.error?.message ?? 'completed'}`);
  t.equal(r.faults.length, 1, `${spec} with checkpoints: one recovery`);
  for (const a of cfg) {
    t.equal(
      stateDiff(r.finals.get(a.name), base.finals.get(a.name)),
      '',
      `${spec} with checkpoints: ${a.name} bitwise equal`,
    );
    const cks = listCheckpoints(`${out}/${a.name}`);
    t.same(
      cks.map((c) => [c.step, c.complete]),
      [
        [1, true],
        [2, true],
        [3, true],
      ],
      `${spec}: ${a.name} checkpoints 1..3 complete`,
    );
  }
}
