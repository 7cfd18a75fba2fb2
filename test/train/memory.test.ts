// Memory: the byte estimates the supervisor admits by (StageAdapter.bytes via
// pipeline.adapterBytes, pipeline.activationBytes = saved activations + scratch + the message's
// tensors) equal what the device allocator counts, exactly:
//  - adding an adapter raises `used` by adapterBytes;
//  - the peak of every BatchLoRA micro-batch (train: forward + loss + backward) is
//    used-before + activationBytes(N, segments, nseq) (scratch lives only while a call runs);
//  - after each micro-batch `used` is back where it was, without waiting for GC.
import t from 'tap';
import { Supervisor } from '../../actors/index.js';
import { assemble, microSerial } from '../../actors/scheduler/assemble.js';
import type { LocalPipeline } from '../../actors/local.js';
import { prepareJob } from '../../actors/scheduler/prepare.js';
import { parseAdapterConfig } from '../../lib/config.js';
import { openModelDir } from '../../lib/io/hf-model.js';
import { RUN_DEFAULTS } from './util.js';
import { tinyModel } from '../support/models.js';
import { demoData, tmpDir } from '../support/files.js';
import {
  loadStageWeights,
  freeStageWeights,
  stageWeightBreakdown,
  stageWeightBytes,
  type BaseFormat,
} from '../../lib/model/weights.js';
import { PRESETS } from '../../lib/model/config.js';
import type { ModelDir } from '../../lib/io/hf-model.js';
import { cpuDevice } from '../support/helpers.js';
import { native } from '../../lib/native.js';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

t.test('the base weights take exactly the bytes stageWeightBytes says, in every format', async (t) => {
  const tiny = await tinyModel();
  const quantDir = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../../../test/fixtures/quant');
  const cases: Array<[string, BaseFormat]> = [
    [tiny, {}],
    [tiny, { computeDtype: 'bf16' }],
    [tiny, { quantize: 'nf4' }],
    [tiny, { quantize: 'nf4-dq' }],
    [tiny, { quantize: 'int8' }],
    [tiny, { quantize: 'nf4', computeDtype: 'bf16' }],
    [path.join(quantDir, 'nf4/model'), {}],
    [path.join(quantDir, 'nf4-dq/model'), {}],
    [path.join(quantDir, 'int8/model'), {}],
    [tiny, { packWeights: false }],
    [tiny, { packWeights: true, quantize: 'nf4' }],
    [tiny, { packWeights: true, computeDtype: 'bf16' }],
  ];
  for (const [model, fmt] of cases) {
    const dir = openModelDir(model);
    const n = dir.config.numLayers;
    for (const plan of [
      { lo: 0, hi: n, first: true, last: true },
      { lo: 0, hi: 1, first: true, last: false },
      { lo: 1, hi: n, first: false, last: true },
    ]) {
      const d = cpuDevice(1);
      const u0 = d.memory().used;
      const w = await loadStageWeights(d, dir, plan, fmt);
      const got = d.memory().used - u0;
      const budget = d.memory().budget;
      const parts = stageWeightBreakdown(dir, plan, fmt, budget);
      t.equal(
        got,
        stageWeightBytes(dir, plan, fmt, budget),
        `${path.basename(path.dirname(model))}/${path.basename(model)} ${JSON.stringify(fmt)} layers [${plan.lo}, ${plan.hi}): ${got} bytes (linears ${parts.linears} as ${parts.linearFormat}, GEMM panels ${parts.panels})`,
      );
      t.equal(w.packedBytes ?? 0, parts.panels, 'the panels packed are the ones planned');
      if (fmt.packWeights === false) t.equal(parts.panels, 0, 'nothing is packed');
      else if (fmt.packWeights !== true && (fmt.quantize || dir.quantization)) {
        // quantized linears keep their format: only the (float) LM head is packed
        const c = dir.config;
        const head = plan.last ? native().gemmPanelBytes(c.vocabSize, c.hiddenSize, fmt.computeDtype === 'bf16') : 0;
        t.equal(parts.panels, head, 'only the LM head is packed');
      } else t.ok(parts.panels > 0, 'the linears are packed');
      freeStageWeights(w);
      t.equal(d.memory().used, u0, 'and all of them come back when freed');
    }
  }
});

t.test("pack_weights 'auto' packs only where the panels take at most half of the memory left", async (t) => {
  const tiny = await tinyModel();
  const dir = openModelDir(tiny);
  const plan = { lo: 0, hi: dir.config.numLayers, first: true, last: true };
  const weights = stageWeightBytes(dir, plan, { packWeights: false });
  const panels = stageWeightBreakdown(dir, plan, {}, 2 ** 30).panels;
  t.ok(panels > 0, `the tiny model's panels take ${panels} bytes`);
  for (const [budget, packs] of [
    [weights + 2 * panels, true],
    [weights + 2 * panels - 256, false],
  ] as const) {
    const d = cpuDevice(1, budget);
    const w = await loadStageWeights(d, dir, plan);
    t.equal(w.packedBytes ?? 0, packs ? panels : 0, `budget ${budget}: ${packs ? 'packed' : 'not packed'}`);
    t.equal(stageWeightBreakdown(dir, plan, {}, budget).panels, packs ? panels : 0, 'as the plan says');
    freeStageWeights(w);
  }
});

