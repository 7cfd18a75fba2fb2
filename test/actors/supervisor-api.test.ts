// The programmatic API as the README shows it: Supervisor.start from 'mlora/actors',
// submit() with the config file's adapter fields, events, drain, close.
import t from 'tap';
import fs from 'node:fs';
import path from 'node:path';
import { Supervisor, type JobEvent } from '../../actors/index.js';
import { tinyModelIn } from '../support/models.js';
import { DEMO_DATA } from '../support/files.js';

t.test('Supervisor.start, submit, events, drain, close', async (t) => {
  const dir = t.testdir();
  const model = await tinyModelIn(path.join(dir, 'model'));
  const out = path.join(dir, 'out');
  const sup = await Supervisor.start({ model, devices: ['cpu:0', 'cpu:1'], threads: 1, output: out });
  const job = sup.submit({
    name: 'capitals',
    data: path.join(DEMO_DATA, 'capitals.jsonl'),
    lora: { r: 4, alpha: 8 },
    optimizer: { lr: 3e-3 },
    batch_size: 4,
    seq_len: 128,
    max_steps: 3,
  });
  t.throws(() => sup.submit({ name: 'capitals', data: 'x.jsonl' }), /an adapter named 'capitals' is already running/);
  t.throws(() => sup.submit({ name: 'bad', data: 'x.jsonl', lora: { r: 0 } }), {
    message: "submit('bad'): lora.r: must be an integer from 1 to 1024, got 0",
  });
  const events: JobEvent[] = [];
  for await (const ev of job.events()) events.push(ev);
  await sup.drain();
  await sup.close();
  t.equal(job.state, 'done');
  t.equal(job.step, 3);
  t.same(
    events.filter((e) => e.type === 'step').map((e) => (e as { step: number }).step),
    [1, 2, 3],
  );
  t.same(
    events.filter((e) => e.type === 'state').map((e) => (e as { state: string }).state),
    ['queued', 'loading', 'running', 'done'],
  );
  t.ok(fs.existsSync(path.join(out, 'capitals/adapter_model.safetensors')), 'the PEFT adapter is written');
});

t.test("the package's './actors' export resolves to the same module", async (t) => {
  const pkg = JSON.parse(fs.readFileSync('package.json', 'utf8')) as { exports: Record<string, { default: string }> };
  t.equal(pkg.exports['./actors']!.default, './dist/actors/index.js');
  const viaName = (await import('mlora/actors')) as { Supervisor: unknown };
  t.equal(viaName.Supervisor, Supervisor);
});
