// An output folder's earlier results are never written over unasked: training twice into one
// output refuses (before anything trains) and leaves every file of the first run as it was;
// --resume goes on from the checkpoints; --overwrite trains again, with the earlier results set
// aside until the new ones are complete (kept, and named, when an adapter does not finish).
// The same rules hold for Supervisor.submit(). Every run starts metrics.jsonl with a header.
import t from 'tap';
import fs from 'node:fs';
import path from 'node:path';
import { createHash } from 'node:crypto';
import { Supervisor } from '../../actors/index.js';
import { mlora, readMetrics, sameWeights, smallConfig, writeJson } from './util.js';
import { tinyModelIn } from '../support/models.js';
import { DEMO_DATA } from '../support/files.js';

/** Every file under dir (sorted relative paths) with the sha256 of its bytes. */
function snapshot(dir: string): Record<string, string> {
  const out: Record<string, string> = {};
  const walk = (d: string) => {
    for (const e of fs.readdirSync(d, { withFileTypes: true }).sort((a, b) => a.name.localeCompare(b.name))) {
      const p = path.join(d, e.name);
      if (e.isDirectory()) walk(p);
      else out[path.relative(dir, p)] = createHash('sha256').update(fs.readFileSync(p)).digest('hex');
    }
  };
  walk(dir);
  return out;
}

const asideDirs = (out: string) =>
  fs
    .readdirSync(out)
    .filter((n) => n.startsWith('.overwritten-'))
    .sort();

