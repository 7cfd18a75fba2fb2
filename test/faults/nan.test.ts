// NaN weights in one adapter: that adapter stops with a clear error event; the others end
// bitwise equal to a run without that adapter at all.
import t from 'tap';
import { adapters, run, stateDiff } from './harness.js';
import { tinyModel } from '../support/models.js';
import { tmpDir } from '../support/files.js';

const model = await tinyModel(0);
const dir = tmpDir(t, 'nan');
const [a, b, c] = adapters(dir, ['a', 'b', 'c']);
const without = await run({ model, adapters: [a!, c!] });
t.notOk(without.error, 'run without b');
const r = await run({ model, adapters: [a!, b!, c!], faults: ['nan:adapter=b,step=2'] });
t.notOk(r.error, `run with nan in b: ${r.error?.message ?? 'completed'}`);
t.equal(r.states.get('b'), 'failed', 'b stopped');
const err = r.events.find((e) => e.type === 'error' && e.adapter === 'b');
t.match(
  err && 'message' in err ? err.message : '',
  /NaN.*step 2.*adapter stopped/,
  `b's error names the cause and the step: ${err && 'message' in err ? err.message : ''}`,
);
t.ok(
  r.events.some((e) => e.type === 'fault' && e.adapter === 'b'),
  'the injection is reported',
);
for (const x of [a!, c!]) {
  t.equal(r.states.get(x.name), 'done', `${x.name} finished`);
  t.equal(
    stateDiff(r.finals.get(x.name), without.finals.get(x.name)),
    '',
    `${x.name} bitwise equal to the run without b`,
  );
}
