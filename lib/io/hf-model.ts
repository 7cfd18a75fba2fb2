// Hugging Face model directories: openModelDir reads config.json (hf-config.ts) and the
// headers of model.safetensors or its shards + model.safetensors.index.json, and checks every
// tensor the config implies (hf-tensors.ts) for presence, shape and a floating dtype
// (bitsandbytes-quantized linears as their blobs); writeWeightFiles writes tensors back in
// that layout, sharded as transformers does. Reading and writing sit together because they
// share the file names (single file, shards, index).
import fs from 'node:fs';
import path from 'node:path';
import { LORA_TARGETS, projectionModule, type LlamaConfig } from '../model/config.js';
import type { DType, NativeDevice, Tensor } from '../native.js';
import { bnbBlob, companionNames, parseQuantizationConfig, QUANT_DTYPE, type QuantizeMode } from './bnb.js';
import { describe, parseModelConfig, readJson } from './hf-config.js';
import { expectedTensors } from './hf-tensors.js';
import {
  numel,
  openSafetensors,
  ST_DTYPE_SIZE,
  writeFileAtomic,
  writeSafetensors,
  type SafetensorsFile,
  type StTensorInfo,
  type StTensorSource,
} from './safetensors.js';

export interface ModelDir {
  dir: string;
  config: LlamaConfig;
  /**
   * A checkpoint saved quantized by bitsandbytes (config.json `quantization_config`): its 14·L
   * decoder linears load as nf4 / nf4dq / int8 blobs; embeddings, norms and the LM head keep
   * their dtype. Undefined for an ordinary checkpoint.
   */
  quantization?: QuantizeMode;
  /** Whether `name` is stored quantized in this checkpoint. */
  isQuantized(name: string): boolean;
  /** The safetensors files, in name order. */
  files: SafetensorsFile[];
  /** Every tensor name in the checkpoint (expected ones and any extra), in file order. */
  tensorNames: string[];
  /** Tensors in the files that a LLaMA does not use (e.g. old rotary_emb.inv_freq buffers). */
  extraTensors: string[];
  /** Header warnings of the files (gaps, trailing bytes). */
  warnings: string[];
  /** The file holding a tensor. */
  fileOf(name: string): SafetensorsFile;
  info(name: string): StTensorInfo;
  /** The shape the config implies for a tensor (undefined for extra tensors). */
  expectedShape(name: string): number[] | undefined;
  /**
   * Loads one tensor into device memory (F32/F16/BF16 straight from the file). Its shape is
   * checked against `expectShape` (default: the shape the config implies); `dtype` converts.
   */
  loadTensor(
    device: NativeDevice,
    name: string,
    options?: { expectShape?: readonly number[]; dtype?: DType },
  ): Promise<Tensor>;
  /**
   * Loads several tensors (e.g. `stageTensorNames(config, lo, hi, ...)`: one stage's share),
   * each checked as in loadTensor; on an error the ones already loaded are freed.
   */
  loadTensors(
    device: NativeDevice,
    names: readonly string[],
    options?: { dtype?: DType },
  ): Promise<Map<string, Tensor>>;
  /** One tensor as f32 in JS memory. */
  readF32(name: string): Float32Array;
  /** Totals over the expected tensors. */
  stats(): { tensors: number; parameters: number; bytes: number; dtypes: Record<string, number> };
}

const INDEX = 'model.safetensors.index.json';
const SINGLE = 'model.safetensors';
const SHARD_RE = /^model-\d{5}-of-\d{5}\.safetensors$/;

function sameShape(a: readonly number[], b: readonly number[]): boolean {
  return a.length === b.length && a.every((d, i) => d === b[i]);
}
const fmt = (s: readonly number[]) => `[${s.join(', ')}]`;

/**
 * Opens a Hugging Face model directory: reads config.json and every safetensors header
 * (never the data), and checks that each tensor the config implies is present with its
 * shape and a floating dtype.
 */
