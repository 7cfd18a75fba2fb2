// The schedule simulator: hand-checked small cases, and agreement with the schedule a real
// 2-stage actor pipeline recorded.
import t, { type Test } from 'tap';
import fs from 'node:fs';
import { simulate, type SimMessage } from '../../lib/schedule/simulate.js';
import { stageOrder } from '../../lib/schedule/grid.js';
import type { ScheduleRecord } from '../../lib/schedule/record.js';
import { adapter, runJobs } from '../actors/util.js';
import { tinyModelWithLayers } from '../support/models.js';

const strip = (rs: ScheduleRecord[]) => rs.map((r) => `${r.stage}${r.kind}${r.mb}@${r.start}-${r.end}`);

t.test('one stage: messages back to back', async (t) => {
  const msgs: SimMessage[] = [
    { mb: 1, adapters: [1], forward: [3], backward: [0] },
    { mb: 2, adapters: [2], forward: [2], backward: [0] },
  ];
  t.same(strip(simulate(msgs, { stages: 1, inflight: 2, sequential: false })), ['0F1@0-3', '0F2@3-5']);
  // the same adapter, sequential: the second waits for the first (it would anyway on one stage)
  const same = msgs.map((m) => ({ ...m, adapters: [1] }));
  t.same(strip(simulate(same, { stages: 1, inflight: 2, sequential: true })), ['0F1@0-3', '0F2@3-5']);
  t.same(simulate([], { stages: 1, inflight: 1, sequential: false }), []);
});

t.test('two stages × two messages: exact records', async (t) => {
  // F = 2 ms on stage 0, 3 ms on stage 1 (forward + loss + backward); B = 1 ms on stage 0
  const msgs: SimMessage[] = [1, 2].map((mb) => ({ mb, adapters: [mb], forward: [2, 3], backward: [1, 0] }));
  // independent adapters, both in flight:
  //   stage 0: F1 0-2, F2 2-4, (idle), B1 5-6 (B1 is ready at 5, when stage 1 ends F1), (idle), B2 8-9
  //   stage 1: F1 2-5, F2 5-8
  t.same(strip(simulate(msgs, { stages: 2, inflight: 2, sequential: false })), [
    '0F1@0-2',
    '0F2@2-4',
    '1F1@2-5',
    '0B1@5-6',
    '1F2@5-8',
    '0B2@8-9',
  ]);
  // one message in flight (or one adapter, sequential): no overlap at all, 6 ms per message
  const serial = ['0F1@0-2', '1F1@2-5', '0B1@5-6', '0F2@6-8', '1F2@8-11', '0B2@11-12'];
  t.same(strip(simulate(msgs, { stages: 2, inflight: 1, sequential: false })), serial);
  t.same(
    strip(
      simulate(
        msgs.map((m) => ({ ...m, adapters: [7] })),
        { stages: 2, inflight: 2, sequential: true },
      ),
    ),
    serial,
  );
  // a hop time delays each hand-over, the completion report to the supervisor included
  // (B1 ends at 8, the supervisor learns it at 9 and admits message 2 then), with or without `sequential`
  t.same(
    strip(
      simulate(
        msgs.map((m) => ({ ...m, adapters: [7] })),
        { stages: 2, inflight: 2, sequential: true, hopMs: 1 },
      ),
    ),
    ['0F1@0-2', '1F1@3-6', '0B1@7-8', '0F2@9-11', '1F2@12-15', '0B2@16-17'],
  );
  t.same(strip(simulate(msgs, { stages: 2, inflight: 1, sequential: false, hopMs: 1 })), [
    '0F1@0-2',
    '1F1@3-6',
    '0B1@7-8',
    '0F2@9-11',
    '1F2@12-15',
    '0B2@16-17',
  ]);
});

