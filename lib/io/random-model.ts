// Seeded random LLaMAs in the real HF layout (what `mlora make-model` and the tests' model
// fixtures write): config.json, the weights (one file or shards + index) and
// generation_config.json, each tensor drawn from its own seeded stream with HF's init. Its own
// file: it is a producer of model directories, built on the reader's pieces (hf-config.ts,
// hf-tensors.ts, writeWeightFiles), not part of reading one.
import fs from 'node:fs';
import path from 'node:path';
import type { LlamaConfig } from '../model/config.js';
import { Rng } from '../rng.js';
import { f32ToBf16, f32ToF16 } from './dtype.js';
import { describe, parseModelConfig, toHfConfigJson } from './hf-config.js';
import { isWeightFile, writeWeightFiles } from './hf-model.js';
import { expectedTensors } from './hf-tensors.js';
import { numel, writeFileAtomic, type StDType, type StTensorSource } from './safetensors.js';

export interface RandomLlamaOptions {
  seed: number;
  dtype?: 'f32' | 'bf16' | 'f16';
  /** Split the weights into shards of at most this many bytes (a larger tensor goes alone) + an index. */
  shardBytes?: number;
}

const DTYPE_INFO = {
  f32: { st: 'F32' as StDType, torch: 'float32' },
  bf16: { st: 'BF16' as StDType, torch: 'bfloat16' },
  f16: { st: 'F16' as StDType, torch: 'float16' },
};

/** The HF init of one tensor (normal std 0.02 for weights and biases, ones for norms), from its own Rng stream. */
export function initTensor(seed: number, name: string, shape: readonly number[]): Float32Array {
  const out = new Float32Array(numel(shape));
  if (name.endsWith('norm.weight')) return out.fill(1);
  return new Rng(seed, 'init', name).fillNormal(out, 0.02);
}

/**
 * Writes a seeded random LLaMA in the real HF layout: config.json, model.safetensors (or
 * model-0000i-of-0000n.safetensors + model.safetensors.index.json when `shardBytes` is set)
 * and generation_config.json. Each tensor is drawn from its own stream (seed, 'init', name),
 * so it is reproducible on its own. Tensors are made one at a time while writing. Old weight
 * files of another layout in DIR are removed (as save_pretrained does); the tokenizer is not
 * written here.
 */
export function writeRandomLlama(dir: string, config: LlamaConfig, options: RandomLlamaOptions): void {
  const dt = DTYPE_INFO[options.dtype ?? 'f32'];
  if (!dt) throw new Error(`writeRandomLlama: dtype must be f32, bf16 or f16, got ${describe(options.dtype)}`);
  const cfg: LlamaConfig = { ...config, torchDtype: dt.torch };
  parseModelConfig(toHfConfigJson(cfg), 'writeRandomLlama config'); // the config must be one we can read back
  fs.mkdirSync(dir, { recursive: true });

  const sources: Array<[string, StTensorSource]> = [...expectedTensors(cfg)].map(([name, shape]) => [
    name,
    {
      dtype: dt.st,
      shape,
      data: () => {
        const f = initTensor(options.seed, name, shape);
        return dt.st === 'F32' ? f : dt.st === 'BF16' ? f32ToBf16(f) : f32ToF16(f);
      },
    },
  ]);
  if (options.shardBytes !== undefined && !(options.shardBytes > 0))
    throw new Error(`writeRandomLlama: shardBytes must be positive, got ${options.shardBytes}`);
  const written = writeWeightFiles(
    dir,
    sources,
    options.shardBytes === undefined ? {} : { shardBytes: options.shardBytes, alwaysIndex: true },
  );
  // Old weights of another layout would shadow or confuse the new ones.
  for (const f of fs.readdirSync(dir)) {
    if (isWeightFile(f) && !written.has(f)) fs.rmSync(path.join(dir, f), { force: true });
  }
  writeFileAtomic(path.join(dir, 'config.json'), JSON.stringify(toHfConfigJson(cfg), null, 2) + '\n');
  writeFileAtomic(
    path.join(dir, 'generation_config.json'),
    JSON.stringify(
      { _from_model_config: true, bos_token_id: cfg.bosTokenId ?? 1, eos_token_id: cfg.eosTokenId ?? 2 },
      null,
      2,
    ) + '\n',
  );
}
