// The grid printer, utilisation and stageOrder on hand-made records (exact output).
import t from 'tap';
import { renderGrid, stageOrder, steadyWindow, utilisation } from '../../lib/schedule/grid.js';
import type { ScheduleRecord } from '../../lib/schedule/record.js';

const r = (stage: number, kind: ScheduleRecord['kind'], mb: number, start: number, end: number): ScheduleRecord => ({
  stage,
  kind,
  mb,
  adapters: [mb],
  start,
  end,
});

// span 0..10 ms; width 10 → one cell per ms
const recs: ScheduleRecord[] = [
  r(0, 'F', 1, 0, 2),
  r(1, 'F', 1, 2, 4),
  r(0, 'F', 2, 2, 4),
  r(1, 'F', 2, 4, 6),
  r(1, 'S', -1, 6, 6.3), // 0.3 of a cell: lower case
  r(0, 'B', 1, 6, 8),
  r(0, 'B', 2, 8.6, 10), // cell 8 only 0.4 busy: 'b'; cell 9 'B'
  r(1, 'E', 3, 9, 12), // an evaluation is stage work inside the training span, not past its end
];

t.test('renderGrid: exact text', async (t) => {
  t.equal(
    renderGrid(recs, 2, 10),
    [
      'stage 0 |FFFF··BBbB|',
      'stage 1 |··FFFFs··E|',
      // busy: stage 0 = 2+2+2+1.4 = 7.4 of 10; stage 1 = 2+2+0.3+1 (E, clipped at 10) = 5.3 of 10;
      // bubble = 1 − (0.74+0.53)/2
      '         10 ms; busy 74% / 53% (evaluation 0% / 10%); bubble 36.5%',
    ].join('\n'),
  );
  // the same schedule shifted in time prints the same grid
  const shifted = recs.map((x) => ({ ...x, start: x.start + 1000, end: x.end + 1000 }));
  t.equal(renderGrid(shifted, 2, 10), renderGrid(recs, 2, 10));
  t.equal(renderGrid([], 2), '(no work recorded)');
  t.equal(renderGrid([r(0, 'E', 1, 0, 1)], 2), '(no work recorded)', 'only evaluations: nothing');
});

t.test('utilisation: busy fractions and bubble', async (t) => {
  const u = utilisation(recs, 2);
  t.equal(u.spanMs, 10);
  t.ok(Math.abs(u.busy[0]! - 0.74) < 1e-12, `stage 0 busy ${u.busy[0]}`);
  t.ok(Math.abs(u.busy[1]! - 0.53) < 1e-12, `stage 1 busy ${u.busy[1]}`);
  t.ok(Math.abs(u.evalBusy[1]! - 0.1) < 1e-12 && u.evalBusy[0] === 0, `evaluation share ${u.evalBusy}`);
  t.ok(Math.abs(u.bubble - 0.365) < 1e-12, `bubble ${u.bubble}`);
  // a window clips the records: [0,5): stage 0 = 4/5, stage 1 = (2 + 1)/5
  const w = utilisation(recs, 2, 0, 5);
  t.equal(w.spanMs, 5);
  t.ok(Math.abs(w.busy[0]! - 0.8) < 1e-12 && Math.abs(w.busy[1]! - 0.6) < 1e-12, `window busy ${w.busy}`);
  t.ok(Math.abs(w.bubble - 0.3) < 1e-12);
  // a stage with no records is idle; no records at all: zeros
  const three = utilisation(recs, 3);
  t.equal(three.busy[2], 0);
  t.ok(Math.abs(three.bubble - (1 - (0.74 + 0.53) / 3)) < 1e-12);
  t.same(utilisation([], 2), { spanMs: 0, busy: [0, 0], evalBusy: [0, 0], bubble: 0 });
  // a perfectly packed pipeline has no bubble
  t.equal(utilisation([r(0, 'F', 1, 0, 5), r(1, 'F', 1, 0, 5)], 2).bubble, 0);
});

t.test('stageOrder: F and B per stage in start order (S and E left out)', async (t) => {
  t.same(stageOrder(recs, 2), [
    ['F1', 'F2', 'B1', 'B2'],
    ['F1', 'F2'],
  ]);
  // input order does not matter
  t.same(stageOrder([...recs].reverse(), 2), [
    ['F1', 'F2', 'B1', 'B2'],
    ['F1', 'F2'],
  ]);
  t.same(stageOrder([], 2), [[], []]);
});

t.test('steadyWindow: from the lead step of every adapter on every stage to lead + steps', async (t) => {
  const step = (stage: number, adapter: number, end: number): ScheduleRecord => ({
    stage,
    kind: 'S',
    mb: -1,
    adapters: [adapter],
    start: end - 0.5,
    end,
  });
  // adapter 1 steps at 10, 20, 30, 40 (stage 1 a little later); adapter 2 at 12, 22, 35, 45
  const rs = [
    ...[10, 20, 30, 40].flatMap((e) => [step(0, 1, e), step(1, 1, e + 1)]),
    ...[12, 22, 35, 45].flatMap((e) => [step(0, 2, e), step(1, 2, e + 0.5)]),
    r(0, 'F', 9, 0, 9),
  ];
  t.same(steadyWindow(rs, [1, 2], 1, 2), { from: 12.5, to: 35.5 }, 'the slowest adapter and stage bound both ends');
  t.same(steadyWindow(rs, [1], 2, 2), { from: 21, to: 41 });
  t.equal(steadyWindow(rs, [1, 2], 1, 4), undefined, 'fewer steps recorded than asked');
  t.equal(steadyWindow(rs, [3], 1, 1), undefined, 'an adapter with no steps');
  t.equal(steadyWindow(rs, [1], 0, 1), undefined, 'lead 0 has no step to start from');
});
