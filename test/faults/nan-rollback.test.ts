// on_nan: rollback. An adapter whose loss becomes NaN goes back to its last checkpoint with a
// lowered learning rate and finishes; the result equals resuming that checkpoint with the
// lowered learning rate (bitwise: same state, same data position, same dropout masks). The
// other adapters end bitwise equal to the fault-free run. Past max_rollbacks it stops.
import fs from 'node:fs';
import path from 'node:path';
import t from 'tap';
import { parseAdapterConfig, type AdapterConfig } from '../../lib/config.js';
import { readCheckpointMeta } from '../../lib/io/checkpoint.js';
import { adapters, run, stateDiff } from './harness.js';
import { tinyModel } from '../support/models.js';
import { tmpDir } from '../support/files.js';

const model = await tinyModel(0);
const dir = tmpDir(t, 'nan-rollback');
const [a, b0, c] = adapters(dir, ['a', 'b', 'c']);
const with_ = (x: AdapterConfig, extra: Record<string, unknown>) => parseAdapterConfig({ ...x, ...extra }, 'test');
const b = with_(b0!, { save_every: 1, on_nan: 'rollback' });

const base = await run({ model, adapters: [a!, b, c!] });
t.notOk(base.error, `fault-free run: ${base.error?.message ?? 'ok'}`);

t.test('NaN at step 3: back to checkpoint 2 at half the learning rate, then finished', async (t) => {
  const out = tmpDir(t, 'nan-rollback-out');
  const r = await run({ model, adapters: [a!, b, c!], faults: ['nan:adapter=b,step=3'], output: out });
  t.notOk(r.error, `run: ${r.error?.message ?? 'completed'}`);
  t.equal(r.states.get('b'), 'done', 'b finished');
  const rb = r.events.filter((e) => e.type === 'rollback');
  t.equal(rb.length, 1, 'one rollback event');
  t.match(
    rb[0],
    { adapter: 'b', fromStep: 3, toStep: 2, lrScale: 0.5, rollbacks: 1, reason: /loss became NaN at step 3/ },
    'it names the steps, the new scale and the cause',
  );
  const steps = r.events
    .filter((e) => e.type === 'step' && e.adapter === 'b')
    .map((e) => (e.type === 'step' ? `${e.step}@${e.lr}` : ''));
  t.same(
    steps,
    ['1@0.005', '2@0.005', '3@0.0025', '4@0.0025'],
    `b's steps: the NaN step is not reported, steps 3-4 at half the rate (${steps.join(' ')})`,
  );
  for (const x of [a!, c!])
    t.equal(
      stateDiff(r.finals.get(x.name), base.finals.get(x.name)),
      '',
      `${x.name} bitwise equal to the fault-free run`,
    );
  const meta = readCheckpointMeta(path.join(out, 'b', 'checkpoint-3'));
  t.match(
    meta,
    { step: 3, rollbacks: 1, lrScale: 0.5 },
    'the checkpoint after the rollback keeps the lowered rate for --resume',
  );
  const again = await run({ model, adapters: [b], output: out, resume: true });
  const last = again.events.find((e) => e.type === 'step' && e.adapter === 'b');
  t.match(last, { step: 4, lr: 0.0025 }, 'resuming that checkpoint goes on at the lowered rate');
  t.equal(stateDiff(again.finals.get('b'), r.finals.get('b')), '', 'and ends with the same weights, bitwise');

  // the reference: the fault-free run's checkpoint 2, resumed with half the learning rate
  const refOut = tmpDir(t, 'nan-rollback-ref');
  const first = await run({ model, adapters: [b], output: refOut });
  t.notOk(first.error, 'reference: first run');
  fs.rmSync(path.join(refOut, 'b', 'checkpoint-3'), { recursive: true });
  const halved = with_(b, { optimizer: { ...b.optimizer, lr: b.optimizer.lr * 0.5 } });
  const resumed = await run({ model, adapters: [halved], output: refOut, resume: true });
  t.notOk(resumed.error, 'reference: resumed from checkpoint-2 at half the rate');
  t.equal(
    stateDiff(r.finals.get('b'), resumed.finals.get('b')),
    '',
    'b bitwise equal to checkpoint 2 resumed at half the learning rate',
  );
  t.not(
    stateDiff(r.finals.get('b'), base.finals.get('b')),
    '',
    'and different from the fault-free b (the rate changed)',
  );
});

t.test('NaN again after the last allowed rollback: b stops, the others finish', async (t) => {
  const once = with_(b, { on_nan: { action: 'rollback', max_rollbacks: 1, lr_factor: 0.25 } });
  const r = await run({ model, adapters: [a!, once, c!], faults: ['nan:adapter=b,step=3', 'nan:adapter=b,step=3'] });
  t.notOk(r.error, `run: ${r.error?.message ?? 'completed'}`);
  t.equal(r.states.get('b'), 'failed', 'b stopped');
  t.match(
    r.events.find((e) => e.type === 'rollback'),
    { lrScale: 0.25, toStep: 2 },
    'after one rollback at a quarter of the rate',
  );
  const err = r.events.find((e) => e.type === 'error' && e.adapter === 'b');
  t.match(
    err,
    { message: /NaN at step 3 after 1 rollback\(s\) \(on_nan.max_rollbacks 1\): adapter stopped/ },
    'the error says why it stopped',
  );
  for (const x of [a!, c!])
    t.equal(
      stateDiff(r.finals.get(x.name), base.finals.get(x.name)),
      '',
      `${x.name} bitwise equal to the fault-free run`,
    );
});

t.test('without save_every the rollback goes back to the start', async (t) => {
  const noSave = with_(b0!, { on_nan: 'rollback' });
  const r = await run({ model, adapters: [noSave], faults: ['nan:adapter=b,step=2'] });
  t.notOk(r.error, `run: ${r.error?.message ?? 'completed'}`);
  t.equal(r.states.get('b'), 'done', 'b finished');
  t.match(
    r.events.find((e) => e.type === 'rollback'),
    { fromStep: 2, toStep: 0, lrScale: 0.5 },
    'rolled back to step 0',
  );
  const steps = r.events
    .filter((e) => e.type === 'step' && e.adapter === 'b')
    .map((e) => (e.type === 'step' ? e.step : 0));
  t.same(steps, [1, 1, 2, 3, 4], 'step 1 is done again');
});
