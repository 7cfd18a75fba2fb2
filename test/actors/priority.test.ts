// Priorities with preemption (the mLoRA task scheduler). Device budget: room for two of
// these adapters (plus the activations of the micro-batches in flight) but not three. Two
// priority-0 jobs run; a priority-5 job arrives: the newest low job is parked at its next
// step boundary (weights, AdamW moments and data position to host memory, adapter off every
// stage), the high job runs, the low job comes back afterwards and ends with exactly the
// weights of an uninterrupted run of it (bitwise: see equivalence.test.ts for why).
import t from 'tap';
import fs from 'node:fs';
import { Supervisor } from '../../actors/index.js';
import type { JobEvent } from '../../actors/protocol.js';
import { adapter, captureFinals, faultLog, runJobs } from './util.js';
import { stateBitwiseEqual, stateMaxDiff } from '../support/compare.js';
import { tinyModelWithLayers } from '../support/models.js';

const model = await tinyModelWithLayers(2);
process.on('exit', () => fs.rmSync(model, { recursive: true, force: true }));

const devices = ['cpu:0', 'cpu:1'];
const big = {
  r: 1024,
  alpha: 16,
  dropout: 0.05,
  targets: ['q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj'] as const,
};
const small = { batch_size: 2, micro_batch_size: 1, seq_len: 128, skip_bad_records: true }; // micro-batches of at most 128 tokens
const low1 = adapter('low1', 'arithmetic', { ...small, max_steps: 6, lora: { ...big, targets: [...big.targets] } });
const low2 = adapter('low2', 'capitals', {
  ...small,
  max_steps: 6,
  seed: 21,
  lora: { ...big, targets: [...big.targets] },
});
const high = adapter('high', 'sentiment', {
  ...small,
  max_steps: 3,
  priority: 5,
  lora: { ...big, targets: [...big.targets] },
});

// measure: what the model takes on each stage, what one adapter and one micro-batch take
const probe = await Supervisor.start({ model, devices, threads: 1, memory: '1GiB' });
const rest = await probe.pipeline.memory();
const A = probe.pipeline.adapterBytes({
  r: 1024,
  alpha: 16,
  dropout: 0.05,
  targets: [...big.targets],
  useRslora: false,
  seed: 0,
});
const act = probe.pipeline.activationBytes(128, [
  { rows: 128, spec: { r: 1024, alpha: 16, dropout: 0.05, targets: [...big.targets], useRslora: false, seed: 0 } },
]);
await probe.close();
// no slack: activationBytes() is exactly what a micro-batch holds on each stage (a stage that
// ran out of memory here would mean the accounting is wrong)
const budget = Math.max(...rest.map((m, s) => m.used + 2 * A[s]! + act[s]!));
t.ok(
  rest.every((m, s) => budget < m.used + 3 * A[s]!),
  `budget ${budget} fits two adapters (${A.join('/')} B each) and a micro-batch (${act.join('/')} B) but not three`,
);

const solo = await runJobs({ model, devices, threads: 1 }, [low2]); // low2 alone, never parked

await t.test('a priority-5 job parks a priority-0 job and the parked job resumes with nothing lost', async (t) => {
  const events: JobEvent[] = [];
  const { faults, onFault } = faultLog();
  const sup = await Supervisor.start({
    model,
    devices,
    threads: 1,
    memory: budget,
    onEvent: (ev) => events.push(ev),
    onFault,
  });
  const finals = captureFinals(sup);
  const [j1, j2] = [sup.submit(low1), sup.submit(low2)];
  for await (const ev of j1.events()) if (ev.type === 'step') break; // both low jobs are running
  const h = sup.submit(high);
  await sup.drain();
  await sup.close();
  const seq = events
    .filter((e) => e.type === 'state' || e.type === 'done')
    .map((e) => `${e.adapter}:${e.type === 'state' ? e.state : 'done'}`);
  t.same(faults, [], 'no stage fault (no out of memory): the accounting is exact');
  t.same(
    [j1.state, j2.state, h.state],
    ['done', 'done', 'done'],
    `all three jobs finished ${[j1, j2, h].map((j) => j.error ?? '').join(' ')}`,
  );
  t.notOk(seq.includes('low1:parked'), 'low1 (first come) was not parked');
  const parked = seq.indexOf('low2:parked');
  const back = seq.indexOf('low2:running', parked);
  t.ok(parked >= 0, 'low2 (newest of the lowest priority) was parked');
  t.ok(parked < seq.indexOf('high:running'), 'the high job started after low2 left the stages');
  t.ok(seq.indexOf('high:done') < back, 'low2 came back once the high job was done');
  const steps2 = events
    .filter((e) => e.type === 'step' && e.adapter === 'low2')
    .map((e) => (e as { step: number }).step);
  t.same(steps2, [1, 2, 3, 4, 5, 6], 'low2 took every step once');
  const got = finals.get('low2')!;
  const want = solo.states.get('low2')!;
  t.ok(
    stateBitwiseEqual(got, want),
    `low2 ends with the weights and moments of an uninterrupted run (max |diff| ${stateMaxDiff(got, want)})`,
  );
});

await t.test('equal priorities: first come, first served', async (t) => {
  const events: JobEvent[] = [];
  const sup = await Supervisor.start({ model, devices, threads: 1, memory: budget, onEvent: (ev) => events.push(ev) });
  const third = adapter('third', 'sentiment', { ...small, max_steps: 2, lora: { ...big, targets: [...big.targets] } });
  const jobs = [sup.submit({ ...low1, max_steps: 2 }), sup.submit({ ...low2, max_steps: 2 }), sup.submit(third)];
  await sup.drain();
  await sup.close();
  t.same(
    jobs.map((j) => j.state),
    ['done', 'done', 'done'],
    `all done ${jobs.map((j) => j.error ?? '').join(' ')}`,
  );
  const seq = events.filter((e) => e.type === 'state').map((e) => `${e.adapter}:${(e as { state: string }).state}`);
  t.notOk(
    seq.some((s) => s.endsWith(':parked')),
    'nobody was parked',
  );
  t.ok(
    seq.indexOf('third:running') > Math.min(seq.indexOf('low1:done'), seq.indexOf('low2:done')),
    'the third job waited for room',
  );
});
