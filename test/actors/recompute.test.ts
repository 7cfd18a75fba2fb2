// Activation recomputation (pipeline.recompute): a micro-batch keeps only each layer's input
// between forward and backward, and the backward recomputes each layer's activations with the
// same kernels on the same inputs (dropout masks are hashed, not stored). Training ends BITWISE
// equal to training without it, in-thread on one device and over 2 stage actors; and a stage
// keeps far fewer bytes per micro-batch in flight.
import t from 'tap';
import fs from 'node:fs';
import { openModelDir } from '../../lib/io/hf-model.js';
import { activationBytes, workBytes } from '../../lib/model/stage.js';
import { adapter, runJobs } from './util.js';
import { stateBitwiseEqual, stateMaxDiff } from '../support/compare.js';
import { tinyModelWithLayers } from '../support/models.js';

const model = await tinyModelWithLayers(3);
t.teardown(() => fs.rmSync(model, { recursive: true, force: true }));
// one adapter with dropout (its masks must be recomputed exactly), one without, clipping on one
const jobs = () => [
  adapter('arith', 'arithmetic', {
    lora: { r: 4, alpha: 8, dropout: 0.1, targets: ['q_proj', 'v_proj', 'down_proj'] },
  }),
  adapter('caps', 'capitals', {
    seed: 5,
    max_grad_norm: undefined,
    lora: { r: 8, alpha: 8, dropout: 0, targets: ['k_proj', 'o_proj', 'gate_proj', 'up_proj'] },
  }),
];

for (const [what, o] of [
  ['one device, in-thread', { devices: ['cpu:0'], inProcess: true }],
  ['2 stage actors', { devices: ['cpu:0', 'cpu:1'] }],
] as const) {
  await t.test(`${what}: recompute == no recompute, bitwise`, async (t) => {
    const plain = await runJobs({ model, threads: 1, ...o, devices: [...o.devices] }, jobs());
    const rc = await runJobs({ model, threads: 1, ...o, devices: [...o.devices], recompute: true }, jobs());
    t.equal(rc.states.size, 2, 'both adapters finished with recompute');
    t.ok(
      rc.peaks[0]! < plain.peaks[0]!,
      `stage 0 used at most ${rc.peaks[0]} bytes with recompute, ${plain.peaks[0]} without`,
    );
    for (const [name, want] of plain.states) {
      const got = rc.states.get(name)!;
      t.equal(got.version, want.version, `${name}: ${want.version} optimizer steps`);
      t.ok(
        stateBitwiseEqual(got, want),
        `${name}: weights and AdamW moments bitwise equal (max |diff| ${stateMaxDiff(got, want)})`,
      );
    }
  });
}

t.test('bytes a stage keeps per micro-batch in flight', async (t) => {
  const c = openModelDir(model).config;
  const plan = { lo: 0, hi: c.numLayers, first: true, last: false };
  const segs = [
    {
      rows: 512,
      spec: { r: 8, alpha: 8, dropout: 0, targets: ['q_proj', 'v_proj'] as const, useRslora: false, seed: 0 },
    },
  ].map((s) => ({ ...s, spec: { ...s.spec, targets: [...s.spec.targets] } }));
  const all = activationBytes(c, plan, 512, segs);
  const inputs = activationBytes(c, plan, 512, segs, true);
  t.ok(inputs * 3 < all, `saved block: ${inputs} bytes with recompute vs ${all} without`);
  t.equal(workBytes(c, 512, segs, false), 0, 'no work block without recompute');
  t.ok(workBytes(c, 512, segs, true) > 0, `work block during a call: ${workBytes(c, 512, segs, true)} bytes`);
});
