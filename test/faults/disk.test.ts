// An unwritable checkpoint target mid-run. Tests run as root, where chmod does not stop
// writes, so the seam is the target itself: a regular file where checkpoint-3/ must go (the
// write fails like a full or read-only disk would). The adapter stops with a clear error, its
// previous checkpoint stays complete and loadable, the other adapter is untouched.
import t from 'tap';
import fs from 'node:fs';
import path from 'node:path';
import { latestCheckpoint, listCheckpoints, loadCheckpoint } from '../../lib/io/checkpoint.js';
import { loraSpec } from '../../actors/scheduler/prepare.js';
import { openModelDir } from '../../lib/io/hf-model.js';
import { adapters, run, stateDiff } from './harness.js';
import { tinyModel } from '../support/models.js';
import { tmpDir } from '../support/files.js';

const model = await tinyModel(0);
const dir = tmpDir(t, 'disk');
const cfg = adapters(dir, ['a', 'b'], 5, { save_every: 1 });
const base = await run({ model, adapters: cfg });
const out = tmpDir(t, 'disk-out');
fs.mkdirSync(path.join(out, 'a'), { recursive: true });
fs.writeFileSync(path.join(out, 'a', 'checkpoint-3'), 'not a directory');
const r = await run({ model, adapters: cfg, output: out });
t.notOk(r.error, 'the run itself ends');
t.equal(r.states.get('a'), 'failed', 'a stopped');
const err = r.events.find((e) => e.type === 'error' && e.adapter === 'a');
const msg = err && 'message' in err ? err.message : '';
t.match(msg, /could not write the checkpoint at step 3: .*newest complete checkpoint is kept/, `clear error: ${msg}`);
const ck = latestCheckpoint(path.join(out, 'a'));
t.equal(
  ck?.step,
  2,
  `checkpoint 2 is the newest complete one (${JSON.stringify(listCheckpoints(path.join(out, 'a')).map((c) => [c.step, c.complete]))})`,
);
const saved = loadCheckpoint(ck!.dir, openModelDir(model).config, loraSpec(cfg[0]!));
const ref = await run({ model, adapters: [{ ...cfg[0]!, max_steps: 2 }] });
t.equal(stateDiff(saved.state, ref.finals.get('a')), '', 'checkpoint 2 holds exactly the state after 2 steps');
t.equal(r.states.get('b'), 'done', 'b finished');
t.equal(stateDiff(r.finals.get('b'), base.finals.get('b')), '', 'b bitwise equal to the run without the disk fault');