export function openModelDir(dir: string): ModelDir {
  const configFile = path.join(dir, 'config.json');
  const configJson = readJson(configFile, configFile);
  const config = parseModelConfig(configJson, configFile);
  const quantization = parseQuantizationConfig((configJson as Record<string, unknown>).quantization_config, configFile);
  const fileMap = new Map<string, SafetensorsFile>(); // tensor → file
  const files: SafetensorsFile[] = [];
  const indexPath = path.join(dir, INDEX);
  const singlePath = path.join(dir, SINGLE);
  if (fs.existsSync(indexPath)) {
    const idx = readJson(indexPath, indexPath) as Record<string, unknown>;
    const wm = idx?.weight_map;
    if (typeof wm !== 'object' || wm === null || Array.isArray(wm))
      throw new Error(`${indexPath}: field 'weight_map' must be an object {tensor: file}`);
    const byFile = new Map<string, string[]>();
    for (const [t, f] of Object.entries(wm as Record<string, unknown>)) {
      if (typeof f !== 'string' || f === '' || f.includes('/') || f.includes('\\') || f === '.' || f === '..') {
        throw new Error(
          `${indexPath}: weight_map['${t}'] must be a file name in the model directory, got ${describe(f)}`,
        );
      }
      byFile.set(f, [...(byFile.get(f) ?? []), t]);
    }
    for (const [f, names] of [...byFile.entries()].sort((a, b) => (a[0] < b[0] ? -1 : 1))) {
      const st = openSafetensors(path.join(dir, f));
      files.push(st);
      for (const t of names) {
        if (!st.tensors.has(t))
          throw new Error(`${indexPath}: weight_map puts tensor '${t}' in ${f}, but ${st.path} has no such tensor`);
        fileMap.set(t, st);
      }
    }
  } else if (fs.existsSync(singlePath)) {
    const st = openSafetensors(singlePath);
    files.push(st);
    for (const t of st.tensors.keys()) fileMap.set(t, st);
  } else {
    throw new Error(
      `${dir}: no ${SINGLE} and no ${INDEX} (a Hugging Face model directory holds its weights in one of them)`,
    );
  }

  const expected = expectedTensors(config);
  // Which tensors bitsandbytes quantized: every decoder linear (transformers keeps lm_head out).
  const quantized = new Set<string>();
  if (quantization)
    for (let i = 0; i < config.numLayers; i++)
      for (const t of LORA_TARGETS) quantized.add(`model.layers.${i}.${projectionModule(t)}.weight`);
  const missing = [...expected.keys()]
    .flatMap((n) => [
      n,
      ...(quantized.has(n) ? companionNames(n, quantization!).filter((c) => !c.endsWith('weight_format')) : []),
    ])
    .filter((n) => !fileMap.has(n));
  if (missing.length) {
    const where = files.length === 1 ? files[0]!.path : `${dir} (${INDEX})`;
    throw new Error(
      `${where}: ${missing.length} tensor(s) the config implies are missing: ${missing.slice(0, 5).join(', ')}${missing.length > 5 ? ', ...' : ''}`,
    );
  }
  for (const [n, shape] of expected) {
    const st = fileMap.get(n)!;
    const i = st.tensors.get(n)!;
    if (quantized.has(n)) {
      const want = quantization === 'int8' ? 'I8' : 'U8';
      if (i.dtype !== want)
        throw new Error(
          `${st.path}: tensor '${n}' is ${i.dtype}; config.json's quantization_config (${quantization}) stores it as ${want}`,
        );
      continue; // its shape and statistics are checked when its blob is assembled (bnbBlob)
    }
    if (!sameShape(i.shape, shape)) {
      throw new Error(`${st.path}: tensor '${n}' has shape ${fmt(i.shape)} but config.json implies ${fmt(shape)}`);
    }
    if (!['F32', 'F16', 'BF16', 'F64'].includes(i.dtype))
      throw new Error(`${st.path}: tensor '${n}' is ${i.dtype}; weights must be F32, F16 or BF16`);
  }
  const tensorNames = [...fileMap.keys()];
  const companions = new Set([...quantized].flatMap((n) => companionNames(n, quantization!)));
  const extraTensors = tensorNames.filter((n) => !expected.has(n) && !companions.has(n));

  const fileOf = (name: string): SafetensorsFile => {
    const f = fileMap.get(name);
    if (!f) throw new Error(`${dir}: the model has no tensor '${name}'`);
    return f;
  };
  const source = (name: string) => ({ file: fileOf(name), name });
  return {
    dir,
    config,
    files,
    tensorNames,
    extraTensors,
    ...(quantization ? { quantization } : {}),
    isQuantized: (name) => quantized.has(name),
    warnings: files.flatMap((f) => f.warnings),
    fileOf,
    info: (name) => fileOf(name).info(name),
    expectedShape: (name) => expected.get(name),
    async loadTensor(device, name, options = {}) {
      const f = fileOf(name);
      const i = f.info(name);
      const want = options.expectShape ?? expected.get(name);
      if (quantized.has(name)) {
        const dt = QUANT_DTYPE[quantization!];
        if (options.dtype && options.dtype !== dt)
          throw new Error(
            `${f.path}: tensor '${name}' is stored ${quantization}; it loads as ${dt}, not ${options.dtype}`,
          );
        return device.fromArray(dt, [...want!], bnbBlob(source, name, quantization!, want!));
      }
      if (want && !sameShape(i.shape, want))
        throw new Error(`${f.path}: tensor '${name}' has shape ${fmt(i.shape)}, expected ${fmt(want)}`);
      return f.toDevice(device, name, options.dtype ? { dtype: options.dtype } : {});
    },
    async loadTensors(device, names, options = {}) {
      const out = new Map<string, Tensor>();
      try {
        for (const n of names)
          if (!out.has(n)) out.set(n, await this.loadTensor(device, n, options.dtype ? { dtype: options.dtype } : {}));
      } catch (e) {
        for (const t of out.values()) t.free();
        throw e;
      }
      return out;
    },
    readF32: (name) => {
      if (quantized.has(name))
        throw new Error(
          `${dir}: tensor '${name}' is stored ${quantization}; load it to a device (loadTensor) and dequantize it there`,
        );
      return fileOf(name).readF32(name);
    },
    stats() {
      let parameters = 0;
      let bytes = 0;
      const dtypes: Record<string, number> = {};
      for (const n of expected.keys()) {
        const i = fileOf(n).info(n);
        parameters += numel(quantized.has(n) ? expected.get(n)! : i.shape);
        bytes += i.end - i.begin;
        if (quantized.has(n))
          for (const c of companionNames(n, quantization!))
            if (fileMap.has(c)) bytes += fileOf(c).info(c).end - fileOf(c).info(c).begin;
        const key = quantized.has(n) ? quantization! : i.dtype;
        dtypes[key] = (dtypes[key] ?? 0) + 1;
      }
      return { tensors: expected.size, parameters, bytes, dtypes };
    },
  };
}

