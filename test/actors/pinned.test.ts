// MLORA_PIN_CORES=1: each local CPU stage actor's compute thread is pinned to a core of its
// own (lib/schedule/cores.ts), its JS thread to the same core, and training over 2 pinned stage
// actors stays bitwise that of the single-device trainer (where a thread runs changes no bit).
import fs from 'node:fs';
import t from 'tap';
import { native } from '../../lib/native.js';
import { Supervisor } from '../../actors/index.js';
import { stateBitwiseEqual, stateMaxDiff } from '../support/compare.js';
import { tinyModelWithLayers } from '../support/models.js';
import { processThreads } from '../support/threads.js';
import { adapter, captureFinals, runJobs } from './util.js';

const allowed = native().info().cpu.allowedCores;
if (allowed.length < 2) {
  t.comment(`pinned stage tests skipped: 2 stages need 2 allowed cores (this process may use ${allowed.join(',')})`);
} else {
  const model = await tinyModelWithLayers(2);
  t.teardown(() => fs.rmSync(model, { recursive: true, force: true }));
  const job = () => [
    adapter('caps', 'capitals', {
      seed: 5,
      max_grad_norm: undefined,
      max_steps: 2,
      lora: { r: 8, alpha: 8, dropout: 0.05, targets: ['k_proj', 'up_proj'] },
    }),
  ];
  const ref = await runJobs({ model, devices: ['cpu:0'], threads: 1, inProcess: true }, job());

  /** How many threads of this process may run only on CPU `core`. */
  const pinnedTo = (core: number) => processThreads().filter((th) => th.cpus === String(core)).length;

  /** The CPU lists of this process's threads named `name`. */
  const cpusOf = (name: string) => processThreads().flatMap((th) => (th.name === name ? [th.cpus] : []));

  await t.test('2 pinned stage actors: one compute thread on each core, same bits as one device', async (t) => {
    const before = allowed.slice(0, 2).map(pinnedTo);
    process.env.MLORA_PIN_CORES = '1';
    let sup: Supervisor;
    try {
      sup = await Supervisor.start({ model, devices: ['cpu:0', 'cpu:1'], threads: 1 });
    } finally {
      delete process.env.MLORA_PIN_CORES;
    }
    const states = captureFinals(sup);
    try {
      // a stage's device is open once it is ready; its leader pins itself as it starts
      let now = before;
      for (let i = 0; i < 100 && now.some((n, k) => n <= before[k]!); i++) {
        await new Promise((r) => setTimeout(r, 20));
        now = allowed.slice(0, 2).map(pinnedTo);
      }
      t.ok(
        now[0]! > before[0]! && now[1]! > before[1]!,
        `a thread pinned to CPU ${allowed[0]} and one to ${allowed[1]}`,
      );
      // each stage's JS thread shares its compute thread's core (it runs between the stage's op lists)
      t.same(
        [0, 1].map((s) => cpusOf(`mlora stage ${s}`)),
        [[String(allowed[0])], [String(allowed[1])]],
        'stage 0 and stage 1 JS threads pinned to their cores',
      );
      for (const j of job()) sup.submit(j);
      await sup.drain();
    } finally {
      await sup.close();
    }
    const [got, want] = [states.get('caps'), ref.states.get('caps')];
    t.ok(got && want, 'both runs finished the adapter');
    if (got && want)
      t.ok(stateBitwiseEqual(got, want), `params, m, v bitwise equal (max |diff| ${stateMaxDiff(got, want)})`);
  });
}
