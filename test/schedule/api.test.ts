// The programmatic API over two stage actors: submit while another job runs, the event
// stream, pause/resume (nothing admitted while paused), cancel (adapter off every stage, the
// other job unaffected), close.
import t from 'tap';
import fs from 'node:fs';
import { Supervisor, type Job } from '../../actors/index.js';
import type { JobEvent } from '../../actors/protocol.js';
import { adapter } from '../actors/util.js';
import { tinyModelWithLayers } from '../support/models.js';
import type { StageWorkers } from '../../actors/stage-workers.js';

const model = await tinyModelWithLayers(2);
t.teardown(() => fs.rmSync(model, { recursive: true, force: true }));

/** Collects a job's event stream in the background (for await over job.events()). */
function collect(job: Job) {
  const evs: JobEvent[] = [];
  const done = (async () => {
    for await (const ev of job.events()) evs.push(ev);
  })();
  return { evs, done, steps: () => evs.filter((e) => e.type === 'step').length };
}

async function until(cond: () => boolean, what: string, ms = 60_000) {
  const t0 = Date.now();
  while (!cond()) {
    if (Date.now() - t0 > ms) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 5));
  }
}

t.test('submit, events, pause/resume, cancel, close', async (t) => {
  const sup = await Supervisor.start({ model, devices: ['cpu:0', 'cpu:1'], threads: 1 });
  const small = { batch_size: 2, micro_batch_size: 1, seq_len: 128, skip_bad_records: true, max_grad_norm: undefined };
  const long = sup.submit(adapter('long', 'arithmetic', { ...small, max_steps: 30 }));
  const L = collect(long);
  await until(() => L.steps() >= 1, 'long: first step');

  // a second job joins while the first runs
  const late = sup.submit(adapter('late', 'capitals', { ...small, max_steps: 6 }));
  const Lt = collect(late);
  await until(() => Lt.steps() >= 1, 'late: first step');
  t.equal(long.state, 'running', 'late took its first step while long still runs');
  t.ok(long.step < long.totalSteps, `long at step ${long.step} of ${long.totalSteps}`);

  // pause: nothing of late is admitted until resume
  await late.pause();
  t.equal(late.state, 'paused');
  const recsOf = (id: number) => sup.pipeline.schedule().filter((r) => r.adapters.includes(id)).length;
  const [stepsAt, recsAt, longAt] = [Lt.steps(), recsOf(late.id), long.step];
  await until(() => long.step >= longAt + 3, 'long: 3 more steps while late is paused');
  t.equal(Lt.steps(), stepsAt, 'no step of late while paused');
  t.equal(recsOf(late.id), recsAt, 'no schedule record (F/B/S) of late while paused');
  t.equal(late.inflight, 0, 'nothing of late in flight');
  await late.resume();
  await late.done;
  t.equal(late.state, 'done', 'late finished after resume');
  t.equal(late.step, 6);
  await Lt.done;
  const lateSeq = Lt.evs.map((e) => (e.type === 'state' ? e.state : e.type));
  // order: queued, loading, running, steps (with a pause/running pair somewhere), done event, done state
  t.same(lateSeq.slice(0, 3), ['queued', 'loading', 'running'], 'late: queued → loading → running first');
  t.same(lateSeq.slice(-2), ['done', 'done'], 'late: done event, then state done, last');
  t.equal(lateSeq.filter((x) => x === 'step').length, 6, 'late: 6 step events');
  const pi = lateSeq.indexOf('paused');
  // pause() lets what is in flight finish, so the step those micro-batches complete may come in between
  t.ok(pi > 3 && lateSeq.slice(pi + 1).find((x) => x !== 'step') === 'running', 'late: paused, then running again');
  const stepNums = Lt.evs.flatMap((e) => (e.type === 'step' ? [e.step] : []));
  t.same(stepNums, [1, 2, 3, 4, 5, 6], 'late: steps 1..6 once each');

  // cancel: the adapter leaves every stage, the other job goes on
  const doomed = sup.submit(adapter('doomed', 'sentiment', { ...small, seq_len: 256, max_steps: 20 }));
  const D = collect(doomed);
  await until(() => D.steps() >= 1 || doomed.terminal(), 'doomed: first step');
  t.equal(doomed.error, undefined, 'doomed runs');
  await doomed.cancel();
  t.equal(doomed.state, 'cancelled');
  await D.done;
  t.equal(
    D.evs.at(-1)?.type === 'state' && (D.evs.at(-1) as { state: string }).state,
    'cancelled',
    'doomed: last event is state cancelled',
  );
  await t.rejects(sup.pipeline.exportAdapter(doomed.id), 'exportAdapter of the cancelled adapter fails');
  // every stage on its own: none of them holds it any more
  // the stages' management API, asked one stage at a time (private to the pipeline)
  const workers = (sup.pipeline as unknown as { workers: StageWorkers }).workers;
  for (const s of [0, 1])
    await t.rejects(workers.call(s, 'exportAdapter', [doomed.id]), `stage ${s} no longer has the adapter`);
  const doomedRecs = recsOf(doomed.id);
  const longNow = long.step;
  await until(() => long.step >= longNow + 2, 'long: 2 more steps after the cancel');
  t.equal(recsOf(doomed.id), doomedRecs, 'no work of the cancelled job after cancel');

  await long.done;
  await L.done;
  t.equal(long.state, 'done');
  const longSteps = L.evs.flatMap((e) => (e.type === 'step' ? [e.step] : []));
  t.same(
    longSteps,
    Array.from({ length: 30 }, (_, i) => i + 1),
    "long: every step once, in order, through the other jobs' join/pause/cancel",
  );
  t.same(
    L.evs.map((e) => (e.type === 'state' ? e.state : e.type)).filter((x) => x !== 'step'),
    ['queued', 'loading', 'running', 'done', 'done'],
    'long: state events in order',
  );
  await sup.close();
  t.equal((sup.pipeline as unknown as { slotsInUse(): number }).slotsInUse(), 0, 'no slot left after close');
});
