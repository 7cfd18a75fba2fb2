// Hang (heartbeat deadline), corrupted slots (checksums), allocation failure and a slow stage,
// each at several points of the schedule: the run ends bitwise equal to the fault-free run.
import t from 'tap';
import { adapters, run, stateDiff } from './harness.js';
import { tinyModel } from '../support/models.js';
import { tmpDir } from '../support/files.js';

const model = await tinyModel(0);
const dir = tmpDir(t, 'kinds');
const cfg = adapters(dir, ['a', 'b', 'c']);
const base = await run({ model, adapters: cfg });
t.notOk(base.error, `fault-free run: ${base.error?.message ?? 'ok'}`);

const cases: Array<[string, string | undefined]> = [
  ['hang:stage=1,after=4', 'hang'],
  ['hang:stage=0,after=14', 'hang'],
  ['corrupt:stage=0,after=8', 'corrupt'],
  ['corrupt:stage=1,after=15', 'corrupt'],
  ['corrupt:stage=0,after=31', 'corrupt'],
  ['oom:stage=0,after=10', 'oom'],
  ['oom:stage=1,after=19', 'oom'],
  ['oom:stage=1,after=40', 'oom'],
  ['slow:stage=1,factor=3', undefined],
];
for (const [spec, kind] of cases) {
  const r = await run({ model, adapters: cfg, faults: [spec], heartbeatMs: 50, hangTimeoutMs: 1000 });
  t.notOk(r.error, `${spec}: ${r.error?.message ?? 'completed'} in ${Math.round(r.ms)} ms`);
  const desc = r.faults
    .map(
      (f) =>
        `${f.fault} on ${f.stage}: detected after ${f.silentMs?.toFixed(0)} ms silent, recovered in ${f.recoveredMs?.toFixed(0)} ms, ${f.replayed} replayed`,
    )
    .join('; ');
  if (kind)
    t.same(
      r.faults.map((f) => f.fault),
      [kind],
      `${spec}: one ${kind} recovery: ${desc}`,
    );
  else t.same(r.faults, [], `${spec}: a slow stage is never declared hung`);
  if (kind === 'oom') {
    // the harness's pipeline admits 2 × 2 stages = 4 messages; an allocation failure halves that
    t.equal(r.faults[0]?.admission, 2, `${spec}: the fault report gives the lowered admission`);
    t.equal(r.sup.admissionLimit, 2, `${spec}: the supervisor admits at most 2 micro-batch messages from then on`);
  } else t.equal(r.sup.admissionLimit, 4, `${spec}: admission unchanged`);
  for (const a of cfg)
    t.equal(stateDiff(r.finals.get(a.name), base.finals.get(a.name)), '', `${spec}: ${a.name} bitwise equal`);
  t.equal(r.slotsInUse, 0, `${spec}: no shared slot left taken`);
}
