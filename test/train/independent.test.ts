// Adapters progress independently. 'early' (batch 1) runs; 'late' (batch 3, micro 1) is
// submitted only once 'early' has done 3 steps and joins at the next admission, sharing
// BatchLoRA messages with it. Each ends with exactly the weights it gets when trained alone.
import t from 'tap';
import { Supervisor } from '../../actors/index.js';
import { parseAdapterConfig, type AdapterConfigInput } from '../../lib/config.js';
import type { JobEvent } from '../../actors/protocol.js';
import { collect, readPeft, RUN_DEFAULTS, run } from './util.js';
import { bitwiseEqual } from '../support/compare.js';
import { tinyModel } from '../support/models.js';
import { demoData, tmpDir } from '../support/files.js';

t.test('a job submitted mid-run joins at the next admission; both equal their solo runs', async (t) => {
  const model = await tinyModel();
  const dir = tmpDir(t);
  const early: AdapterConfigInput = {
    name: 'early',
    data: demoData(dir, 'arithmetic', 12),
    seq_len: 256,
    batch_size: 1,
    seed: 1,
    lora: { r: 2, dropout: 0.1 },
  };
  const late: AdapterConfigInput = {
    name: 'late',
    data: demoData(dir, 'capitals', 6),
    seq_len: 256,
    batch_size: 3,
    micro_batch_size: 1,
    seed: 2,
    lora: { r: 4, targets: ['v_proj', 'up_proj'] },
  };
  const events: JobEvent[] = [];
  const out = `${dir}/together`;
  let submitted: Promise<unknown> | undefined;
  const sup = await Supervisor.start({
    ...RUN_DEFAULTS,
    model,
    output: out,
    onEvent: (e) => {
      events.push(e);
      if (e.type === 'step' && e.adapter === 'early' && e.step === 3)
        submitted = Promise.resolve(sup.submit(parseAdapterConfig(late)));
    },
  });
  sup.submit(parseAdapterConfig(early));
  await sup.drain();
  await submitted;
  await sup.drain();
  const messages = sup.pipeline
    .schedule()
    .filter((r) => r.kind === 'F')
    .map((r) => r.adapters);
  await sup.close();
  const { steps, errors } = collect(events);
  t.same(errors, []);
  const order = events.filter((e) => e.type === 'step').map((e) => `${e.adapter}${(e as { step: number }).step}`);
  const firstLate = order.indexOf('late1');
  t.ok(firstLate > order.indexOf('early3'), `late starts after early's step 3: ${order.join(' ')}`);
  t.ok(order.indexOf('early12') > firstLate, 'early is still running when late takes its first step');
  t.equal(steps.get('early')!.length, 12);
  t.equal(steps.get('late')!.length, 2);
  t.ok(
    messages.some((m) => m.length === 2),
    `late shares messages with early (${messages.filter((m) => m.length === 2).length} of ${messages.length})`,
  );
  for (const a of [early, late]) {
    const solo = `${dir}/solo-${a.name}`;
    const r = await run(model, [a], { output: solo });
    t.same(r.errors, []);
    t.same(
      r.steps.get(a.name)!.map((s) => s.loss),
      steps.get(a.name)!.map((s) => s.loss),
      `${a.name}: same losses as alone`,
    );
    t.ok(
      bitwiseEqual(readPeft(model, a, `${out}/${a.name}`), readPeft(model, a, `${solo}/${a.name}`)),
      `${a.name}: same final weights as alone, bitwise`,
    );
  }
});
