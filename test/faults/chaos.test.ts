// Chaos: seeded random faults (crash, hang, corrupt, oom, several per run, on both stages)
// over a longer run, several times: every run recovers within a bounded time and ends
// bitwise equal to the fault-free run.
import t from 'tap';
import { Rng } from '../../lib/rng.js';
import { adapters, run, stateDiff } from './harness.js';
import { tinyModel } from '../support/models.js';
import { tmpDir } from '../support/files.js';

const model = await tinyModel(0);
const dir = tmpDir(t, 'chaos');
const cfg = adapters(dir, ['a', 'b', 'c', 'd'], 6);
const base = await run({ model, adapters: cfg });
t.notOk(base.error, `fault-free run in ${Math.round(base.ms)} ms`);
const kinds = ['crash', 'hang', 'corrupt', 'oom'] as const;
for (const seed of [1, 2, 3]) {
  const rng = new Rng(seed, 'chaos');
  const faults = Array.from(
    { length: 3 + rng.int(2) },
    () => `${kinds[rng.int(kinds.length)]}:stage=${rng.int(2)},after=${2 + rng.int(60)}`,
  );
  const r = await run({ model, adapters: cfg, faults, maxStageFailures: 10, heartbeatMs: 50, hangTimeoutMs: 800 });
  t.notOk(r.error, `seed ${seed} [${faults.join(' ')}]: ${r.error?.message ?? 'completed'} in ${Math.round(r.ms)} ms`);
  t.ok(
    r.faults.length >= 1,
    `seed ${seed}: ${r.faults.length} recoveries: ${r.faults.map((f) => `${f.fault}@${f.stage} ${f.recoveredMs?.toFixed(0)}ms/${f.replayed}`).join(', ')}`,
  );
  for (const a of cfg)
    t.equal(stateDiff(r.finals.get(a.name), base.finals.get(a.name)), '', `seed ${seed}: ${a.name} bitwise equal`);
  if (r.error) await r.sup.close(); // the harness closes only runs that ended normally
}