// ---------------------------------------------------------------------------------------
// Writing weights in the HF layout

/**
 * Writes tensors as a Hugging Face model's weights: model.safetensors, or, when they exceed
 * `shardBytes` (or with `alwaysIndex`), model-0000k-of-0000n.safetensors shards of at most
 * `shardBytes` each (a larger tensor goes alone, as transformers does) + model.safetensors.index.json
 * with total_size and the weight map. Tensors keep their order; their data thunks run one at a
 * time while a shard is written, so only one tensor is in memory. Returns the file names written.
 */
export function writeWeightFiles(
  dir: string,
  sources: ReadonlyArray<readonly [string, StTensorSource]>,
  options: { shardBytes?: number; alwaysIndex?: boolean } = {},
): Set<string> {
  const meta = { format: 'pt' };
  const bytesOf = (s: StTensorSource) => numel(s.shape) * ST_DTYPE_SIZE[s.dtype];
  const limit = options.shardBytes ?? Infinity;
  const shards: Array<Array<readonly [string, StTensorSource]>> = [];
  let cur: Array<readonly [string, StTensorSource]> = [];
  let curBytes = 0;
  let total = 0;
  for (const s of sources) {
    const b = bytesOf(s[1]);
    total += b;
    if (cur.length && curBytes + b > limit) {
      shards.push(cur);
      cur = [];
      curBytes = 0;
    }
    cur.push(s);
    curBytes += b;
  }
  if (cur.length || !shards.length) shards.push(cur);
  const written = new Set<string>();
  if (shards.length === 1 && !options.alwaysIndex) {
    writeSafetensors(path.join(dir, SINGLE), Object.fromEntries(shards[0]!), meta);
    written.add(SINGLE);
    return written;
  }
  const n = shards.length;
  const weightMap: Record<string, string> = {};
  shards.forEach((shard, k) => {
    const f = `model-${String(k + 1).padStart(5, '0')}-of-${String(n).padStart(5, '0')}.safetensors`;
    writeSafetensors(path.join(dir, f), Object.fromEntries(shard), meta);
    written.add(f);
    for (const [name] of shard) weightMap[name] = f;
  });
  const sortedMap = Object.fromEntries(Object.entries(weightMap).sort((a, b) => (a[0] < b[0] ? -1 : 1)));
  writeFileAtomic(
    path.join(dir, INDEX),
    JSON.stringify({ metadata: { total_size: total }, weight_map: sortedMap }, null, 2) + '\n',
  );
  written.add(INDEX);
  return written;
}

/** Whether a file name is one of the weight files of an HF model directory (single, shard or index). */
export function isWeightFile(f: string): boolean {
  return f === SINGLE || f === INDEX || SHARD_RE.test(f);
}
