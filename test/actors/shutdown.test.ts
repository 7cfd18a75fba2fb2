// Shutdown: sup.close() leaves no worker thread, no pending request or micro-batch, no slot
// in use, and ends the event streams; a child process running a short training exits by
// itself (nothing keeps its event loop alive).
import t from 'tap';
import fs from 'node:fs';
import path from 'node:path';
import { spawn } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import { Supervisor } from '../../actors/index.js';
import { ActorPipeline } from '../../actors/runtime.js';
import type { JobEvent } from '../../actors/protocol.js';
import { adapter } from './util.js';
import { tinyModelWithLayers } from '../support/models.js';

const model = await tinyModelWithLayers(2);
t.teardown(() => fs.rmSync(model, { recursive: true, force: true }));

const workers = () => process.getActiveResourcesInfo().filter((r) => /worker|messageport/i.test(r)).length;

t.test('close after a finished job: no thread, no promise, no slot', async (t) => {
  const before = workers();
  const sup = await Supervisor.start({ model, devices: ['cpu:0', 'cpu:1'], threads: 1 });
  const pipeline = sup.pipeline as ActorPipeline;
  t.ok(pipeline instanceof ActorPipeline, 'worker-thread pipeline');
  const threads = pipeline.stageEndpoints();
  const exited = threads.map((w) => new Promise<number>((r) => w.once('exit', r)));
  t.ok(workers() > before, `stage workers are active resources while running (${workers()} vs ${before})`);
  const job = sup.submit(adapter('a', 'arithmetic', { max_steps: 2 }));
  const kinds: string[] = [];
  for await (const ev of job.events()) kinds.push(ev.type);
  t.ok(
    kinds.includes('step') && kinds.at(-1) === 'state' && job.state === 'done',
    'the job streamed steps and ended done',
  );
  await sup.close();
  t.same(await Promise.all(exited), [0, 0], 'every stage worker exited (code 0)');
  t.equal(workers(), before, 'no worker or port left among the active resources');
  t.equal(pipeline.slotsInUse(), 0, 'no shared-memory slot in use');
  t.same(pipeline.inFlight(), { requests: 0, microBatches: 0 }, 'no pending request or call, no micro-batch in flight');
  await sup.close(); // idempotent
});

t.test('close while a job is still training: drains, then ends its event stream', async (t) => {
  const sup = await Supervisor.start({ model, devices: ['cpu:0', 'cpu:1'], threads: 1 });
  const pipeline = sup.pipeline as ActorPipeline;
  const job = sup.submit(adapter('long', 'arithmetic', { max_steps: 50 }));
  const seen: JobEvent[] = [];
  const consumer = (async () => {
    for await (const ev of job.events()) {
      seen.push(ev);
      if (ev.type === 'step' && ev.step === 1) void sup.close();
    }
  })();
  const ended = await Promise.race([
    consumer.then(() => true),
    new Promise((r) => setTimeout(() => r(false), 120_000).unref()),
  ]);
  t.ok(ended, 'the for-await loop over job.events() ends after close()');
  t.ok(job.step >= 1 && job.step < 50, `stopped early, at step ${job.step}`);
  t.equal(pipeline.slotsInUse(), 0, 'no slot in use');
  t.same(pipeline.inFlight(), { requests: 0, microBatches: 0 }, 'nothing pending');
});

t.test('a child process running a short training exits by itself', async (t) => {
  const script = path.join(path.dirname(fileURLToPath(import.meta.url)), 'child-train.js');
  const child = spawn(process.execPath, [script, model], { stdio: ['ignore', 'pipe', 'pipe'], env: process.env });
  let out = '';
  child.stdout.on('data', (d) => (out += d));
  child.stderr.on('data', (d) => (out += d));
  const timer = setTimeout(() => child.kill('SIGKILL'), 120_000);
  const [code, signal] = await new Promise<[number | null, string | null]>((r) =>
    child.on('exit', (c, s) => r([c, s])),
  );
  clearTimeout(timer);
  t.equal(signal, null, 'not killed by the 120 s guard');
  t.equal(code, 0, `exit code 0 (${out.trim()})`);
  t.match(out, /child: 2 steps, state done/);
});
