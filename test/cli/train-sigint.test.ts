// Ctrl-C with a real signal to a real `mlora train` child process: SIGINT stops admitting,
// finishes the in-flight micro-batches, writes a complete checkpoint of every adapter and
// exits 130; `--resume` then ends with bitwise the weights of an uninterrupted run. A second
// SIGINT ends the process at once (by the signal: 130 in a shell) and leaves every complete
// checkpoint usable.
import t from 'tap';
import fs from 'node:fs';
import path from 'node:path';
import { latestCheckpoint, listCheckpoints, loadCheckpoint } from '../../lib/io/checkpoint.js';
import { openModelDir } from '../../lib/io/hf-model.js';
import { parseAdapterConfig } from '../../lib/config.js';
import { loraSpec } from '../../actors/scheduler/prepare.js';
import { mlora, readMetrics, sameWeights, smallConfig, start, writeJson } from './util.js';
import { tinyModelIn } from '../support/models.js';

const NAMES = ['capitals', 'arithmetic'];
const STEPS = 8;
const DIR = t.testdir();
let model = '';
const full = path.join(DIR, 'full');

t.before(async () => {
  model = await tinyModelIn(path.join(DIR, 'model'));
  // The uninterrupted reference. save_every larger than the run: in the interrupted run the only
  // checkpoints are the ones SIGINT writes (the weights do not depend on save_every).
  const a = mlora([
    'train',
    writeJson(path.join(DIR, 'full.json'), smallConfig(model, full, { steps: STEPS, saveEvery: 100 })),
  ]);
  if (a.code !== 0) throw new Error(`uninterrupted run: ${a.out}\n${a.err}`);
});

t.test('SIGINT checkpoints every adapter and exits 130; --resume ends where an uninterrupted run does', async (t) => {
  const dir = t.testdir();
  const out = path.join(dir, 'int');
  const cfg = writeJson(path.join(dir, 'int.json'), smallConfig(model, out, { steps: STEPS, saveEvery: 100 }));
  // every adapter pauses once capitals has taken step 3 (the run cannot end before the signal
  // comes, however fast or loaded the machine); the signal then comes from outside, for real
  const run = start(['train', cfg, '--fault', 'pause:adapter=capitals,step=3']);
  await run.waitFor(/\] paused/, 2);
  run.child.kill('SIGINT');
  const r = await run.exited;
  t.equal(r.code, 130, `exit code 130 after SIGINT\n${r.out}\n${r.err}`);
  t.match(r.out, /SIGINT: stopping; finishing in-flight micro-batches and checkpointing every adapter/);
  const stopped: Record<string, number> = {};
  for (const n of NAMES) {
    const c = latestCheckpoint(path.join(out, n));
    t.ok(c, `${n}: a complete checkpoint`);
    if (!c) continue;
    t.same(
      listCheckpoints(path.join(out, n)).filter((x) => !x.complete),
      [],
      `${n}: no partial checkpoint`,
    );
    t.match(r.out, new RegExp(`\\[${n}\\] checkpoint at step ${c.step}: `));
    t.ok(c.step < STEPS, `${n}: interrupted at step ${c.step} of ${STEPS}`);
    stopped[n] = c.step;
    t.notOk(
      fs.existsSync(path.join(out, n, 'adapter_model.safetensors')),
      `${n}: no final adapter written for an unfinished run`,
    );
    for (const f of [
      'adapter_config.json',
      'adapter_model.safetensors',
      'optimizer.safetensors',
      'state.msgpack',
      'manifest.json',
    ]) {
      t.ok(fs.existsSync(path.join(c.dir, f)), `${n}: ${path.basename(c.dir)}/${f}`);
    }
  }
  t.match(r.out, /adapter +state +steps/, 'the summary table is printed on the way out');

  const b = mlora(['train', cfg, '--resume']);
  t.equal(b.code, 0, `resumed run: ${b.err}`);
  const steps = readMetrics(out).filter((x) => x.type === 'step');
  for (const n of NAMES) {
    const mine = steps.filter((x) => x.adapter === n).map((x) => x.step as number);
    t.same(
      mine.slice(-(STEPS - stopped[n]!)),
      Array.from({ length: STEPS - stopped[n]! }, (_, i) => stopped[n]! + 1 + i),
      `${n}: resumed at step ${stopped[n]! + 1}`,
    );
    sameWeights(t, path.join(full, n, 'adapter_model.safetensors'), path.join(out, n, 'adapter_model.safetensors'), n);
  }
});

t.test('a second SIGINT exits at once; what was written stays usable', async (t) => {
  const dir = t.testdir();
  const out = path.join(dir, 'out');
  const cfgObj = smallConfig(model, out, { steps: STEPS, saveEvery: 2 });
  const cfg = writeJson(path.join(dir, 'c.json'), cfgObj);
  const run = start(['train', cfg]);
  await run.waitFor(/\] checkpoint \S+checkpoint-2/, 2);
  run.child.kill('SIGINT');
  await run.waitFor(/SIGINT: stopping/);
  run.child.kill('SIGINT');
  const r = await run.exited;
  // It dies of the signal itself (a shell reports 130), without running any teardown.
  t.same([r.code, r.signal], [null, 'SIGINT'], `ended by SIGINT, no crash\n${r.out}\n${r.err}`);
  t.notMatch(r.err, /terminate called|Napi::Error|Abort/, 'no native abort on the way out');
  t.match(r.out, /SIGINT again: exiting now/);
  for (const n of NAMES) {
    const all = listCheckpoints(path.join(out, n));
    const c = latestCheckpoint(path.join(out, n));
    t.ok(
      c && c.step >= 2,
      `${n}: the newest complete checkpoint is step ${c?.step} (${all.map((x) => `${x.step}${x.complete ? '' : ' partial'}`).join(', ')})`,
    );
    // Every checkpoint marked complete loads (a partial one is only ever unmarked, never half-read).
    const spec = loraSpec(parseAdapterConfig(cfgObj.adapters.find((a) => a.name === n)));
    for (const x of all.filter((x) => x.complete)) {
      t.doesNotThrow(
        () => loadCheckpoint(x.dir, openModelDir(model).config, spec),
        `${n}: ${path.basename(x.dir)} loads`,
      );
    }
  }
  const b = mlora(['train', cfg, '--resume']);
  t.equal(b.code, 0, `resume after a double SIGINT: ${b.err}`);
  for (const n of NAMES)
    sameWeights(
      t,
      path.join(full, n, 'adapter_model.safetensors'),
      path.join(out, n, 'adapter_model.safetensors'),
      `${n} after a double SIGINT and --resume`,
    );
});