t.test('Forward before Backward on a stage before the last when both are ready', async (t) => {
  // 3 messages in flight; stage 0 has F3 and B1 both waiting when it frees up at t=6: F3 first
  const msgs: SimMessage[] = [1, 2, 3].map((mb) => ({
    mb,
    adapters: [mb],
    forward: [mb === 2 ? 4 : 2, 1],
    backward: [1, 0],
  }));
  const rs = simulate(msgs, { stages: 2, inflight: 3, sequential: false });
  // stage 0: F1 0-2, F2 2-6; stage 1: F1 2-3 (B1 ready at 3), F2 6-7 (B2 ready at 7).
  // At 6 stage 0 has B1 and F3 ready: F3 6-8 (stage 1 runs it 8-9). At 8, B1 and B2: B1 8-9, B2 9-10, then B3 10-11.
  t.same(stageOrder(rs, 2), [
    ['F1', 'F2', 'F3', 'B1', 'B2', 'B3'],
    ['F1', 'F2', 'F3'],
  ]);
  t.same(strip(rs.filter((r) => r.stage === 0)), ['0F1@0-2', '0F2@2-6', '0F3@6-8', '0B1@8-9', '0B2@9-10', '0B3@10-11']);
});

// ---- the simulator vs the recorder on a real 2-stage run

/**
 * Checks a real (or simulated) 2-stage schedule for what must hold whatever the timing:
 * each stage runs one thing at a time; a message goes F on stage 0, then F (+loss+backward)
 * on stage 1, then B on stage 0, each starting after the previous ended. On real records this
 * only holds with one time base for both stages (the stages used to stamp relative to their
 * own worker's start).
 */
function checkCausal(t: Test, rs: ScheduleRecord[], what: string) {
  for (const s of [0, 1]) {
    const mine = rs.filter((r) => r.stage === s).sort((a, b) => a.start - b.start);
    for (let i = 1; i < mine.length; i++) {
      if (mine[i]!.start < mine[i - 1]!.end)
        t.fail(`${what}: stage ${s} overlaps: ${JSON.stringify(mine[i - 1])} and ${JSON.stringify(mine[i])}`);
    }
  }
  const mbs = [...new Set(rs.filter((r) => r.kind === 'F').map((r) => r.mb))];
  let ok = 0;
  for (const mb of mbs) {
    const f0 = rs.find((r) => r.mb === mb && r.stage === 0 && r.kind === 'F')!;
    const f1 = rs.find((r) => r.mb === mb && r.stage === 1 && r.kind === 'F')!;
    const b0 = rs.find((r) => r.mb === mb && r.stage === 0 && r.kind === 'B')!;
    if (f0 && f1 && b0 && f0.end <= f1.start && f1.end <= b0.start) ok++;
    else
      t.fail(
        `${what}: micro-batch ${mb}: F0 ${f0?.start}-${f0?.end}, F1 ${f1?.start}-${f1?.end}, B0 ${b0?.start}-${b0?.end} out of order`,
      );
  }
  t.equal(
    ok,
    mbs.length,
    `${what}: F(stage 0) → F(stage 1) → B(stage 0) in time for all ${mbs.length} micro-batches, no overlap on a stage`,
  );
}

/** The recorded run as simulator input: messages in admission order (stage-0 F start), measured durations. */
function toMessages(rs: ScheduleRecord[]): SimMessage[] {
  const f0 = rs.filter((r) => r.stage === 0 && r.kind === 'F').sort((a, b) => a.start - b.start);
  return f0.map((r) => {
    const d = (stage: number, kind: 'F' | 'B') => {
      const x = rs.find((y) => y.mb === r.mb && y.stage === stage && y.kind === kind);
      return x ? x.end - x.start : 0;
    };
    return { mb: r.mb, adapters: r.adapters, forward: [d(0, 'F'), d(1, 'F')], backward: [d(0, 'B'), 0] };
  });
}

const model = await tinyModelWithLayers(2);
t.teardown(() => fs.rmSync(model, { recursive: true, force: true }));
const jobs = () => [
  adapter('a', 'arithmetic', { max_steps: 2, max_grad_norm: undefined }),
  adapter('b', 'capitals', { max_steps: 2, max_grad_norm: undefined }),
];

t.test('one message in flight: the simulator reproduces the recorded order exactly', async (t) => {
  // whole layers (no head share) and one micro-batch per adapter in flight: what the simulator models
  const run = await runJobs({ model, devices: ['cpu:0', 'cpu:1'], threads: 1, inflight: 1, split: [1, 1] }, jobs());
  const real = run.sup.pipeline.schedule().filter((r) => r.kind === 'F' || r.kind === 'B');
  t.equal(real.filter((r) => r.kind === 'F' && r.stage === 0).length, 8, '2 adapters × 2 steps × 2 micro-batches');
  checkCausal(t, real, 'recorded');
  const sim = simulate(toMessages(real), { stages: 2, inflight: 1, sequential: true });
  checkCausal(t, sim, 'simulated');
  // with one message in flight nothing can overlap, so timing cannot change the order
  t.same(stageOrder(sim, 2), stageOrder(real, 2), 'per-stage order identical');
});

