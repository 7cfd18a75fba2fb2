// The reference fixtures' model + PEFT adapter on one CPU stage, and their 2-row batch (ref.json
// input_ids/labels) packed as two sequences of one adapter: shared by the tests that compare the
// whole model with an independent float64 implementation (llama-tiny, quant).
import path from 'node:path';
import { readFileSync } from 'node:fs';
import { openModelDir } from '../../lib/io/hf-model.js';
import { loadAdapter } from '../../lib/io/peft.js';
import { loadStageWeights, type LoadWeightsOptions } from '../../lib/model/weights.js';
import { StageProgram, type MicroBatch, type StageOptions } from '../../lib/model/stage.js';
import { fromAdapterWeights } from '../../lib/lora/state.js';
import type { LoraSpec } from '../../lib/lora/adapter.js';
import type { Tensor } from '../../lib/tensor.js';
import { assemble } from '../../actors/supervisor.js';
import { cpuDevice } from '../helpers.js';

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
export async function setupFixture(modelDir: string, adapterDir: string, threads = 1, options: StageOptions = {}, load: LoadWeightsOptions = {}) {
  const dir = openModelDir(modelDir);
  const config = dir.config;
  const device = cpuDevice(threads);
  const plan = { lo: 0, hi: config.numLayers, first: true, last: true };
  const weights = await loadStageWeights(device, dir, plan, load);
  const program = new StageProgram(device, config, plan, weights, options);
  const ad = loadAdapter(adapterDir);
  const spec: LoraSpec = { r: ad.r, alpha: ad.loraAlpha, dropout: 0, targets: ad.targetModules, useRslora: ad.useRslora, seed: 0 };
  const flat = fromAdapterWeights(config, spec, ad, 'adapter');
  program.addAdapter(1, spec, flat);
  return { dir, config, device, program, spec, flat, weights };
}

/** The fixture batch (2 rows) packed as two sequences of `adapter`; count = target tokens. */
export function fixtureBatch(program: StageProgram, ref: FixtureRef, adapter = 1): { mb: MicroBatch; tokens: Tensor; count: number } {
  const ids = ref.input_ids.flat();
  const labels = ref.labels.flat();
  const T = ref.input_ids[0]!.length;
  let count = 0;
  for (const row of ref.labels) for (let i = 1; i < row.length; i++) if (row[i] !== -100) count++;
  const data = assemble(
    7,
    [{ adapter, serial: 0, mb: {
      step: 0, microIndex: 0, microCount: 1, inputIds: Int32Array.from(ids), labels: Int32Array.from(labels),
      cuSeqlens: Int32Array.from([0, T, 2 * T]), positions: Int32Array.from([...Array(T).keys(), ...Array(T).keys()]),
      numTokens: 2 * T, numTargetTokens: count, stepTargetTokens: count, lastOfStep: true,
    } }],
    2 * T,
  );
  const d = program.device;
  const N = 2 * T;
  const mb: MicroBatch = {
    id: 7, numTokens: N, segments: data.segments,
    tensors: {
      positions: d.fromArray('i32', [N], data.positions), cuSeqlens: d.fromArray('i32', [3], data.cuSeqlens),
      targets: d.fromArray('i32', [N], data.targets), weights: d.fromArray('f32', [N], data.weights),
    },
  };
  return { mb, tokens: d.fromArray('i32', [N], data.tokens), count };
}

/** logits[b, p, :] for the first 4 positions of both rows, flattened as ref.logits_first4 is. */
export function first4(logits: Float32Array, ref: FixtureRef, vocab: number): { got: number[]; want: number[] } {
  const T = ref.input_ids[0]!.length;
  const got: number[] = [];
  const want: number[] = [];
  for (let b = 0; b < 2; b++) for (let p = 0; p < 4; p++) for (let v = 0; v < vocab; v++) {
    want.push(ref.logits_first4[b]![p]![v]!);
    got.push(logits[(b * T + p) * vocab + v]!);
  }
  return { got, want };
}
