// Tiny seeded LLaMA models for the tests that need a whole model directory (config, weights,
// tokenizer). Made by the same code as `mlora make-model`.
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { PRESETS } from '../../lib/model/config.js';
import { writeRandomLlama } from '../../lib/io/random-model.js';
import { writeTokenizerFiles } from '../../lib/data/bpe.js';
import { ensureModel, makeModel } from '../../scripts/cli/make-model.js';
import { openModelDir } from '../../lib/io/hf-model.js';
import { balanceSplit } from '../../lib/schedule/split.js';
import type { ActorPipelineOptions } from '../../actors/runtime.js';

const CACHE = path.join(os.tmpdir(), 'mlora-test-models');

/**
 * The tiny preset (2 layers, hidden 64, vocab 512), made once per machine and seed in a shared
 * cache. Test files run at once and may race to make it: the loser of a rename retries.
 */
export async function tinyModel(seed = 7): Promise<string> {
  for (let i = 0; ; i++) {
    try {
      return await ensureModel(CACHE, 'tiny', seed);
    } catch (e) {
      if (i >= 20) throw e;
      await new Promise((r) => setTimeout(r, 250));
    }
  }
}

/** The tiny preset with `numLayers` layers (and `vocabSize` tokens), fresh in a temporary folder of its own. */
export async function tinyModelWithLayers(
  numLayers: number,
  seed = 7,
  vocabSize = PRESETS.tiny.vocabSize,
): Promise<string> {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'mlora-actors-'));
  const config = { ...PRESETS.tiny, numLayers, vocabSize };
  await writeTokenizerFiles(dir, { vocabSize: config.vocabSize, modelMaxLength: config.maxPositionEmbeddings });
  writeRandomLlama(dir, config, { seed });
  return dir;
}

/** The tiny preset made in `dir` (a model the test owns and may change or delete; about 0.3 s). */
export async function tinyModelIn(dir: string, seed = 0): Promise<string> {
  await makeModel(dir, 'tiny', seed);
  return dir;
}

/** An actor pipeline of `model` over two CPU stages of one thread each (256 MiB each), for the runtime tests. */
export function twoStageOptions(model: string, extra: Partial<ActorPipelineOptions> = {}): ActorPipelineOptions {
  const config = openModelDir(model).config;
  return {
    modelDir: model,
    config,
    plans: balanceSplit(config, [1, 1]).plans,
    devices: ['cpu:0', 'cpu:1'],
    threads: [1, 1],
    budgets: [2 ** 28, 2 ** 28],
    maxTokens: 64,
    inflight: 2,
    ...extra,
  };
}
