// Training on an NF4-quantized base (quantize: nf4, QLoRA style) over 2 stages (cpu:0, cpu:1):
// the base is quantized on each stage as it loads, a restarted stage quantizes it again to the
// same bytes, so a run with real stage crashes (process.exit in the worker thread) ends with
// adapters bitwise equal to the fault-free NF4 run; and the NF4 run is not the f32 run.
import t from 'tap';
import { adapters, run, stateDiff } from './harness.js';
import { tinyModel } from '../support/models.js';
import { tmpDir } from '../support/files.js';

t.test('NF4 base over 2 stages: crash recovery is bitwise', async (t) => {
  const model = await tinyModel(0);
  const dir = tmpDir(t, 'nf4');
  const cfg = adapters(dir, ['a', 'b']);
  const base = await run({ model, adapters: cfg, quantize: 'nf4' });
  t.notOk(base.error, `fault-free NF4 run: ${base.error?.message ?? 'ok'} in ${Math.round(base.ms)} ms`);
  const f32 = await run({ model, adapters: cfg });
  t.notOk(f32.error, 'fault-free f32 run');
  for (const a of cfg)
    t.not(
      stateDiff(f32.finals.get(a.name), base.finals.get(a.name)),
      '',
      `${a.name}: the NF4 base trains differently from the f32 one (it is really quantized)`,
    );

  for (const [stage, after] of [
    [0, 7],
    [1, 15],
  ] as const) {
    const spec = `crash:stage=${stage},after=${after}`;
    const r = await run({ model, adapters: cfg, faults: [spec], quantize: 'nf4' });
    t.notOk(r.error, `${spec}: ${r.error?.message ?? 'completed'} in ${Math.round(r.ms)} ms`);
    t.equal(r.faults.length, 1, `${spec}: one recovery`);
    for (const a of cfg)
      t.equal(
        stateDiff(r.finals.get(a.name), base.finals.get(a.name)),
        '',
        `${spec}: ${a.name} bitwise equal to the fault-free NF4 run`,
      );
    t.equal(r.slotsInUse, 0, `${spec}: no shared slot left taken`);
  }
});
