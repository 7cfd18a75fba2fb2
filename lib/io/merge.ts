// Merging a PEFT LoRA adapter into its base model: every adapted projection becomes
// W + scale·B·A (scale = lora_alpha/r, or lora_alpha/sqrt(r) with use_rslora, from
// adapter_config.json), and the result is written as a Hugging Face model directory that
// any loader (transformers, vLLM, llama.cpp's converter, mlora) reads without PEFT: the same
// tensor names (extra tensors such as biases copied unchanged), config.json with torch_dtype
// updated, the tokenizer, generation and other non-weight files copied, one
// model.safetensors or shards + model.safetensors.index.json above `maxShardBytes`.
//
// Streaming: the base is read one tensor at a time while its shard is written (the writer
// pulls each tensor's data when it gets to it), so memory holds the adapter (small), one base
// tensor and its merged copy, never the whole model. The result is written into a temp folder
// next to `out` and renamed into place when complete, so `out` never holds half a model.
import fs from 'node:fs';
import path from 'node:path';
import { LORA_TARGETS, projectionModule, type LoraTarget } from '../model/config.js';
import { isWeightFile, openModelDir, writeWeightFiles } from './hf-model.js';
import { ADAPTER_WEIGHTS, adapterMismatches, loadAdapter, type LoraPair } from './peft.js';
import {
  fsyncDir,
  tempSibling,
  writeFileAtomic,
  type StArray,
  type StDType,
  type StTensorSource,
} from './safetensors.js';
import { f32ToBf16, f32ToF16 } from './dtype.js';

export type MergeDType = 'f32' | 'bf16' | 'f16';
const ST_OF: Record<MergeDType, StDType> = { f32: 'F32', bf16: 'BF16', f16: 'F16' };
const TORCH_OF: Record<MergeDType, string> = { f32: 'float32', bf16: 'bfloat16', f16: 'float16' };
const FLOATS: readonly StDType[] = ['F64', 'F32', 'F16', 'BF16'];

/** transformers' save_pretrained default max_shard_size, "5GB" = 5·10⁹ bytes. */
export const DEFAULT_MAX_SHARD_BYTES = 5e9;

/**
 * A size as transformers' max_shard_size takes it: a byte count, or a number with KB/MB/GB
 * (powers of 10) or KiB/MiB/GiB (powers of 2), case-insensitive ("5GB", "200MB", "10KiB").
 */
export function parseShardSize(s: string): number {
  const m = /^\s*(\d+(?:\.\d+)?)\s*(b|kb|mb|gb|tb|kib|mib|gib|tib)?\s*$/i.exec(s);
  if (!m) throw new Error(`invalid shard size '${s}': expected a byte count or a size like 5GB, 200MB, 10KiB`);
  const unit = (m[2] ?? 'b').toLowerCase();
  const mult: Record<string, number> = {
    b: 1,
    kb: 1e3,
    mb: 1e6,
    gb: 1e9,
    tb: 1e12,
    kib: 2 ** 10,
    mib: 2 ** 20,
    gib: 2 ** 30,
    tib: 2 ** 40,
  };
  const n = Math.floor(Number(m[1]) * mult[unit]!);
  if (!(n >= 1)) throw new Error(`invalid shard size '${s}': must be at least 1 byte`);
  return n;
}

export interface MergeOptions {
  /** Storage dtype of the merged floating-point tensors (default: each tensor's own). */
  dtype?: MergeDType;
  /** Largest shard in bytes (default: DEFAULT_MAX_SHARD_BYTES). */
  maxShardBytes?: number;
}

export interface MergeResult {
  out: string;
  /** The weight files written (model.safetensors, or the shards and the index). */
  weightFiles: string[];
  /** Projections that received B·A. */
  merged: number;
  tensors: number;
  scale: number;
  /** Other files copied from the base (tokenizer, generation config, license, ...). */
  copied: string[];
}

/** W (out × in, row-major, f32) + scale·B·A, summed in float64, rounded once to f32. */
export function mergedWeight(w: Float32Array, p: LoraPair, r: number, scale: number): Float32Array {
  const inDim = p.a.length / r;
  const outDim = p.b.length / r;
  if (w.length !== outDim * inDim)
    throw new Error(`mergedWeight: W has ${w.length} elements, B·A is ${outDim} × ${inDim}`);
  const y = new Float32Array(w.length);
  const acc = new Float64Array(inDim);
  for (let o = 0; o < outDim; o++) {
    acc.fill(0);
    for (let k = 0; k < r; k++) {
      const bk = p.b[o * r + k]!;
      if (bk === 0) continue;
      const row = k * inDim;
      for (let i = 0; i < inDim; i++) acc[i]! += bk * p.a[row + i]!;
    }
    for (let i = 0; i < inDim; i++) y[o * inDim + i] = w[o * inDim + i]! + scale * acc[i]!;
  }
  return y;
}

