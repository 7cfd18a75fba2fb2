// Quantized bases and bf16 compute against independent float64 implementations:
//  1. test/fixtures/quant: a tiny LLaMA saved quantized by the bitsandbytes rules (nf4, nf4 with
//     double quantization, int8 row-wise), with the float64 numbers of the dequantized model +
//     a PEFT adapter (README there: layouts with source lines). The dequantized weights must be
//     bit for bit; loss, loss without the adapter, logits and every LoRA gradient within the
//     f32-vs-f64 tolerance of reference.test.ts (the compute is f32 on the dequantized weights).
//  2. quantize-at-load (config quantize) of the unquantized fixture model gives the bytes
//     bitsandbytes stored (nf4, int8; nf4-dq: the 4-bit codes and the statistics to one ulp).
//  3. compute_dtype bf16 on test/fixtures/llama-tiny and on the nf4 fixture, within a bf16
//     tolerance (below).
import t, { type Test } from 'tap';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { openModelDir } from '../../lib/io/hf-model.js';
import { openSafetensors } from '../../lib/io/safetensors.js';
import { quantLayout, type QuantizeMode } from '../../lib/io/bnb.js';
import type { StageOptions } from '../../lib/model/stage.js';
import type { LoadWeightsOptions } from '../../lib/model/weights.js';
import { assertClose, cpuDevice } from '../support/helpers.js';
import { assertLoraGrads, first4, fixtureBatch, loraGrads, readRef, setupFixture, type FixtureRef } from './fixture.js';

const here = path.dirname(fileURLToPath(import.meta.url));
const quant = path.resolve(here, '../../../test/fixtures/quant');
const tiny = path.resolve(here, '../../../test/fixtures/llama-tiny');

interface Tol {
  loss: { atol: number; rtol: number };
  logits: { atol: number; rtol: number };
  /** gradients: atol as a fraction of the tensor's largest |gradient| */
  grad: { atol: number; rtol: number };
}
// f32 compute: as reference.test.ts (that implementation's own f32 run is ~3e-7 from its f64 one).
const F32: Tol = {
  loss: { atol: 1e-6, rtol: 2e-6 },
  logits: { atol: 2e-5, rtol: 1e-4 },
  grad: { atol: 2e-5, rtol: 1e-4 },
};
// bf16 compute: every frozen GEMM rounds both operands to 8 significant bits (relative error
// 2⁻⁹ each), so a logit or hidden value errs by ~2⁻⁸·√k·(typical term) before the f32 sum;
// measured here: loss ~1e-4 relative, logits ~2e-3 absolute, gradients ~1e-2 of their largest.
// Stated tolerance (5-10× the measured): loss 1e-3 relative, logits 1e-2 absolute, gradients 5e-2
// of the tensor's largest element. A wrong kernel (a dropped or doubled term) is off by O(1).
const BF16: Tol = { loss: { atol: 0, rtol: 1e-3 }, logits: { atol: 1e-2, rtol: 0 }, grad: { atol: 5e-2, rtol: 0 } };

async function checkModel(
  t: Test,
  modelDir: string,
  adapterDir: string,
  refDir: string,
  tol: Tol,
  options: StageOptions = {},
  load: LoadWeightsOptions = {},
) {
  const ref: FixtureRef = readRef(path.join(refDir, 'ref.json'));
  const { config, program, spec, device } = await setupFixture(modelDir, adapterDir, 2, options, load);
  const { mb, tokens, count } = fixtureBatch(program, ref.input_ids, ref.labels);
  const { got, want } = first4(await program.logits(mb, tokens), ref, config.vocabSize);
  assertClose(t, got, want, tol.logits, 'logits of the first 4 positions (with the adapter)');
  const losses = await program.trainLast(mb, tokens);
  assertClose(t, [losses.reduce((a, b) => a + b, 0) / count], [ref.loss], tol.loss, 'loss with the adapter');
  assertLoraGrads(t, loraGrads(program, spec), path.join(refDir, 'grads.safetensors'), config.numLayers, tol.grad);
  if (ref.loss_no_adapter !== undefined) {
    const base = fixtureBatch(program, ref.input_ids, ref.labels, false); // no segment: the base model alone
    const l = (await program.evaluate(base.mb, base.tokens))!;
    assertClose(
      t,
      [l.reduce((a, b) => a + b, 0) / base.count],
      [ref.loss_no_adapter],
      tol.loss,
      'loss without the adapter',
    );
  }
  program.free();
  return device;
}

const variants: Array<[string, QuantizeMode | undefined]> = [
  ['f32', undefined],
  ['nf4', 'nf4'],
  ['nf4-dq', 'nf4-dq'],
  ['int8', 'int8'],
];