t.test('training twice into one output refuses, then --resume and --overwrite', async (t) => {
  const dir = t.testdir();
  const model = await tinyModelIn(path.join(dir, 'model'));
  const out = path.join(dir, 'out');
  const cfg = writeJson(path.join(dir, 'c.json'), smallConfig(model, out, { steps: 4, saveEvery: 2 }));
  const first = mlora(['train', cfg]);
  t.equal(first.code, 0, first.err);
  const before = snapshot(out);
  t.ok(
    before['capitals/adapter_model.safetensors'] && before['arithmetic/checkpoint-2/manifest.json'],
    'the first run wrote adapters and checkpoints',
  );
  const keep = path.join(dir, 'first');
  fs.cpSync(out, keep, { recursive: true });

  const again = mlora(['train', cfg]);
  t.equal(again.code, 1, 'the second run refuses');
  t.match(again.err, `${out} already holds results of 'capitals', 'arithmetic' from an earlier run`);
  t.match(again.err, `${path.join(out, 'capitals')}/: adapter_model.safetensors, checkpoint-2`);
  t.match(
    again.err,
    /nothing was trained\. Use --resume to go on from their checkpoints, or --overwrite to train them again from the start/,
  );
  t.same(snapshot(out), before, 'every file of the first run is byte-identical (nothing written, nothing added)');
  t.notMatch(again.out, /step 1\//, 'no step ran');

  const both = mlora(['train', cfg, '--resume', '--overwrite']);
  t.equal(both.code, 2);
  t.match(both.err, /--resume and --overwrite exclude each other/);

  // --resume: goes on from checkpoint-2 of each adapter; the earlier records stay, a second header follows
  const res = mlora(['train', cfg, '--resume']);
  t.equal(res.code, 0, res.err);
  const oldMetrics = fs.readFileSync(path.join(keep, 'metrics.jsonl'), 'utf8');
  const newMetrics = fs.readFileSync(path.join(out, 'metrics.jsonl'), 'utf8');
  t.equal(newMetrics.slice(0, oldMetrics.length), oldMetrics, "the first run's metrics records are kept as they were");
  const recs = readMetrics(out);
  const headers = recs.filter((r) => r.type === 'run');
  t.same(
    headers.map((h) => h.mode),
    ['fresh', 'resume'],
    'one run header per run',
  );
  t.not(headers[0]!.run, headers[1]!.run, 'the runs have different ids');
  t.equal(headers[0]!.config_hash, headers[1]!.config_hash, 'same config, same hash');
  const resumed = recs.slice(recs.indexOf(headers[1]!)).filter((r) => r.type === 'step');
  t.same(
    resumed.filter((r) => r.adapter === 'capitals').map((r) => r.step),
    [3, 4],
    '--resume went on from checkpoint-2',
  );
  for (const n of ['capitals', 'arithmetic'])
    sameWeights(
      t,
      path.join(keep, n, 'adapter_model.safetensors'),
      path.join(out, n, 'adapter_model.safetensors'),
      `${n} after --resume`,
    );

  // --overwrite: trains again from step 1; the earlier results are gone once the new ones are complete
  const ow = mlora(['train', cfg, '--overwrite']);
  t.equal(ow.code, 0, ow.err);
  t.match(
    ow.out,
    new RegExp(
      `--overwrite: the earlier results of capitals, arithmetic move to ${out}/\\.overwritten-[0-9TZ]+-[0-9a-f]+/`,
    ),
  );
  t.same(asideDirs(out), [], 'nothing is left set aside after a complete run');
  const owRecs = readMetrics(out);
  t.same(
    owRecs.filter((r) => r.type === 'run').map((r) => r.mode),
    ['overwrite'],
    'metrics.jsonl holds only the new run',
  );
  t.same(
    owRecs.filter((r) => r.type === 'step' && r.adapter === 'capitals').map((r) => r.step),
    [1, 2, 3, 4],
    'trained from the start',
  );
  for (const n of ['capitals', 'arithmetic'])
    sameWeights(
      t,
      path.join(keep, n, 'adapter_model.safetensors'),
      path.join(out, n, 'adapter_model.safetensors'),
      `${n} after --overwrite`,
    );
  const h = owRecs[0]!;
  t.equal(h.type, 'run', 'the header is the first record');
  t.match(h, {
    mlora: String,
    start: String,
    config_file: cfg,
    machine: { cpu: String, cores: Number, gemm_kernel: String },
  });
});

t.test('--overwrite keeps the earlier results of an adapter that does not finish, and says where', async (t) => {
  const dir = t.testdir();
  const model = await tinyModelIn(path.join(dir, 'model'));
  const out = path.join(dir, 'out');
  const cfg = writeJson(path.join(dir, 'c.json'), smallConfig(model, out, { steps: 4, saveEvery: 2 }));
  t.equal(mlora(['train', cfg]).code, 0);
  const before = snapshot(out);
  // arithmetic stops at step 3 (NaN weights), capitals finishes
  const r = mlora(['train', cfg, '--overwrite', '--fault', 'nan:adapter=arithmetic,step=3']);
  t.equal(r.code, 1, 'an adapter failed');
  const [aside] = asideDirs(out);
  t.ok(aside, `the earlier results are kept (${aside})`);
  const where = path.join(out, aside!);
  t.match(r.out, `the earlier results of the adapters that did not finish are kept in ${where}/`);
  const kept = snapshot(where);
  t.notOk(fs.existsSync(path.join(where, 'capitals')), 'capitals finished: its earlier results are removed');
  for (const [f, h] of Object.entries(before)) {
    if (f.startsWith('arithmetic/') || f === 'metrics.jsonl') t.equal(kept[f], h, `${f}: kept byte-identical`);
  }
});

t.test(
  'Supervisor.submit: a finished name is refused in the same supervisor and in its output; overwrite: true',
  async (t) => {
    const dir = t.testdir();
    const model = await tinyModelIn(path.join(dir, 'model'));
    const out = path.join(dir, 'out');
    const adapter = {
      name: 'capitals',
      data: path.join(DEMO_DATA, 'capitals.jsonl'),
      lora: { r: 4, alpha: 8 },
      batch_size: 4,
      seq_len: 128,
      max_steps: 2,
    };
    const sup = await Supervisor.start({ model, devices: ['cpu:0'], threads: 1, output: out, inProcess: true });
    const job = sup.submit(adapter);
    await sup.drain();
    t.equal(job.state, 'done');
    t.throws(() => sup.submit(adapter), {
      message:
        "an adapter named 'capitals' already finished in this supervisor (its results are in the output): submit it under another name",
    });
    await sup.close();
    const before = snapshot(out);

    const again = await Supervisor.start({ model, devices: ['cpu:0'], threads: 1, output: out, inProcess: true });
    t.throws(
      () => again.submit(adapter),
      /already holds results of 'capitals' from an earlier run:[^]*Use resume: true to go on from their checkpoints, or overwrite: true to train them again/,
    );
    t.same([...again.jobs.values()], [], 'the refused job was never created');
    await again.close();
    t.same(snapshot(out), before, 'the refusal wrote nothing');

    await t.rejects(
      Supervisor.start({ model, devices: ['cpu:0'], output: out, resume: true, overwrite: true }),
      /resume and overwrite exclude each other/,
    );
    const ow = await Supervisor.start({
      model,
      devices: ['cpu:0'],
      threads: 1,
      output: out,
      inProcess: true,
      overwrite: true,
      runId: 'test-run',
    });
    t.equal(ow.runId, 'test-run');
    const j2 = ow.submit(adapter);
    t.ok(
      fs.existsSync(path.join(out, '.overwritten-test-run/capitals/adapter_model.safetensors')),
      'the earlier results are set aside while the new run trains',
    );
    await ow.drain();
    await ow.close();
    t.equal(j2.state, 'done');
    t.notOk(fs.existsSync(path.join(out, '.overwritten-test-run')), 'and removed once the new adapter is written');
    t.equal(
      snapshot(out)['capitals/adapter_model.safetensors'],
      before['capitals/adapter_model.safetensors'],
      'the same seeded run wrote the same adapter',
    );
  },
);
