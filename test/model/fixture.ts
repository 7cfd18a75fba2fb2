// A reference fixture's batch (rows of equal length, HF labels with -100) as one micro-batch of
// one adapter on a stage program, as the supervisor assembles it; the fixture's model + PEFT
// adapter on one CPU stage (not a test file itself).
import { readFileSync } from 'node:fs';
import { StageProgram, type MicroBatch, type StageOptions } from '../../lib/model/stage.js';
import type { Tensor } from '../../lib/tensor.js';
import { openModelDir } from '../../lib/io/hf-model.js';
import { loadStageWeights, type LoadWeightsOptions } from '../../lib/model/weights.js';
import { addPeftAdapter } from '../../lib/model/single.js';
import type { Test } from 'tap';
import { openSafetensors } from '../../lib/io/safetensors.js';
import { toPeftTensors } from '../../lib/lora/state.js';
import { LORA_TARGETS } from '../../lib/model/config.js';
import { assertClose, cpuDevice, type Tolerance } from '../support/helpers.js';
import { packedBatch } from './f64-llama.js';
import type { LoraSpec } from '../../lib/lora/adapter.js';

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
  const { spec, flat } = addPeftAdapter(program, adapterDir, 1);
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
  const b = packedBatch(
    program.device,
    7,
    inputIds.map((ids, i) => ({ ids, labels: labelRows[i]! })),
  );
  return { mb: adapter ? b.mb : { ...b.mb, segments: [] }, tokens: b.tokens, count: b.count };
}

/** Adapter 1's LoRA gradients on `program` by PEFT tensor name, copied (they outlive the program). */
export function loraGrads(program: StageProgram, spec: LoraSpec): Map<string, Float32Array> {
  const out = new Map<string, Float32Array>();
  for (const [name, g] of toPeftTensors(program.config, spec, program.adapter(1).grads.read() as Float32Array))
    out.set(name, Float32Array.from(g.data));
  return out;
}

/**
 * Every LoRA gradient of a `numLayers` model against the float64 ones in `refFile`, within
 * `tol.atol` × the largest element of that tensor (elements near zero carry only rounding
 * noise) and `tol.rtol`; `label` prefixes each assertion.
 */
export function assertLoraGrads(
  t: Test,
  grads: Map<string, Float32Array>,
  refFile: string,
  numLayers: number,
  tol: Tolerance,
  label = '',
): void {
  const ref = openSafetensors(refFile);
  let n = 0;
  for (const [name, g] of grads) {
    const w = ref.read(name) as Float64Array;
    let scale = 0;
    for (const x of w) scale = Math.max(scale, Math.abs(x));
    assertClose(t, g, w, { atol: tol.atol * scale, rtol: tol.rtol }, `${label}${name} vs float64`);
    n++;
  }
  t.equal(n, numLayers * LORA_TARGETS.length * 2, `${label}every LoRA gradient compared`);
}
