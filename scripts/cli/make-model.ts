// mlora make-model --preset tiny|small|bench|1b|tiny-llama3|tiny-qwen2|tiny-qwen3|tiny-mistral --out DIR [--seed N] [--dtype f32|bf16]
// A seeded random LLaMA-architecture model (llama, or a family: Llama 3 RoPE scaling, Qwen2, Qwen3, Mistral) in the real Hugging Face layout (config.json, model.safetensors,
// generation_config.json, tokenizer.json + tokenizer_config.json with a real byte-level BPE),
// so tests, demos and benchmarks need no download.
import fs from 'node:fs';
import { randomBytes } from 'node:crypto';
import path from 'node:path';
import { badNumber, numberOption, parseCommandArgs, usageError, type Command } from './args.js';
import { PRESETS, type PresetName } from '../../lib/model/config.js';
import { toHfConfigJson, writeRandomLlama } from '../../lib/io/hf-model.js';
import { writeTokenizerFiles } from '../../lib/data/tokenizer.js';

/** The storage dtype a preset is written in unless --dtype says otherwise (1b: bf16). */
export function presetDtype(preset: PresetName): 'f32' | 'bf16' {
  return PRESETS[preset].torchDtype === 'bfloat16' ? 'bf16' : 'f32';
}

/** The config.json `makeModel` writes for a preset (without writing anything). */
export function presetConfigJson(
  preset: PresetName,
  dtype: 'f32' | 'bf16' = presetDtype(preset),
): Record<string, unknown> {
  return toHfConfigJson({ ...PRESETS[preset], torchDtype: dtype === 'bf16' ? 'bfloat16' : 'float32' });
}

export async function makeModel(
  dir: string,
  preset: PresetName,
  seed: number,
  dtype: 'f32' | 'bf16' = presetDtype(preset),
): Promise<void> {
  const config = { ...PRESETS[preset], torchDtype: dtype === 'bf16' ? 'bfloat16' : 'float32' };
  fs.mkdirSync(dir, { recursive: true });
  // Tokenizer first: config.json written last marks the directory complete.
  await writeTokenizerFiles(dir, { vocabSize: config.vocabSize, modelMaxLength: config.maxPositionEmbeddings });
  writeRandomLlama(dir, config, { seed, dtype, ...(preset === '1b' ? { shardBytes: 2 ** 30 } : {}) });
}

/** The model in the cache folder, made once (a complete dir has config.json and tokenizer.json). */
export async function ensureModel(
  cache: string,
  preset: PresetName,
  seed: number,
  log: (s: string) => void = () => {},
): Promise<string> {
  const dir = path.join(cache, `${preset}-seed${seed}`);
  const complete = () =>
    fs.existsSync(path.join(dir, 'config.json')) && fs.existsSync(path.join(dir, 'tokenizer.json'));
  if (complete()) return dir;
  log(`making the ${preset} model (seed ${seed}) in ${dir} (once)`);
  const tmp = `${dir}.tmp-${process.pid}-${randomBytes(4).toString('hex')}`;
  await makeModel(tmp, preset, seed);
  // Several processes may make it at once (test files in parallel): the first rename wins, the
  // others drop their copy (the same seeded files). A complete model is never removed: another
  // process may be reading it.
  try {
    fs.renameSync(tmp, dir);
  } catch (e) {
    if (!complete()) {
      fs.rmSync(dir, { recursive: true, force: true }); // a leftover of an older layout, not a model
      fs.renameSync(tmp, dir);
      return dir;
    }
    fs.rmSync(tmp, { recursive: true, force: true });
    if ((e as NodeJS.ErrnoException).code !== 'ENOTEMPTY' && (e as NodeJS.ErrnoException).code !== 'EEXIST') throw e;
  }
  return dir;
}

const USAGE =
  'usage: mlora make-model --preset tiny|small|bench|1b|tiny-llama3|tiny-qwen2|tiny-qwen3|tiny-mistral --out DIR [--seed N] [--dtype f32|bf16 (default: f32; 1b: bf16)]';

const CMD: Command = { name: 'make-model', usage: USAGE };

export async function main(argv: string[]): Promise<number> {
  const a = parseCommandArgs(CMD, argv, {
    preset: { type: 'string' },
    out: { type: 'string' },
    seed: { type: 'string' },
    dtype: { type: 'string' },
  });
  if (typeof a === 'number') return a;
  const preset = a.values.preset as PresetName | undefined;
  if (!preset || !(preset in PRESETS))
    return usageError(CMD, `--preset must be one of ${Object.keys(PRESETS).join(', ')}`);
  if (!a.values.out) return usageError(CMD, '--out DIR is required');
  const seed = numberOption(a.values.seed, 0, 'non-negative integer');
  if (seed === undefined) return badNumber(CMD, 'seed', a.values.seed, 'non-negative integer');
  const dtype = (a.values.dtype ?? presetDtype(preset)) as 'f32' | 'bf16';
  if (dtype !== 'f32' && dtype !== 'bf16')
    return usageError(CMD, `--dtype must be f32 or bf16, got '${a.values.dtype}'`);
  const t = Date.now();
  await makeModel(a.values.out, preset, seed, dtype);
  const c = PRESETS[preset];
  console.log(
    `wrote ${preset} (${c.modelType === 'llama' ? '' : `${c.modelType}, `}hidden ${c.hiddenSize}, ${c.numLayers} layers, ${c.numHeads}/${c.numKvHeads} heads, vocab ${c.vocabSize}, ${dtype}) to ${a.values.out} in ${((Date.now() - t) / 1000).toFixed(1)} s`,
  );
  return 0;
}
