// A discrete-event simulator of the pipeline schedule, so a schedule can be checked (and its
// bubble predicted) before anything runs. It models what the runtime does: micro-batch
// messages enter stage 0 in admission order, at most `inflight` at once, a message waits for
// the previous message of each of its adapters when `sequential` (one in flight per adapter);
// each stage runs one action at a time, oldest first, Forward before Backward except on the
// last stage (the stage actor's order, actors/mailbox.ts; head shares are not modelled); a
// message goes F through stages 0..S-1 (the last stage's F includes the loss and its own
// backward), then B through S-2..0.
import type { ScheduleRecord } from './record.js';

export interface SimMessage {
  mb: number;
  adapters: number[];
  /** Duration of F on each stage (the last stage: forward + loss + backward), ms. */
  forward: number[];
  /** Duration of B on each stage (index S-1 unused), ms. */
  backward: number[];
}

export interface SimOptions {
  stages: number;
  inflight: number;
  /** One message per adapter in flight (inflight_per_adapter = 1). */
  sequential: boolean;
  /** Time to route a message between stages, ms. */
  hopMs?: number;
}

interface Action {
  kind: 'F' | 'B';
  msg: SimMessage;
  stage: number;
  ready: number;
  seq: number;
}

export function simulate(messages: SimMessage[], o: SimOptions): ScheduleRecord[] {
  const S = o.stages;
  const hop = o.hopMs ?? 0;
  const records: ScheduleRecord[] = [];
  const queue: Action[][] = Array.from({ length: S }, () => []);
  const freeAt = new Array<number>(S).fill(0);
  const doneAt = new Map<number, number>();
  const lastOfAdapter = new Map<number, number>();
  let next = 0;
  let active = 0;
  let seq = 0;
  let now = 0;
  const admit = () => {
    while (next < messages.length && active < o.inflight) {
      const m = messages[next]!;
      let ready = now;
      if (o.sequential) {
        for (const a of m.adapters) {
          const prev = lastOfAdapter.get(a);
          if (prev !== undefined) {
            const d = doneAt.get(prev);
            if (d === undefined) return; // wait for that adapter's previous micro-batch
            ready = Math.max(ready, d);
          }
        }
      }
      for (const a of m.adapters) lastOfAdapter.set(a, m.mb);
      queue[0]!.push({ kind: 'F', msg: m, stage: 0, ready, seq: seq++ });
      active++;
      next++;
    }
  };
  admit();
  for (let guard = 0; guard < 1e6; guard++) {
    // the earliest action any idle stage can start
    let best: { s: number; i: number; start: number } | undefined;
    for (let s = 0; s < S; s++) {
      const q = queue[s]!;
      if (!q.length) continue;
      const earliest = Math.min(...q.map((a) => a.ready));
      const start = Math.max(freeAt[s]!, earliest);
      // among actions ready at `start`, Forward first (Backward on the last stage), then oldest
      const first = s < S - 1 ? 'F' : 'B';
      let pick = -1;
      for (let i = 0; i < q.length; i++) {
        if (q[i]!.ready > start) continue;
        if (
          pick < 0 ||
          (q[i]!.kind === first && q[pick]!.kind !== first) ||
          (q[i]!.kind === q[pick]!.kind && q[i]!.seq < q[pick]!.seq)
        )
          pick = i;
      }
      if (!best || start < best.start) best = { s, i: pick, start };
    }
    if (!best) break;
    const a = queue[best.s]!.splice(best.i, 1)[0]!;
    const dur = a.kind === 'F' ? a.msg.forward[a.stage]! : a.msg.backward[a.stage]!;
    const end = best.start + dur;
    freeAt[best.s] = end;
    records.push({ stage: a.stage, kind: a.kind, mb: a.msg.mb, adapters: a.msg.adapters, start: best.start, end });
    let finished = false;
    if (a.kind === 'F' && a.stage < S - 1)
      queue[a.stage + 1]!.push({ kind: 'F', msg: a.msg, stage: a.stage + 1, ready: end + hop, seq: seq++ });
    else if (a.kind === 'F' && S > 1)
      queue[S - 2]!.push({ kind: 'B', msg: a.msg, stage: S - 2, ready: end + hop, seq: seq++ });
    else if (a.kind === 'B' && a.stage > 0)
      queue[a.stage - 1]!.push({ kind: 'B', msg: a.msg, stage: a.stage - 1, ready: end + hop, seq: seq++ });
    else finished = true;
    if (finished) {
      // the supervisor learns of the completion one hop later, and only then admits more
      doneAt.set(a.msg.mb, end + hop);
      now = end + hop;
      active--;
      admit();
    }
  }
  return records;
}
