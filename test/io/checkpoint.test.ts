// Checkpoints on disk: a rewrite of an existing step is atomic as a directory (a failed
// rewrite keeps the old copy, a crash between the swap's two renames is recovered), and temp
// dirs of dead writers are ignored by listing and cleaned by the next save.
// Tests run as root, where chmod does not stop writes, so the failing write is state whose
// optimizer moments are too short: writeSafetensors throws after the adapter files are written.
import t, { type Test } from 'tap';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { spawnSync } from 'node:child_process';
import { latestCheckpoint, listCheckpoints, loadCheckpoint, saveCheckpoint } from '../../lib/io/checkpoint.js';
import { readModelConfig } from '../../lib/io/hf-config.js';
import { sliceLayout, type LoraSpec } from '../../lib/lora/adapter.js';
import type { AdapterState } from '../../lib/lora/state.js';

const config = readModelConfig(path.resolve('test/fixtures/llama-tiny/model'));
const spec: LoraSpec = { r: 2, alpha: 4, dropout: 0, targets: ['q_proj', 'v_proj'], useRslora: false, seed: 1 };
const size = sliceLayout(config, spec, 0, config.numLayers).size;

function adapterDir(t: Test): string {
  const d = fs.mkdtempSync(path.join(os.tmpdir(), 'mlora-ckpt-'));
  t.teardown(() => fs.rmSync(d, { recursive: true, force: true }));
  return path.join(d, 'a');
}

function state(fill: number, opts: { shortMoments?: boolean } = {}): AdapterState {
  return {
    params: new Float32Array(size).fill(fill),
    m: new Float32Array(size).fill(fill / 2),
    v: new Float32Array(opts.shortMoments ? 1 : size).fill(fill / 4),
    version: fill,
  };
}

function save(dir: string, step: number, s: AdapterState, keep?: number): string {
  return saveCheckpoint({
    adapterDir: dir,
    config,
    spec,
    baseModel: 'tiny',
    state: s,
    keep,
    meta: { step, configHash: 'h', loader: { pos: step }, time: '', tokens: 0, loss: 0 },
  });
}

function paramsAt(dir: string): number | undefined {
  return loadCheckpoint(dir, config, spec).state.params[0];
}

const hidden = (dir: string) =>
  fs
    .readdirSync(dir)
    .filter((n) => n.startsWith('.'))
    .sort();

t.test('a save round-trips and leaves no temp dir', async (t) => {
  const a = adapterDir(t);
  const dir = save(a, 2, state(1));
  t.equal(dir, path.join(a, 'checkpoint-2'));
  t.same(
    listCheckpoints(a).map((c) => [c.step, c.complete]),
    [[2, true]],
  );
  const { state: s, meta } = loadCheckpoint(dir, config, spec);
  t.same([s.params[0], s.m[0], s.v[0], s.version, meta.step], [1, 0.5, 0.25, 1, 2]);
  t.same(hidden(a), []);
});

t.test('a rewrite of a step replaces it whole and leaves nothing aside', async (t) => {
  const a = adapterDir(t);
  save(a, 2, state(1));
  save(a, 2, state(3));
  t.equal(paramsAt(latestCheckpoint(a)!.dir), 3);
  t.same(hidden(a), []);
});

t.test('a rewrite that fails midway keeps the old checkpoint complete and loadable', async (t) => {
  const a = adapterDir(t);
  save(a, 2, state(1));
  t.throws(
    () => save(a, 2, state(3, { shortMoments: true })),
    new RegExp(`^${path.join(a, 'checkpoint-2')}: .*optimizer\\.safetensors`),
    'the error names the checkpoint',
  );
  const ck = latestCheckpoint(a);
  t.same([ck?.step, ck?.dir], [2, path.join(a, 'checkpoint-2')], 'checkpoint-2 is still the complete one');
  t.equal(paramsAt(ck!.dir), 1, 'with its old content');
  t.same(hidden(a), [], 'the temp dir was removed');
});

