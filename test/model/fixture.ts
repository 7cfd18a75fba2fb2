// A reference fixture's batch (rows of equal length, HF labels with -100) as one micro-batch of
// one adapter on a stage program, as the supervisor assembles it; the fixture's model + PEFT
// adapter on one CPU stage (not a test file itself).
import { readFileSync } from 'node:fs';
import { assemble } from '../../actors/scheduler/assemble.js';
import { StageProgram, type MicroBatch, type StageOptions } from '../../lib/model/stage.js';
import type { Tensor } from '../../lib/tensor.js';
import { openModelDir } from '../../lib/io/hf-model.js';
import { loadAdapter } from '../../lib/io/peft.js';
import { loadStageWeights, type LoadWeightsOptions } from '../../lib/model/weights.js';
import { fromAdapterWeights } from '../../lib/lora/state.js';
import type { LoraSpec } from '../../lib/lora/adapter.js';
import { cpuDevice } from '../support/helpers.js';

export interface FixtureRef {
  input_ids: number[][];
  labels: number[][];
  loss: number;
  loss_no_adapter?: number;
  logits_first4: number[][][];
}

export function readRef(file: string): FixtureRef {
  return JSON.parse(readFileSync(file, 'utf8')) as FixtureRef;
}

/** A one-stage program over the fixture model with the fixture adapter as adapter 1. */
export async function setupFixture(
  modelDir: string,
  adapterDir: string,
  threads = 1,
  options: StageOptions = {},
  load: LoadWeightsOptions = {},
) {
  const dir = openModelDir(modelDir);
  const config = dir.config;
  const device = cpuDevice(threads);
  const plan = { lo: 0, hi: config.numLayers, first: true, last: true };
  const weights = await loadStageWeights(device, dir, plan, load);
  const program = new StageProgram(device, config, plan, weights, options);
  const ad = loadAdapter(adapterDir);
  const spec: LoraSpec = {
    r: ad.r,
    alpha: ad.loraAlpha,
    dropout: 0,
    targets: ad.targetModules,
    useRslora: ad.useRslora,
    seed: 0,
  };
  const flat = fromAdapterWeights(config, spec, ad, 'adapter');
  program.addAdapter(1, spec, flat);
  return { dir, config, device, program, spec, flat };
}

/** logits[b, p, :] for the first 4 positions of both rows, flattened as ref.logits_first4 is. */
export function first4(logits: Float32Array, ref: FixtureRef, vocab: number): { got: number[]; want: number[] } {
  const T = ref.input_ids[0]!.length;
  const got: number[] = [];
  const want: number[] = [];
  for (let b = 0; b < 2; b++)
    for (let p = 0; p < 4; p++)
      for (let v = 0; v < vocab; v++) {
        want.push(ref.logits_first4[b]![p]![v]!);
        got.push(logits[(b * T + p) * vocab + v]!);
      }
  return { got, want };
}

/**
 * The rows packed as sequences of adapter 1 (`adapter` false: no segment, the base model
 * alone); `count` = the target tokens (the HF loss is their mean).
 */
export function fixtureBatch(
  program: StageProgram,
  inputIds: number[][],
  labelRows: number[][],
  adapter = true,
): { mb: MicroBatch; tokens: Tensor; count: number } {
  const T = inputIds[0]!.length;
  const B = inputIds.length;
  let count = 0;
  for (const row of labelRows) for (let i = 1; i < row.length; i++) if (row[i] !== -100) count++;
  const N = B * T;
  const data = assemble(
    7,
    [
      {
        adapter: 1,
        serial: 0,
        mb: {
          step: 0,
          microIndex: 0,
          microCount: 1,
          inputIds: Int32Array.from(inputIds.flat()),
          labels: Int32Array.from(labelRows.flat()),
          cuSeqlens: Int32Array.from({ length: B + 1 }, (_, b) => b * T),
          positions: Int32Array.from({ length: N }, (_, i) => i % T),
          numTokens: N,
          numTargetTokens: count,
          stepTargetTokens: count,
          lastOfStep: true,
        },
      },
    ],
    N,
  );
  const d = program.device;
  const mb: MicroBatch = {
    id: 7,
    numTokens: N,
    segments: adapter ? data.segments : [],
    tensors: {
      positions: d.fromArray('i32', [N], data.positions),
      cuSeqlens: d.fromArray('i32', [B + 1], data.cuSeqlens),
      targets: d.fromArray('i32', [N], data.targets),
      weights: d.fromArray('f32', [N], data.weights),
    },
  };
  return { mb, tokens: d.fromArray('i32', [N], data.tokens), count };
}