function encode(f: Float32Array, st: StDType): StArray {
  return st === 'F32' ? f : st === 'BF16' ? f32ToBf16(f) : st === 'F16' ? f32ToF16(f) : Float64Array.from(f);
}

/** Merges the adapter in `adapterDir` into the model in `modelDir`, writing the model `out`. */
export function mergeAdapter(
  modelDir: string,
  adapterDir: string,
  out: string,
  options: MergeOptions = {},
): MergeResult {
  if (options.dtype !== undefined && !(options.dtype in ST_OF))
    throw new Error(`merge: dtype must be f32, bf16 or f16, got '${options.dtype}'`);
  const maxShard = options.maxShardBytes ?? DEFAULT_MAX_SHARD_BYTES;
  if (!(Number.isFinite(maxShard) && maxShard >= 1))
    throw new Error(`merge: the shard size must be at least 1 byte, got ${maxShard}`);
  const st = fs.statSync(out, { throwIfNoEntry: false });
  if (st && !st.isDirectory())
    throw new Error(`${out}: exists and is not a directory; merge writes a new model directory`);
  if (st && fs.readdirSync(out).length)
    throw new Error(`${out}: is not empty; merge writes only into a new or empty directory (nothing was changed)`);

  const model = openModelDir(modelDir);
  const config = model.config;
  const ad = loadAdapter(adapterDir);
  const mism = adapterMismatches(ad, config);
  if (mism.length) {
    throw new Error(
      `${path.join(adapterDir, ADAPTER_WEIGHTS)} does not fit the model ${modelDir} (${path.join(modelDir, 'config.json')}): ` +
        `${mism.length} mismatch${mism.length > 1 ? 'es' : ''}:\n  ` +
        mism.slice(0, 10).join('\n  ') +
        (mism.length > 10 ? `\n  ... and ${mism.length - 10} more` : ''),
    );
  }
  const scale = ad.scaling;
  // projection tensor name -> its LoRA pair
  const pairs = new Map<string, LoraPair>();
  ad.layers.forEach((l, i) => {
    for (const t of LORA_TARGETS as readonly LoraTarget[]) {
      const p = l[t];
      if (p) pairs.set(`model.layers.${i}.${projectionModule(t)}.weight`, p);
    }
  });
  for (const n of pairs.keys())
    if (!model.tensorNames.includes(n))
      throw new Error(`${modelDir}: the model has no tensor '${n}' that the adapter ${adapterDir} adapts`);

  const want = options.dtype ? ST_OF[options.dtype] : undefined;
  const sources: Array<[string, StTensorSource]> = model.tensorNames.map((name) => {
    const file = model.fileOf(name);
    const info = file.info(name);
    const isFloat = FLOATS.includes(info.dtype);
    const dtype = isFloat && want ? want : info.dtype;
    const pair = pairs.get(name);
    const data = (): StArray => {
      if (pair) return encode(mergedWeight(file.readF32(name), pair, ad.r, scale), dtype);
      if (dtype === info.dtype) return file.read(name); // unchanged tensors keep their exact bits
      return encode(file.readF32(name), dtype);
    };
    return [name, { dtype, shape: info.shape, data }];
  });

  const abs = path.resolve(out);
  fs.mkdirSync(path.dirname(abs), { recursive: true });
  const tmp = tempSibling(abs);
  fs.mkdirSync(tmp);
  try {
    const written = writeWeightFiles(tmp, sources, { shardBytes: maxShard });
    const cfgFile = path.join(modelDir, 'config.json');
    const cfg = JSON.parse(fs.readFileSync(cfgFile, 'utf8')) as Record<string, unknown>;
    if (options.dtype) cfg.torch_dtype = TORCH_OF[options.dtype];
    writeFileAtomic(path.join(tmp, 'config.json'), JSON.stringify(cfg, null, 2) + '\n');
    // the tokenizer, generation config, chat template, license, README: everything but weights
    const copied: string[] = [];
    for (const f of fs.readdirSync(modelDir).sort()) {
      const src = path.join(modelDir, f);
      if (
        f === 'config.json' ||
        isWeightFile(f) ||
        /\.(safetensors|bin|pt|pth|gguf)$/.test(f) ||
        !fs.statSync(src).isFile()
      )
        continue;
      fs.copyFileSync(src, path.join(tmp, f));
      copied.push(f);
    }
    fsyncDir(tmp);
    if (st) fs.rmdirSync(abs); // empty, checked above
    fs.renameSync(tmp, abs);
    fsyncDir(path.dirname(abs));
    return { out, weightFiles: [...written].sort(), merged: pairs.size, tensors: sources.length, scale, copied };
  } catch (e) {
    fs.rmSync(tmp, { recursive: true, force: true });
    throw e;
  }
}
