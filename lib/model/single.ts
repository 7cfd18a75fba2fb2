// A whole model on one device, for the evaluation and generation tools (and tests): the
// base weights in one stage, optionally one PEFT adapter, and helpers to run packed batches.
import type { Device, Tensor } from '../tensor.js';
import { openDevice } from '../tensor.js';
import { openModelDir, type ModelDir } from '../io/hf-model.js';
import { checkAdapterAgainstModel, loadAdapter } from '../io/peft.js';
import { fromAdapterWeights } from '../lora/state.js';
import type { LoraSpec } from '../lora/adapter.js';
import { loadStageWeights } from './weights.js';
import { StageProgram, type MicroBatch } from './stage.js';
import type { LlamaConfig } from './config.js';

export const ADAPTER_ID = 1;

export interface SingleModel {
  dir: ModelDir;
  config: LlamaConfig;
  device: Device;
  program: StageProgram;
  /** Segments to use for rows that should see the adapter (empty without one). */
  hasAdapter: boolean;
  free(): void;
}

export async function openSingleModel(
  modelDir: string,
  adapterDir?: string,
  options: { device?: string; threads?: number } = {},
): Promise<SingleModel> {
  const dir = openModelDir(modelDir);
  const config = dir.config;
  const device = openDevice(options.device ?? 'cpu:0', { threads: options.threads ?? 1 });
  const plan = { lo: 0, hi: config.numLayers, first: true, last: true };
  const program = new StageProgram(device, config, plan, await loadStageWeights(device, dir, plan));
  let hasAdapter = false;
  if (adapterDir) {
    addPeftAdapter(program, adapterDir, ADAPTER_ID, modelDir);
    hasAdapter = true;
  }
  return { dir, config, device, program, hasAdapter, free: () => program.free() };
}

/**
 * Adds the PEFT adapter in `adapterDir` to `program` as adapter `id`, for inference or for
 * checking gradients against a reference: no dropout (seed 0 then draws nothing). Checked
 * against the program's config first (`modelLabel` names the model in the error).
 */
export function addPeftAdapter(
  program: StageProgram,
  adapterDir: string,
  id: number,
  modelLabel = 'the base model',
): { spec: LoraSpec; flat: Float32Array } {
  const ad = loadAdapter(adapterDir);
  checkAdapterAgainstModel(ad, program.config, modelLabel);
  const spec: LoraSpec = {
    r: ad.r,
    alpha: ad.loraAlpha,
    dropout: 0,
    targets: ad.targetModules,
    useRslora: ad.useRslora,
    seed: 0,
  };
  const flat = fromAdapterWeights(program.config, spec, ad, adapterDir);
  program.addAdapter(id, spec, flat);
  return { spec, flat };
}

export interface PackedRows {
  tokens: Int32Array;
  positions: Int32Array;
  cuSeqlens: Int32Array;
  targets: Int32Array;
}

/** Packs sequences (with HF labels, −100 = ignored) into one micro-batch with shifted targets. */
export function packSequences(seqs: Array<{ inputIds: ArrayLike<number>; labels?: ArrayLike<number> }>): PackedRows {
  const N = seqs.reduce((s, q) => s + q.inputIds.length, 0);
  const tokens = new Int32Array(N),
    positions = new Int32Array(N),
    targets = new Int32Array(N).fill(-100);
  const cu = new Int32Array(seqs.length + 1);
  let r = 0;
  seqs.forEach((q, i) => {
    cu[i] = r;
    const labels = q.labels ?? q.inputIds;
    for (let j = 0; j < q.inputIds.length; j++) {
      tokens[r + j] = q.inputIds[j]!;
      positions[r + j] = j;
      if (j + 1 < q.inputIds.length && labels[j + 1] !== -100) targets[r + j] = labels[j + 1]!;
    }
    r += q.inputIds.length;
  });
  cu[seqs.length] = N;
  return { tokens, positions, cuSeqlens: cu, targets };
}

/** Device tensors for a packed batch on a single-stage model; free with freeBatch. */
export function batchOnDevice(m: SingleModel, p: PackedRows, id: number): { mb: MicroBatch; tokens: Tensor } {
  const d = m.device;
  const N = p.tokens.length;
  const mb: MicroBatch = {
    id,
    numTokens: N,
    segments: m.hasAdapter ? [{ adapter: ADAPTER_ID, rowStart: 0, rowEnd: N, serial: 0 }] : [],
    tensors: {
      positions: d.fromArray('i32', [N], p.positions),
      cuSeqlens: d.fromArray('i32', [p.cuSeqlens.length], p.cuSeqlens),
      targets: d.fromArray('i32', [N], p.targets),
      weights: d.fromArray('f32', [N], new Float32Array(N).fill(1)),
    },
  };
  return { mb, tokens: d.fromArray('i32', [N], p.tokens) };
}

export function freeBatch(b: { mb: MicroBatch; tokens: Tensor }): void {
  for (const t of Object.values(b.mb.tensors)) t?.free();
  b.tokens.free();
}
