// An adapter's next micro-batch goes out while its optimizer step is under way (Pipeline.trainAfterStep,
// actors/scheduler/admission.ts Admission.ahead): on a fake pipeline that offers it, every step
// after the first has a micro-batch sent before the step before it was answered, each runs
// after that step, and the run is the same as one that waits for each step: the same final
// states, step events (loss, tokens) and checkpoints (weights, tokens, data position).
import t, { type Test } from 'tap';
import { Supervisor } from '../../actors/index.js';
import type { JobEvent } from '../../actors/protocol.js';
import type { AdapterConfigInput } from '../../lib/config.js';
import { FakePipeline, fakeHooks, type FakeEvent } from '../support/fake-pipeline.js';

const job = (name: string, o: Partial<AdapterConfigInput> = {}): AdapterConfigInput => ({
  name,
  data: 'unused.jsonl',
  lora: { r: 4 },
  batch_size: 2,
  micro_batch_size: 1,
  seq_len: 50,
  max_steps: 5,
  save_every: 2,
  ...o,
});

async function run(afterStep: boolean, jobs: AdapterConfigInput[], inflight = 4) {
  const pipe = new FakePipeline({ budgets: [1e9, 1e9], afterStep });
  const hooks = fakeHooks();
  const log: JobEvent[] = [];
  const sup = new Supervisor(pipe, { ...hooks, onEvent: (ev) => log.push(ev) }, { batchlora: false, inflight });
  const handles = jobs.map((j) => sup.submit(j));
  await sup.drain();
  await sup.close();
  const steps = log.flatMap((e) => (e.type === 'step' ? [[e.adapter, e.step, e.loss, e.tokens]] : []));
  const byAdapter = (name: string) => steps.filter((s) => s[0] === name);
  return { pipe, hooks, handles, byAdapter, log };
}

/** Each micro-batch sent ahead: the steps it waited for came after it was sent, and it trained after its step. */
function checkOrder(t: Test, events: FakeEvent[]) {
  const aheads = events.flatMap((e, i) => (e.op === 'ahead' ? [{ e, i }] : []));
  for (const { e, i } of aheads) {
    const stepAt = events.findIndex((x) => x.op === 'step' && x.adapter === e.adapter && x.version === e.version);
    const trainAt = events.findIndex((x) => x.op === 'train' && x.mb === e.mb);
    t.ok(stepAt > i && trainAt > stepAt, `micro-batch ${e.mb}: sent, then step ${e.version}, then trained`);
  }
  return aheads.length;
}

const jobs = [job('a'), job('b', { batch_size: 1, max_steps: 7 }), job('c', { batch_size: 3, max_steps: 3 })];

t.test('micro-batches sent ahead of their step: same run as waiting for each step', async (t) => {
  const plain = await run(false, jobs);
  const ahead = await run(true, jobs);
  t.same(
    ahead.handles.map((h) => h.state),
    ['done', 'done', 'done'],
  );
  t.equal(plain.pipe.events.filter((e) => e.op === 'ahead').length, 0, 'a pipeline without trainAfterStep waits');
  const n = checkOrder(t, ahead.pipe.events);
  // every step but the first of each adapter may start with a micro-batch sent ahead (4 + 6 + 2)
  t.ok(n >= 6, `${n} micro-batches went out ahead of their adapter's step`);
  for (const name of ['a', 'b', 'c']) {
    t.same(ahead.byAdapter(name), plain.byAdapter(name), `${name}: the same step events (step, loss, tokens)`);
    t.same(ahead.hooks.finals.get(name), plain.hooks.finals.get(name), `${name}: the same final state`);
  }
  const ck = (r: typeof plain) =>
    r.hooks.checkpoints.map((c) => ({
      name: c.name,
      step: c.step,
      tokens: c.tokens,
      source: c.source,
      p: c.state.params,
    }));
  const sort = (xs: ReturnType<typeof ck>) => [...xs].sort((x, y) => x.name.localeCompare(y.name) || x.step - y.step);
  t.same(sort(ck(ahead)), sort(ck(plain)), 'the same checkpoints: weights, tokens and data position at each step');
});

t.test('the last step sends nothing ahead, and the admission limit holds', async (t) => {
  const r = await run(true, [job('a', { max_steps: 3 }), job('b', { max_steps: 3 })], 2);
  t.same(
    r.handles.map((h) => h.state),
    ['done', 'done'],
  );
  t.ok(r.pipe.peakInflight <= 2, `at most 2 micro-batches in flight (${r.pipe.peakInflight})`);
  // 3 steps of 2 micro-batches each for each adapter: 12 trained, no more
  const trained = r.pipe.events.filter((e) => e.op === 'train').length;
  t.equal(trained, 12, 'every micro-batch trained once');
  checkOrder(t, r.pipe.events);
});
