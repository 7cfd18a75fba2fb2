// The order a stage actor takes its messages in (actors/mailbox.ts): control first, then a
// head share, then Forward before Backward except on the last stage; Backwards among
// themselves first in, first out; a Forward whose optimizer steps are not there waits.
import t from 'tap';
import { takeNext, type Lanes } from '../../actors/mailbox.js';

type M = { type: string; id: string };
const m = (type: string, id: string): M => ({ type, id });

/** Takes every message the lanes give, in order (`blocked`: Forwards that are not ready). */
function drain(lanes: Lanes<M, M, M>, last: boolean, blocked = new Set<string>()): string[] {
  const out: string[] = [];
  for (
    let x = takeNext(lanes, last, (f) => !blocked.has(f.id));
    x;
    x = takeNext(lanes, last, (f) => !blocked.has(f.id))
  )
    out.push(x.id);
  return out;
}

const lanes = (): Lanes<M, M, M> => ({
  control: [m('step', 'S1')],
  backward: [m('backward', 'B1'), m('head', 'H2'), m('backward', 'B3'), m('head', 'H4')],
  forward: [m('forward', 'F5'), m('forward', 'F6')],
});

t.test('before the last stage: control, head shares, Forwards, then Backwards in arrival order', async (t) => {
  t.same(drain(lanes(), false), ['S1', 'H2', 'H4', 'F5', 'F6', 'B1', 'B3']);
});

t.test('on the last stage: Backward (head answers) before Forward', async (t) => {
  const l: Lanes<M, M, M> = {
    control: [],
    backward: [m('headed', 'A1'), m('headed', 'A2')],
    forward: [m('forward', 'F3')],
  };
  t.same(drain(l, true), ['A1', 'A2', 'F3']);
});

t.test('a Forward waiting for its optimizer step is passed over, not lost', async (t) => {
  const l = lanes();
  t.same(drain(l, false, new Set(['F5'])), ['S1', 'H2', 'H4', 'F6', 'B1', 'B3']);
  t.same(
    l.forward.map((f) => f.id),
    ['F5'],
    'F5 stays queued',
  );
  t.same(drain(l, false), ['F5'], 'and runs once ready');
});
