// A preset's model directory without its weights, for a machine where Python on the GPU draws
// them in seconds while `mlora make-model` would take minutes for the 1b preset (its seeded
// normal draws run on one CPU core):
//   node dist/scripts/device/model-layout.js --preset 1b --out DIR [--dtype bf16]
// writes DIR/config.json, tokenizer.json + tokenizer_config.json, and DIR/tensors.json (every
// tensor the model must hold: name → shape, as mlora reads them); then
//   python3 scripts/device/make_weights.py DIR
// writes DIR/model.safetensors with those tensors (normal(0, 0.02), norms 1, the config's dtype).
// The weights differ from make-model's (another random stream): benchmarks only need the shapes.
import fs from 'node:fs';
import path from 'node:path';
import { parseArgs } from 'node:util';
import { PRESETS, type PresetName } from '../../lib/model/config.js';
import { parseModelConfig } from '../../lib/io/hf-config.js';
import { expectedTensors } from '../../lib/io/hf-tensors.js';
import { writeTokenizerFiles } from '../../lib/data/bpe.js';
import { presetConfigJson, presetDtype } from '../cli/make-model.js';

async function main(): Promise<number> {
  const { values: a } = parseArgs({
    options: { preset: { type: 'string' }, out: { type: 'string' }, dtype: { type: 'string' } },
  });
  const preset = a.preset as PresetName | undefined;
  if (!preset || !(preset in PRESETS) || !a.out) {
    console.error(`model-layout: --preset (${Object.keys(PRESETS).join(', ')}) and --out DIR are required`);
    return 2;
  }
  const dtype = (a.dtype ?? presetDtype(preset)) as 'f32' | 'bf16';
  if (dtype !== 'f32' && dtype !== 'bf16') {
    console.error(`model-layout: --dtype must be f32 or bf16, got '${a.dtype}'`);
    return 2;
  }
  const json = presetConfigJson(preset, dtype);
  const config = parseModelConfig(json, `preset ${preset}`);
  fs.mkdirSync(a.out, { recursive: true });
  await writeTokenizerFiles(a.out, { vocabSize: config.vocabSize, modelMaxLength: config.maxPositionEmbeddings });
  fs.writeFileSync(
    path.join(a.out, 'tensors.json'),
    JSON.stringify(Object.fromEntries(expectedTensors(config)), null, 1) + '\n',
  );
  fs.writeFileSync(path.join(a.out, 'config.json'), JSON.stringify(json, null, 2) + '\n');
  console.log(
    `model-layout: ${preset} (${dtype}) config, tokenizer and tensors.json in ${a.out}; weights: python3 scripts/device/make_weights.py ${a.out}`,
  );
  return 0;
}

main().then(
  (c) => (process.exitCode = c),
  (e: unknown) => {
    console.error(`model-layout: ${(e as Error).message}`);
    process.exitCode = 1;
  },
);
