// mlora merge --model DIR --adapter DIR --out DIR [--dtype f32|bf16|f16] [--max-shard-size SIZE]
// Folds a PEFT LoRA adapter into its base model (W + scale·B·A) and writes a plain Hugging
// Face model directory that needs no PEFT to load (lib/io/merge.ts).
import { parseCommandArgs, usageError, type Command } from './args.js';
import { DEFAULT_MAX_SHARD_BYTES, mergeAdapter, parseShardSize, type MergeDType } from '../../lib/io/merge.js';

const USAGE = `usage: mlora merge --model DIR --adapter DIR --out DIR [--dtype f32|bf16|f16] [--max-shard-size SIZE]

  --model DIR            the base model (Hugging Face directory)
  --adapter DIR          a PEFT LoRA adapter trained on it (adapter_config.json + adapter_model.safetensors)
  --out DIR              where the merged model goes (a new or empty directory)
  --dtype D              storage dtype of the merged weights (default: the base's own)
  --max-shard-size SIZE  shard the weights above this size, e.g. 5GB, 200MB, 10KiB (default 5GB, as transformers)`;

const CMD: Command = { name: 'merge', usage: USAGE };

export async function main(argv: string[]): Promise<number> {
  const a = parseCommandArgs(CMD, argv, {
    model: { type: 'string' },
    adapter: { type: 'string' },
    out: { type: 'string' },
    dtype: { type: 'string' },
    'max-shard-size': { type: 'string' },
  });
  if (typeof a === 'number') return a;
  const { model, adapter, out } = a.values;
  if (!model || !adapter || !out) return usageError(CMD, '--model, --adapter and --out are required');
  const dtype = a.values.dtype;
  if (dtype !== undefined && dtype !== 'f32' && dtype !== 'bf16' && dtype !== 'f16')
    return usageError(CMD, `--dtype must be f32, bf16 or f16, got '${dtype}'`);
  let maxShardBytes = DEFAULT_MAX_SHARD_BYTES;
  if (a.values['max-shard-size'] !== undefined) {
    try {
      maxShardBytes = parseShardSize(a.values['max-shard-size']);
    } catch (e) {
      return usageError(CMD, `--max-shard-size: ${(e as Error).message}`);
    }
  }
  const t = performance.now();
  const r = mergeAdapter(model, adapter, out, { maxShardBytes, ...(dtype ? { dtype: dtype as MergeDType } : {}) });
  console.log(
    `merged ${adapter} into ${model} (scale ${r.scale}): ${r.merged} projection(s) of ${r.tensors} tensors; wrote ${out}: ` +
      `${r.weightFiles.join(', ')}${r.copied.length ? ` + ${r.copied.join(', ')}` : ''} in ${((performance.now() - t) / 1000).toFixed(1)} s`,
  );
  return 0;
}
