// The supervisor's scheduling on a fake pipeline (test/support/fake-pipeline.ts: no model, every
// byte an agreed number, forward/backward/step at once): micro-batches are admitted by memory
// (what fits runs, what does not waits, what can never fit fails), adapters are placed first
// come first served within a priority (a job that must wait holds up those behind it), higher
// priorities go first and preempt lower ones by parking them at a step boundary, and a parked
// job comes back with exactly the state and data position it left with.
import t, { type Test } from 'tap';
import { Supervisor, type SchedulerOptions } from '../../actors/index.js';
import type { JobEvent } from '../../actors/protocol.js';
import type { AdapterConfigInput } from '../../lib/config.js';
import { FakePipeline, fakeHooks, type FakePipelineOptions } from '../support/fake-pipeline.js';

// one adapter of r = 4 takes 4000 bytes per stage; one micro-batch (100 tokens) holds 1000
const ADAPTER = 4000;
const MB = 1000;

function setup(
  o: FakePipelineOptions,
  sched: Partial<SchedulerOptions> = {},
  onEvent?: (ev: JobEvent, sup: Supervisor) => void,
) {
  const pipe = new FakePipeline(o);
  const hooks = fakeHooks();
  const log: JobEvent[] = [];
  const sup: Supervisor = new Supervisor(
    pipe,
    { ...hooks, onEvent: (ev) => (log.push(ev), onEvent?.(ev, sup)) },
    {
      batchlora: false,
      inflight: 8,
      inflightPerAdapter: 8,
      ...sched,
    },
  );
  return { pipe, sup, finals: hooks.finals, log };
}

/** max_steps steps of 4 micro-batches of 100 tokens; r 4 unless given. */
const job = (name: string, o: Partial<AdapterConfigInput> = {}): AdapterConfigInput => ({
  name,
  data: 'unused.jsonl',
  lora: { r: 4 },
  batch_size: 4,
  micro_batch_size: 1,
  seq_len: 100,
  max_steps: 2,
  ...o,
});

/** Submits the jobs, lets the scheduler run until every one has finished, and closes it. */
async function runToEnd(sup: Supervisor, jobs: AdapterConfigInput[]) {
  const handles = jobs.map((j) => sup.submit(j));
  await sup.drain();
  await sup.close();
  return handles;
}

/** Every job finished (state 'done'). */
const assertAllDone = (t: Test, jobs: Array<{ state: string }>) =>
  t.same(
    jobs.map((j) => j.state),
    jobs.map(() => 'done'),
    'every job done',
  );

/** The adapter ids in the order they were put on the stages. */
const adds = (p: FakePipeline) => p.events.flatMap((e) => (e.op === 'add' ? [e.adapter] : []));
const states = (log: JobEvent[], name: string) =>
  log.flatMap((e) => (e.type === 'state' && e.adapter === name ? [e.state] : []));

t.test('admission by memory: as many micro-batches as fit are in flight, never more', async (t) => {
  for (const [room, want] of [
    [2, 2],
    [3, 3],
    [10, 4],
  ] as const) {
    const { pipe, sup } = setup({ budgets: [ADAPTER + room * MB + MB / 2] });
    const [a] = await runToEnd(sup, [job('a')]);
    t.equal(a.state, 'done', a.error ?? 'done');
    t.equal(a.step, 2);
    // 4 micro-batches per step, 8 in flight allowed: memory is the limit until it is not
    t.equal(pipe.peakInflight, want, `room for ${room}: ${want} in flight at most`);
    t.same(pipe.overruns, [], 'no stage went over its budget');
    t.equal(pipe.trained().length, 8, 'every micro-batch ran once');
  }
});

