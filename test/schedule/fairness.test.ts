// Admission order: higher priority first, then the adapter furthest behind in its steps, then
// round-robin; an adapter behind the leader may send its whole step at once, the others keep the
// pipeline's share.
import t from 'tap';
import { admissionOrder, inFlightLimit, progress } from '../../lib/schedule/fairness.js';

t.test('progress counts the micro-batches of the current step already sent', async (t) => {
  t.equal(progress(0, 0, 2, 10), 0);
  t.equal(progress(3, 1, 2, 10), 0.35);
  t.equal(progress(3, 5, 2, 10), 0.4, 'never more than the whole step');
  t.equal(progress(4, 0, 0, 10), 0.4, 'before its first micro-batch the step count alone');
  t.equal(progress(0, 0, 1, 0), 1, 'no steps to do: done');
});

t.test('in-flight limit: the whole step for an adapter behind, the base share otherwise', async (t) => {
  t.equal(inFlightLimit(0.2, 0.3, 1, 4), 4);
  t.equal(inFlightLimit(0.3, 0.3, 1, 4), 1, 'the leader keeps the base');
  t.equal(inFlightLimit(0.2, 0.3, 3, 2), 3, 'never below the base');
});

t.test('order: priority, then furthest behind, then round-robin from rr', async (t) => {
  const c = (id: number, priority: number, progress: number) => ({ id, priority, progress });
  const ids = (xs: Array<ReturnType<typeof c>>, rr: number) => admissionOrder(xs, (x) => x, rr).map((x) => x.id);
  t.same(ids([c(1, 0, 0.5), c(2, 0, 0.2), c(3, 0, 0.4)], 1), [2, 3, 1]);
  t.same(ids([c(1, 0, 0.5), c(2, 1, 0.9), c(3, 0, 0.4)], 1), [2, 3, 1], 'priority before progress');
  t.same(ids([c(1, 0, 0.5), c(2, 0, 0.5), c(3, 0, 0.5)], 2), [2, 3, 1], 'level: round-robin from rr');
  t.same(ids([c(1, 0, 0.5), c(2, 0, 0.5), c(3, 0, 0.5)], 4), [1, 2, 3], 'rr past the last id wraps');
});
