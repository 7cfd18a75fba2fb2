// mlora bench --scenario gpu: its options, and one run of the whole scenario on a CPU device at
// tiny sizes (what the device-check rehearsal runs): every layout and adapter count gives a
// record, the PEFT baseline is joined by model and K, the 1b targets stay unmeasured. Speeds
// are measured, never asserted.
import t from 'tap';
import fs from 'node:fs';
import { availableParallelism } from 'node:os';
import path from 'node:path';
import { parseBenchArgs } from '../../scripts/cli/bench.js';
import { gpuScenario, printGpuTable } from '../../scripts/cli/bench-gpu.js';
import { tinyModel } from '../support/models.js';
import { tmpDir } from '../support/files.js';

t.test('gpu scenario options and clear errors', async (t) => {
  t.same(
    parseBenchArgs([
      '--scenario',
      'gpu',
      '--device',
      'cuda',
      '--models',
      'bench,/m/1b',
      '--stages',
      '1,2',
      '--adapters',
      '1,4,8',
      '--ceiling-n',
      '4096',
      '--baseline',
      'p.json',
    ]),
    {
      scenario: 'gpu',
      opts: {
        threads: availableParallelism(),
        json: false,
        quick: false,
        device: 'cuda:0',
        models: ['bench', '/m/1b'],
        stages: [1, 2],
        adapters: [1, 4, 8],
        ceilingN: 4096,
        baseline: 'p.json',
      },
    },
  );
  t.match(parseBenchArgs(['--scenario', 'gpu', '--device', 'gpu:0']), {
    error: /--device must be cpu:N or cuda:N, got 'gpu:0'/,
  });
  t.match(parseBenchArgs(['--scenario', 'gpu', '--stages', '1,x']), {
    error: /--stages must be a list of positive integers, got '1,x'/,
  });
  t.match(parseBenchArgs(['--scenario', 'gpu', '--ceiling-n', '0']), {
    error: /--ceiling-n must be a positive integer/,
  });
});

t.test('the scenario on cpu:0 at tiny sizes, joined with a PEFT baseline', async (t) => {
  const model = await tinyModel();
  const dir = tmpDir(t, 'bench-gpu');
  const baseline = path.join(dir, 'peft.json');
  fs.writeFileSync(
    baseline,
    JSON.stringify({ torch_bf16_tflops: 700, records: [{ model: 'tiny', adapters: 2, tokens_per_s: 1000 }] }),
  );
  const lines: string[] = [];
  const r = await gpuScenario(
    {
      device: 'cpu:0',
      models: [model],
      adapters: [1, 2],
      stages: [1, 2],
      rank: 4,
      micro: 1,
      seqLen: 16,
      steps: 1,
      ceilingN: 64,
      baseline,
    },
    (s) => lines.push(s),
  );
  t.ok(r.bf16_gemm_ceiling_tflops > 0, `a ceiling was measured (${r.bf16_gemm_ceiling_tflops} TFLOP/s)`);
  t.same(
    r.records.map((x) => [x.model, x.stages, x.adapters]),
    [
      ['tiny', 1, 1],
      ['tiny', 1, 2],
      ['tiny', 2, 1],
      ['tiny', 2, 2],
    ],
    'one record per layout and adapter count',
  );
  for (const x of r.records) {
    t.ok(
      x.tokens_per_s > 0 && x.mfu > 0 && x.busy.length === x.stages,
      `S=${x.stages} K=${x.adapters}: ${x.tokens_per_s} tok/s, MFU ${x.mfu}, busy ${x.busy}`,
    );
    // vs_peft is rounded from the unrounded tokens/s, so it may differ by one in the last digit from
    // a ratio of the rounded tokens_per_s: within 0.005 (ratio rounding) + 0.0005 (tokens rounding)
    if (x.adapters === 2) {
      t.ok(
        x.vs_peft !== undefined && Math.abs(x.vs_peft - x.tokens_per_s / 1000) <= 0.0055,
        `S=${x.stages} K=${x.adapters}: vs PEFT ${x.vs_peft} = ${x.tokens_per_s} / 1000 tok/s`,
      );
    } else t.equal(x.vs_peft, undefined, `S=${x.stages} K=${x.adapters}: no vs PEFT where the baseline lacks K`);
  }
  t.same(
    r.targets.map((x) => x.met),
    [null, null],
    'the 1b targets are not measured on the tiny model',
  );
  t.equal(r.torch_bf16_tflops, 700, 'the torch ceiling comes from the baseline');
  printGpuTable(r, (s) => lines.push(s));
  t.match(
    lines.join('\n'),
    /model\s+params\s+S\s+K[\s\S]*tiny[\s\S]*target 1b, K=8: MFU \(best layout\): not measured/,
    'the table',
  );
  await t.rejects(
    gpuScenario(
      {
        device: 'cpu:0',
        models: [dir],
        adapters: [1],
        stages: [1],
        rank: 4,
        micro: 1,
        seqLen: 16,
        steps: 1,
        ceilingN: 64,
      },
      () => {},
    ),
    /neither a preset .* nor a model directory \(no config.json\)/,
  );
});