t.test('admission by memory on every stage: the tightest stage decides', async (t) => {
  const { pipe, sup } = setup({ budgets: [ADAPTER + 10 * MB, ADAPTER + 1 * MB, ADAPTER + 10 * MB] });
  const [a] = await runToEnd(sup, [job('a')]);
  t.equal(a.state, 'done', a.error ?? 'done');
  t.equal(pipe.peakInflight, 1, 'stage 1 has room for one micro-batch: one at a time');
  t.same(pipe.overruns, []);
});

t.test('transient bytes count once per stage, held bytes once per micro-batch', async (t) => {
  // held 500 + transient 500 per micro-batch: room for 3 held + one call, not for 3 full copies
  const { pipe, sup } = setup({ budgets: [ADAPTER + 3 * 500 + 500], heldPerToken: 5, transientPerToken: 5 });
  await runToEnd(sup, [job('a')]);
  t.equal(pipe.peakInflight, 3);
  t.same(pipe.overruns, []);
});

t.test('a micro-batch that can never fit fails its job, with the numbers', async (t) => {
  const { pipe, sup } = setup({ budgets: [ADAPTER + MB / 2] });
  const [big] = await runToEnd(sup, [job('big')]);
  t.equal(big.state, 'failed');
  t.match(big.error, /a micro-batch of 100 tokens needs 1000 bytes of activations on cpu:0, only 500 are free/);
  t.same(pipe.trained(), [], 'nothing ran');
  t.equal(pipe.resident.size, 0, 'its adapter left the stages');
});

t.test('an adapter that can never fit fails at once, naming the device and the bytes', async (t) => {
  const { sup } = setup({ budgets: [ADAPTER + MB] });
  const [huge, a] = await runToEnd(sup, [job('huge', { lora: { r: 64 } }), job('a')]);
  t.equal(huge.state, 'failed');
  t.match(huge.error, /adapter 'huge' needs 64000 bytes on cpu:0, only 5000 are there besides the model/);
  t.equal(a.state, 'done', 'the job behind it is not held up by a job that can never run');
});

t.test('placement: what fits goes on the stages, what does not waits for room (FCFS)', async (t) => {
  // room for two adapters and their micro-batches, not three
  const { pipe, sup, log } = setup({ budgets: [2 * ADAPTER + 2 * MB] }, { inflightPerAdapter: 1 });
  const jobs = await runToEnd(
    sup,
    ['a', 'b', 'c'].map((n) => job(n)),
  );
  assertAllDone(t, jobs);
  t.same(
    adds(pipe),
    jobs.map((j) => j.id),
    'put on the stages in the order submitted',
  );
  const firstRemove = pipe.events.findIndex((e) => e.op === 'remove');
  const addC = pipe.events.findIndex((e) => e.op === 'add' && e.adapter === jobs[2]!.id);
  t.ok(firstRemove >= 0 && addC > firstRemove, 'c is placed only after a finished job left the stages');
  t.ok(
    pipe
      .trained()
      .slice(0, 2)
      .every((ad) => ad[0] !== jobs[2]!.id),
    'c trains nothing before then',
  );
  t.same(states(log, 'c'), ['queued', 'loading', 'running', 'done']);
  t.same(pipe.overruns, []);
});

t.test('FCFS: a job that must wait holds up the smaller jobs behind it', async (t) => {
  const { pipe, sup } = setup({ budgets: [12 * 1000 + MB] }, { inflightPerAdapter: 1 });
  const [a, big, small] = await runToEnd(sup, [
    job('a', { max_steps: 3 }), // 4000
    job('big', { lora: { r: 10 } }), // 10000: only once a is gone
    job('small', { lora: { r: 2 } }), // 2000 would fit next to a, but comes after big
  ]);
  assertAllDone(t, [a, big, small]);
  t.same(adds(pipe), [a.id, big.id, small.id]);
  const removeA = pipe.events.findIndex((e) => e.op === 'remove' && e.adapter === a.id);
  const addSmall = pipe.events.findIndex((e) => e.op === 'add' && e.adapter === small.id);
  t.ok(addSmall > removeA, 'small waited for big, which waited for a');
  t.same(pipe.overruns, []);
});