t.test('four messages in flight: the simulator and the recorder agree up to timing', async (t) => {
  const run = await runJobs(
    { model, devices: ['cpu:0', 'cpu:1'], threads: 1, inflight: 4, split: [1, 1], inflightPerAdapter: 1 },
    jobs(),
  );
  const all = run.sup.pipeline.schedule();
  const real = all.filter((r) => r.kind === 'F' || r.kind === 'B');
  checkCausal(t, real, 'recorded');
  const sim = simulate(toMessages(real), { stages: 2, inflight: 4, sequential: true });
  checkCausal(t, sim, 'simulated');
  const [ro, so] = [stageOrder(real, 2), stageOrder(sim, 2)];
  // What timing cannot change (with 2 stages): stage 0 runs the Forwards in admission order
  // (the simulator is given that order); stage 1 receives them in that order and runs them
  // FIFO; stage 0 gets the Backwards in stage 1's completion order and runs them FIFO. So:
  // the same work per stage, stage 1's order identical, and stage 0's F-only and B-only
  // subsequences identical.
  // What timing can change: only how stage 0 interleaves its Backwards with its Forwards —
  // whether B(k) has arrived (stage 1 finished F(k) and posted B(k) to stage 0) before stage 0
  // picks its next F. The real hand-over latency (a postMessage hop between the workers, plus
  // the optimizer steps the simulator does not model: they occupy
  // each stage between micro-batches) moves those arrival times, so that interleaving is
  // compared through the rule instead: stage 0 never starts a B while an F has been ready for
  // longer than a hand-over slack (below).
  t.same(ro[1], so[1], 'stage 1: identical order');
  const only = (xs: string[], k: string) => xs.filter((x) => x.startsWith(k));
  t.same(only(ro[0]!, 'F'), only(so[0]!, 'F'), 'stage 0: Forwards in the same order');
  t.same(only(ro[0]!, 'B'), only(so[0]!, 'B'), 'stage 0: Backwards in the same order');
  t.same([...ro[0]!].sort(), [...so[0]!].sort(), 'stage 0: the same work');
  // Forward priority on the real stage 0, with a slack for the relay (ms). An adapter's next
  // Forward is ready no earlier than the end of its previous micro-batch's Backward on stage 0
  // and, at a step boundary, of its optimizer step there (the Forward may have been sent ahead
  // of the step, to wait for it on the stage)
  const SLACK = 25;
  const b0 = real.filter((r) => r.stage === 0 && r.kind === 'B');
  const s0 = all.filter((r) => r.stage === 0 && r.kind === 'S');
  let violations = 0;
  for (const f of real.filter((r) => r.stage === 0 && r.kind === 'F')) {
    const mine = (r: ScheduleRecord) => r.adapters.includes(f.adapters[0]!) && r.end <= f.start;
    const ready = Math.max(-Infinity, ...b0.filter(mine).map((r) => r.end), ...s0.filter(mine).map((r) => r.end));
    if (!Number.isFinite(ready)) continue; // the adapter's first: its admission time is not recorded
    const jumped = b0.filter((b) => b.start > ready + SLACK && b.start < f.start);
    if (jumped.length) {
      violations++;
      t.comment(
        `F${f.mb} ready at ${ready.toFixed(1)} ms ran at ${f.start.toFixed(1)} after ${jumped.map((b) => `B${b.mb}@${b.start.toFixed(1)}`).join(' ')}`,
      );
    }
  }
  t.equal(violations, 0, `stage 0 took no Backward while a Forward had been waiting > ${SLACK} ms`);
  if (JSON.stringify(ro) !== JSON.stringify(so))
    t.comment(`orders differ only in stage-0 interleaving:\n real ${ro[0]!.join(' ')}\n sim  ${so[0]!.join(' ')}`);
});