t.test('a target that is not a directory is a clear error', async (t) => {
  const a = adapterDir(t);
  fs.mkdirSync(a);
  fs.writeFileSync(path.join(a, 'checkpoint-3'), 'x');
  t.throws(() => save(a, 3, state(1)), new RegExp(`${path.join(a, 'checkpoint-3')}: exists and is not a directory`));
  t.equal(fs.readFileSync(path.join(a, 'checkpoint-3'), 'utf8'), 'x', 'left untouched');
});

t.test('a crash between the two renames of a rewrite is recovered', async (t) => {
  const a = adapterDir(t);
  save(a, 1, state(5));
  save(a, 2, state(1));
  // the old copy set aside, the new one not yet in place
  fs.renameSync(path.join(a, 'checkpoint-2'), path.join(a, '.checkpoint-2.replaced'));
  let ck = latestCheckpoint(a);
  t.same([ck?.step, ck?.complete], [2, true], 'the copy set aside stands in for checkpoint-2');
  t.equal(paramsAt(ck!.dir), 1);
  t.same(
    listCheckpoints(a).map((c) => c.step),
    [1, 2],
    'listed once',
  );

  // an incomplete checkpoint-2 (say, from an older version's in-place write) does not hide it
  fs.mkdirSync(path.join(a, 'checkpoint-2'));
  ck = latestCheckpoint(a);
  t.equal(ck?.dir, path.join(a, '.checkpoint-2.replaced'));

  // the next save of that step keeps the set-aside copy until the new one is in place, then drops it
  save(a, 2, state(3));
  t.equal(paramsAt(latestCheckpoint(a)!.dir), 3);
  t.same(hidden(a), []);
});

t.test('a crash after the swap, before the old copy was removed: the new copy wins', async (t) => {
  const a = adapterDir(t);
  save(a, 2, state(1));
  fs.cpSync(path.join(a, 'checkpoint-2'), path.join(a, '.checkpoint-2.replaced'), { recursive: true });
  t.same(
    listCheckpoints(a).map((c) => [c.step, c.dir]),
    [[2, path.join(a, 'checkpoint-2')]],
  );
  save(a, 2, state(3));
  t.equal(paramsAt(latestCheckpoint(a)!.dir), 3);
  t.notOk(fs.existsSync(path.join(a, '.checkpoint-2.replaced')), 'the stale copy is gone');
});

t.test(
  'temp dirs of dead writers are ignored by listing and removed by the next save; live ones are kept',
  async (t) => {
    const a = adapterDir(t);
    save(a, 2, state(1));
    const dead = spawnSync(process.execPath, ['-e', '0']).pid!;
    const tmp = (pid: number, hex: string) => path.join(a, `.checkpoint-4.tmp-${pid}-${hex}`);
    // complete copies, so only the name keeps them out of the listing
    for (const d of [tmp(dead, 'aa'), tmp(process.ppid, 'bb'), tmp(process.pid, 'cc'), tmp(process.pid, 'dd')]) {
      fs.cpSync(path.join(a, 'checkpoint-2'), d, { recursive: true });
    }
    const past = new Date(Date.now() - 24 * 3600e3);
    fs.utimesSync(tmp(process.pid, 'cc'), past, past); // our pid, from a process before us
    t.same(
      listCheckpoints(a).map((c) => c.step),
      [2],
      'temp dirs are not checkpoints',
    );
    save(a, 3, state(2));
    // sorted like hidden(): the order of two names depends on the digits of the pids
    const kept = [tmp(process.ppid, 'bb'), tmp(process.pid, 'dd')].map((d) => path.basename(d)).sort();
    t.same(hidden(a), kept, "only the dead writers' temp dirs were removed");
    t.same(
      listCheckpoints(a).map((c) => [c.step, c.complete]),
      [
        [2, true],
        [3, true],
      ],
    );
  },
);

t.test('keep prunes the oldest complete checkpoints, a set-aside copy included', async (t) => {
  const a = adapterDir(t);
  for (const step of [1, 2, 3]) save(a, step, state(step));
  fs.renameSync(path.join(a, 'checkpoint-1'), path.join(a, '.checkpoint-1.replaced'));
  save(a, 4, state(4), 2);
  t.same(
    listCheckpoints(a).map((c) => c.step),
    [3, 4],
  );
  t.same(hidden(a), []);
});