t.test('the 1b preset in NF4: what its base takes (estimate, the allocator is exact as above)', async (t) => {
  const config = PRESETS['1b'];
  const dir = { config, dir: '1b', isQuantized: () => false } as unknown as ModelDir;
  const plan = { lo: 0, hi: config.numLayers, first: true, last: true };
  const bf16 = stageWeightBreakdown(dir, plan);
  const nf4 = stageWeightBreakdown(dir, plan, { quantize: 'nf4' });
  const dq = stageWeightBreakdown(dir, plan, { quantize: 'nf4-dq' });
  t.comment(
    `1b base: bf16 ${(bf16.linears + bf16.other) / 1e9} GB; nf4 linears ${nf4.linears / 1e9} GB + embeddings/head/norms (bf16) ${nf4.other / 1e9} GB; nf4-dq linears ${dq.linears / 1e9} GB`,
  );
  t.ok(
    dq.linears + dq.other - 2 * config.vocabSize * config.hiddenSize * 2 <= 0.7e9,
    'the quantized part of the base (decoder layers) in nf4-dq is ≤ 0.7 GB',
  );
  t.ok(nf4.linears <= 0.56e9, `nf4 decoder linears ${nf4.linears} ≤ 0.56 GB (4.5 bits per weight)`);
  t.ok(nf4.linears < bf16.linears / 3.5, 'nf4 linears are < 1/3.5 of their bf16 size');
});

for (const [recompute, quantize] of [
  [false, undefined],
  [true, undefined],
  [false, 'nf4'],
] as const)
  t.test(
    `adapter, activation and scratch bytes equal the allocator counts${recompute ? ' (recompute)' : ''}${quantize ? ` (${quantize} base)` : ''}`,
    async (t) => {
      const model = await tinyModel();
      const dir = tmpDir(t);
      const sup = await Supervisor.start({ ...RUN_DEFAULTS, model, recompute, ...(quantize ? { quantize } : {}) });
      t.teardown(() => sup.close());
      const lp = sup.pipeline as LocalPipeline;
      const st = lp.stages[0]!;
      const dev = st.device;
      const env = { modelDir: model, model: openModelDir(model).config };
      const cfgs = [
        parseAdapterConfig({
          name: 'a',
          data: demoData(dir, 'arithmetic', 8),
          seq_len: 256,
          batch_size: 2,
          lora: { r: 4, targets: ['q_proj', 'v_proj'], dropout: 0 },
        }),
        parseAdapterConfig({
          name: 'b',
          data: demoData(dir, 'capitals', 8),
          seq_len: 256,
          batch_size: 3,
          lora: { r: 8, targets: ['o_proj', 'gate_proj', 'down_proj'], dropout: 0.1 },
        }),
        parseAdapterConfig({
          name: 'c',
          data: demoData(dir, 'sentiment', 4),
          seq_len: 256,
          batch_size: 1,
          lora: { r: 16, targets: ['k_proj', 'up_proj'], use_rslora: true },
        }),
      ];
      const jobs = [];
      for (const [i, c] of cfgs.entries()) {
        const p = await prepareJob(env, c);
        const u0 = dev.memory().used;
        await lp.addAdapter(i + 1, p.spec, p.initial);
        const got = dev.memory().used - u0;
        t.equal(got, lp.adapterBytes(p.spec)[0], `adapter ${c.name} (r ${p.spec.r}): ${got} bytes = adapterBytes`);
        jobs.push({ id: i + 1, p });
      }
      for (let k = 0; k < 3; k++) {
        const parts = jobs.map((j) => ({ adapter: j.id, mb: j.p.source.next()!, spec: j.p.spec }));
        const N = parts.reduce((s, p) => s + p.mb.numTokens, 0);
        const nseq = parts.reduce((s, p) => s + p.mb.cuSeqlens.length - 1, 0);
        const data = assemble(
          100 + k,
          parts.map((p) => ({ ...p, serial: microSerial(p.mb) })),
          N,
        );
        const segs = parts.map((p) => ({ rows: p.mb.numTokens, spec: p.spec }));
        const est = lp.activationBytes(N, segs, nseq)[0]!;
        dev.resetPeak();
        const before = dev.memory().used;
        await lp.train(data);
        const m = dev.memory();
        const peak = m.peak - before;
        const grown = m.used - before;
        t.equal(
          peak,
          est,
          `micro-batch ${k + 1} (${N} tokens, ${nseq} sequences): peak +${peak} = activationBytes ${est} (scratch ${st.scratchBytes(N)}, work ${st.workBytes(N, segs)} of it)`,
        );
        if (recompute)
          t.ok(
            st.activationBytes(N, segs) < est - st.scratchBytes(N) - st.workBytes(N, segs),
            `recompute keeps ${st.activationBytes(N, segs)} bytes between forward and backward`,
          );
        t.equal(grown, 0, `micro-batch ${k + 1}: afterwards nothing stays (scratch included); nothing waits for GC`);
      }
    },
  );
