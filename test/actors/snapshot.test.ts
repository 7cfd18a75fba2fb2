// The snapshot an optimizer step leaves with the supervisor (actors/shm.ts, StageSnapshot): the
// two sides of a stage's shared buffer, the copy of one side that crosses a cluster link, and an
// actor pipeline whose snapshot after every step is its stages' state bit for bit, written into
// the same shared memory step after step.
import t from 'tap';
import fs from 'node:fs';
import { Packr } from 'msgpackr';
import { ActorPipeline } from '../../actors/runtime.js';
import { assemble } from '../../actors/scheduler/assemble.js';
import { compactSnapshot, snapshotBuffer, snapshotField, snapshotViews, type StageSnapshot } from '../../actors/shm.js';
import { isStepReply } from '../../actors/protocol.js';
import type { Ledger } from '../../actors/recovery.js';
import { openModelDir } from '../../lib/io/hf-model.js';
import { freshState, type AdapterState } from '../../lib/lora/state.js';
import type { LoraSpec } from '../../lib/lora/adapter.js';
import { Rng } from '../../lib/rng.js';
import { tinyModelWithLayers, twoStageOptions } from '../support/models.js';
import { syntheticMicroBatch } from '../../scripts/cli/bench-common.js';

const model = await tinyModelWithLayers(2);
t.teardown(() => fs.rmSync(model, { recursive: true, force: true }));

const bits = (a: Float32Array) => Buffer.from(a.buffer, a.byteOffset, a.byteLength);

t.test('the two sides and their three fields never overlap', async (t) => {
  const size = 5;
  const buf = snapshotBuffer(size);
  t.equal(buf.byteLength, 2 * 3 * size * 4);
  const seen = new Set<number>();
  for (const side of [0, 1])
    for (const f of ['params', 'm', 'v'] as const) {
      const v = snapshotField(buf, size, side, f);
      t.equal(v.length, size);
      for (let i = 0; i < size; i++) seen.add(v.byteOffset + 4 * i);
    }
  t.equal(seen.size, 2 * 3 * size, 'every float of the buffer belongs to exactly one side and field');
});

t.test('a compact snapshot is one side in memory of its own, and it crosses the cluster wire', async (t) => {
  const size = 7;
  const s: StageSnapshot = { buffer: snapshotBuffer(size), size, side: 1, version: 3 };
  const rng = new Rng(5);
  const v = snapshotViews(s);
  for (const k of ['params', 'm', 'v'] as const) rng.fillUniform(v[k], -1, 1);
  snapshotField(s.buffer, size, 0, 'params').fill(NaN); // the other side: not copied
  const c = compactSnapshot(s);
  t.notOk(c.buffer instanceof SharedArrayBuffer, 'no shared memory in it');
  t.equal(c.buffer.byteLength, 3 * size * 4, 'one side only');
  // what actors/transport/link.ts does to a message (msgpackr, moreTypes)
  const packr = new Packr({ moreTypes: true });
  const reply = packr.unpack(packr.pack({ type: 'reply', id: 1, value: { sumsq: 2, snapshot: c } })) as {
    value: unknown;
  };
  t.ok(isStepReply(reply.value));
  const back = snapshotViews((reply.value as { snapshot: StageSnapshot }).snapshot);
  for (const k of ['params', 'm', 'v'] as const) t.ok(bits(back[k]).equals(bits(v[k])), `${k} bit for bit`);
  t.equal(back.version, 3);
  t.notOk(isStepReply({ sumsq: 1 }), 'a reply without a snapshot is not a step reply');
});

t.test("each step's snapshot is the stages' state, bit for bit, in the same shared memory", async (t) => {
  const config = openModelDir(model).config;
  const p = await ActorPipeline.start(twoStageOptions(model));
  try {
    const spec: LoraSpec = {
      r: 4,
      alpha: 8,
      dropout: 0,
      targets: ['q_proj', 'v_proj', 'down_proj'],
      useRslora: false,
      seed: 3,
    };
    await p.addAdapter(1, spec, freshState(config, spec));
    const ledger = p['ledger'] as Ledger;
    const sides: AdapterState[][] = [];
    for (let s = 1; s <= 4; s++) {
      await p.train(assemble(s, [{ adapter: 1, serial: s, mb: syntheticMicroBatch(new Rng(s), config, 2, 16) }], 32));
      await p.step(1, { lr: 1e-2, beta1: 0.9, beta2: 0.999, eps: 1e-8, weightDecay: 0.01, step: s, gradScale: 1 });
      const slices = ledger['snapshots'].get(1) as AdapterState[];
      t.equal(slices.length, 2, `step ${s}: one slice per stage`);
      t.ok(
        slices.every((x) => x.params.buffer instanceof SharedArrayBuffer),
        `step ${s}: the slices are views of shared memory`,
      );
      sides.push(slices);
      const snap = ledger.snapshot(1)!;
      const live = await p.exportAdapter(1);
      t.equal(snap.version, s);
      for (const k of ['params', 'm', 'v'] as const)
        t.ok(bits(snap[k]).equals(bits(live[k])), `step ${s}: ${k} of the snapshot is the stages' own`);
      if (s >= 3) {
        // the views kept from two steps ago see this step's state: the same memory, written again
        const again = sides[s - 3]!;
        const now = ledger.snapshot(1)!;
        let off = 0;
        for (const x of again) {
          t.ok(bits(x.params).equals(bits(now.params.subarray(off, off + x.params.length))), `step ${s}: side reused`);
          off += x.params.length;
        }
      }
    }
  } finally {
    await p.close();
  }
});