t.test('priority: the highest waiting job is placed first, whatever the order of submission', async (t) => {
  const { pipe, sup } = setup({ budgets: [ADAPTER + MB] }, { inflightPerAdapter: 1 });
  const [first, low, mid, high] = await runToEnd(sup, [
    job('first', { priority: 10 }),
    job('low'),
    job('mid', { priority: 3 }),
    job('high', { priority: 5 }),
  ]);
  t.same(
    adds(pipe),
    [first.id, high.id, mid.id, low.id],
    'first (10, running, never preempted by lower ones), then 5, 3, 0',
  );
  t.equal(pipe.events.filter((e) => e.op === 'add').length, 4, 'each placed once: no job was parked');
  assertAllDone(t, [first, low, mid, high]);
});

t.test(
  'preemption: a higher-priority job parks a running one at its step boundary; it comes back unchanged',
  async (t) => {
    let high: ReturnType<Supervisor['submit']> | undefined;
    const { pipe, sup, log, finals } = setup({ budgets: [ADAPTER + MB] }, { inflightPerAdapter: 1 }, (ev, sup) => {
      if (ev.type === 'step' && ev.adapter === 'low' && ev.step === 2 && !high)
        high = sup.submit(job('high', { priority: 5, max_steps: 2 }));
    });
    const [low] = await runToEnd(sup, [job('low', { max_steps: 5 })]);
    t.ok(high);
    t.same([low.state, high!.state], ['done', 'done'], low.error ?? high!.error ?? 'both done');
    t.same(states(log, 'low'), ['queued', 'loading', 'running', 'parked', 'running', 'done']);
    t.same(states(log, 'high'), ['queued', 'loading', 'running', 'done']);
    const ops = pipe.events
      .filter((e) => e.op !== 'train' && e.op !== 'step')
      .map((e) => `${e.op} ${e.adapter === low.id ? 'low' : 'high'}`);
    const parkedAt = ops.indexOf('remove low');
    t.ok(parkedAt > 0, 'low left the stages');
    t.equal(ops[parkedAt - 1], 'export low', 'its state was exported first');
    t.same(ops.slice(parkedAt + 1, parkedAt + 2), ['add high'], 'then high went on');
    t.ok(ops.indexOf('add low', parkedAt) > ops.indexOf('remove high'), 'low came back after high finished');
    const exported = pipe.events[pipe.events.findIndex((e) => e.op === 'remove' && e.adapter === low.id) - 1]!;
    const readded = pipe.events.filter((e) => e.op === 'add' && e.adapter === low.id)[1]!;
    t.equal(
      (readded as { version: number }).version,
      (exported as { version: number }).version,
      'with the optimizer version it left with',
    );
    t.ok((exported as { version: number }).version >= 2, 'parked at a step boundary after step 2 or later');
    // each micro-batch adds its rows to params[0]: 5 steps × 4 micro-batches × 100 rows, none lost or repeated over the park
    t.equal(finals.get('low')!.params[0], 5 * 4 * 100);
    t.equal(finals.get('low')!.version, 5);
    t.equal(finals.get('high')!.params[0], 2 * 4 * 100);
    t.same(pipe.overruns, []);
  },
);

t.test("an adapter's bytes are taken before the stages allocate it, not after they answer", async (t) => {
  // room for two adapters and one micro-batch. high parks low2 and goes on in its place: the
  // stages allocate high while the add is on its way back, and low1 runs on meanwhile, so the
  // bytes low2 gave back must already count as high's (else low1 puts a second micro-batch in)
  let high: ReturnType<Supervisor['submit']> | undefined;
  const { pipe, sup, log } = setup(
    { budgets: [2 * ADAPTER + MB], addTurns: 3 },
    { inflightPerAdapter: 2 },
    (ev, sup) => {
      if (ev.type === 'step' && ev.adapter === 'low1' && ev.step === 1 && !high)
        high = sup.submit(job('high', { priority: 5, max_steps: 2 }));
    },
  );
  const [low1, low2] = await runToEnd(sup, [job('low1', { max_steps: 4 }), job('low2', { max_steps: 4 })]);
  t.ok(high, 'high was submitted');
  assertAllDone(t, [low1!, low2!, high!]);
  t.ok(states(log, 'low2').includes('parked'), 'low2 was parked for high');
  t.same(pipe.overruns, [], 'no stage went over its budget');
});