for (const [v, mode] of variants) {
  t.test(
    `${v}: the checkpoint bitsandbytes saved${mode ? ' (dequantized bit for bit)' : ''}, eval and every LoRA gradient vs float64`,
    async (t) => {
      const modelDir = path.join(quant, v === 'f32' ? 'model' : `${v}/model`);
      const dir = openModelDir(modelDir);
      t.equal(dir.quantization, mode, `quantization_config: ${mode ?? 'none'}`);
      t.same(
        dir.extraTensors,
        [],
        'every companion tensor (absmax, quant_map, quant_state, SCB, ...) is accounted for',
      );
      if (mode) {
        const d = cpuDevice(2);
        const deq = openSafetensors(path.join(quant, v, 'dequantized.safetensors'));
        let bad = 0;
        for (const name of deq.tensors.keys()) {
          const w = await dir.loadTensor(d, name);
          const out = d.alloc('f32', w.shape);
          await d.run([{ op: 'dequantize', dst: out, src: w }]);
          const got = out.read() as Float32Array;
          const want = deq.readF32(name);
          for (let i = 0; i < got.length; i++) if (!Object.is(got[i], want[i])) bad++;
          w.free();
          out.free();
        }
        t.equal(
          bad,
          0,
          `all ${deq.tensors.size} dequantized linears are bit-identical to bitsandbytes' dequantization`,
        );
      }
      await checkModel(t, modelDir, path.join(quant, 'adapter'), path.join(quant, v), F32);
    },
  );
}

for (const mode of ['nf4', 'int8', 'nf4-dq'] as const) {
  t.test(`quantize: ${mode} at load gives the bytes bitsandbytes stored`, async (t) => {
    const d = cpuDevice(2);
    const plain = openModelDir(path.join(quant, 'model'));
    const saved = openModelDir(path.join(quant, `${mode}/model`));
    const dt = mode === 'nf4-dq' ? 'nf4dq' : mode;
    for (const name of [
      'model.layers.0.self_attn.q_proj.weight',
      'model.layers.1.mlp.down_proj.weight',
      'model.layers.1.self_attn.k_proj.weight',
    ]) {
      const src = await plain.loadTensor(d, name);
      const mine = d.alloc(dt, src.shape);
      await d.run([{ op: 'quantize', dst: mine, src }]);
      const theirs = await saved.loadTensor(d, name);
      const a = mine.read() as Uint8Array;
      const b = theirs.read() as Uint8Array;
      const L = quantLayout(dt, src.shape[0]!, src.shape[1]!);
      if (mode !== 'nf4-dq') {
        t.same(a, b, `${name}: the whole blob (codes + ${mode === 'int8' ? 'SCB' : 'absmax'})`);
      } else {
        // the 4-bit codes are the same; the double-quant statistics come from a float32 mean
        // (summation order) and a generated code table, so they may differ by an ulp
        t.same(a.subarray(0, L.absmax), b.subarray(0, L.absmax), `${name}: the 4-bit codes`);
        const fa = new Float32Array(a.buffer, a.byteOffset + L.offset, 1)[0]!;
        const fb = new Float32Array(b.buffer, b.byteOffset + L.offset, 1)[0]!;
        t.ok(Math.abs(fa - fb) <= 2 * 2 ** -23 * Math.abs(fb), `${name}: the mean offset ${fa} ≈ ${fb}`);
        let far = 0;
        for (let i = 0; i < L.blocks; i++) if (Math.abs(a[L.absmax + i]! - b[L.absmax + i]!) > 1) far++;
        t.equal(far, 0, `${name}: every 8-bit absmax code within one step`);
      }
      for (const x of [src, mine, theirs]) x.free();
    }
    // and the whole model quantized at load: the same numbers as the saved checkpoint's reference
    await checkModel(
      t,
      path.join(quant, 'model'),
      path.join(quant, 'adapter'),
      path.join(quant, mode),
      F32,
      {},
      { quantize: mode },
    );
  });
}

t.test('a pre-quantized checkpoint refuses a different quantize', async (t) => {
  const d = cpuDevice(1);
  const { loadStageWeights } = await import('../../lib/model/weights.js');
  await t.rejects(
    loadStageWeights(
      d,
      path.join(quant, 'nf4/model'),
      { lo: 0, hi: 1, first: true, last: false },
      { quantize: 'int8' },
    ),
    /saved quantized as nf4.*quantize: int8 cannot re-quantize/,
  );
});

t.test('compute_dtype bf16: llama-tiny within the bf16 tolerance', async (t) => {
  await checkModel(
    t,
    path.join(tiny, 'model'),
    path.join(tiny, 'adapter'),
    tiny,
    BF16,
    { computeDtype: 'bf16' },
    { computeDtype: 'bf16' },
  );
});

t.test('compute_dtype bf16 on the nf4-dq base (the QLoRA setting) within the bf16 tolerance', async (t) => {
  await checkModel(
    t,
    path.join(quant, 'nf4-dq/model'),
    path.join(quant, 'adapter'),
    path.join(quant, 'nf4-dq'),
    BF16,
    { computeDtype: 'bf16' },
    { computeDtype: 'bf16' },
  );
});