t.test('the pipeline fails for good while a job is parked: its parked state is its checkpoint', async (t) => {
  let high: ReturnType<Supervisor['submit']> | undefined;
  let highTrained = 0;
  const pipe = new FakePipeline({
    budgets: [ADAPTER + MB],
    // high's second micro-batch breaks the pipeline: low is parked off the stages by then
    failsFor: (mb): boolean => mb.segments.some((s) => s.adapter === high?.id) && ++highTrained === 2,
  });
  const hooks = fakeHooks();
  const log: JobEvent[] = [];
  const sup: Supervisor = new Supervisor(
    pipe,
    {
      ...hooks,
      onEvent: (ev) => {
        log.push(ev);
        if (ev.type === 'step' && ev.adapter === 'low' && ev.step === 2 && !high)
          high = sup.submit(job('high', { priority: 5, max_steps: 2 }));
      },
    },
    { batchlora: false, inflight: 8, inflightPerAdapter: 1 },
  );
  const low = sup.submit(job('low', { max_steps: 5 }));
  await sup.drain().catch(() => undefined);
  await sup.close().catch(() => undefined);
  t.ok(high, 'high was submitted');
  t.equal(low.state, 'failed', 'low stopped with the pipeline');
  t.same(states(log, 'low').slice(0, 4), ['queued', 'loading', 'running', 'parked'], 'low was parked when it failed');
  t.same(
    log.filter((e: JobEvent) => e.type === 'error' && /could not save/.test(e.message)),
    [],
    'no adapter lost its checkpoint',
  );
  const saved = hooks.checkpoints.find((c) => c.name === 'low');
  t.ok(saved, 'low was checkpointed');
  const exported = pipe.events.filter((e) => e.op === 'export' && e.adapter === low.id).at(-1) as { version: number };
  t.equal(saved!.state.version, exported.version, 'with the state it was parked with');
  t.equal(saved!.state.params[0], exported.version * 4 * 100, 'every row of its steps, none of the aborted ones');
});

t.test('equal priorities do not preempt each other', async (t) => {
  let b: ReturnType<Supervisor['submit']> | undefined;
  const { pipe, sup, log } = setup({ budgets: [ADAPTER + MB] }, { inflightPerAdapter: 1 }, (ev, sup) => {
    if (ev.type === 'step' && ev.adapter === 'a' && ev.step === 1 && !b) b = sup.submit(job('b'));
  });
  const [a] = await runToEnd(sup, [job('a', { max_steps: 3 })]);
  t.same(states(log, 'a'), ['queued', 'loading', 'running', 'done']);
  t.same(adds(pipe), [a.id, b!.id]);
});

t.test('BatchLoRA on one device: the running adapters share each micro-batch', async (t) => {
  const { pipe, sup } = setup(
    { budgets: [3 * ADAPTER + 10 * MB] },
    { batchlora: true, inflight: 2, inflightPerAdapter: 1 },
  );
  const jobs = await runToEnd(
    sup,
    ['a', 'b', 'c'].map((n) => job(n)),
  );
  assertAllDone(t, jobs);
  const widest = Math.max(...pipe.trained().map((ad) => ad.length));
  t.equal(widest, 3, 'a micro-batch holds rows of all three adapters');
  t.equal(
    pipe.trained().reduce((n, ad) => n + ad.length, 0),
    3 * 8,
    "every adapter's 8 micro-batches ran once",
  );
});
