// Quantized frozen bases in the bitsandbytes formats (QLoRA's NF4, with or without double
// quantization; LLM.int8's row-wise int8 + SCB): the blob layout the native core keeps them in,
// the `quantization_config` of a pre-quantized Hugging Face checkpoint, and the assembly of a
// blob from the tensors such a checkpoint stores for one linear layer (`weight`, `weight.absmax`,
// `weight.quant_map`, `weight.nested_*`, `weight.quant_state.bitsandbytes__nf4`; 8-bit: `weight`
// + `SCB` + `weight_format`). Dequantization happens in the native core, bit for bit as
// bitsandbytes does it (native/src/cpu/quant.cc).
import type { QuantDType } from '../native.js';
import type { SafetensorsFile } from './safetensors.js';

/** The user-facing names (config `quantize`, --quantize, config.json of a pre-quantized model). */
export const QUANTIZE_MODES = ['nf4', 'nf4-dq', 'int8'] as const;
export type QuantizeMode = (typeof QUANTIZE_MODES)[number];
export const QUANT_DTYPE: Readonly<Record<QuantizeMode, QuantDType>> = { nf4: 'nf4', 'nf4-dq': 'nf4dq', int8: 'int8' };

export const NF4_BLOCK = 64;
export const NF4_NESTED_BLOCK = 256;

/** bitsandbytes' NF4 code book (functional.py get_4bit_type), as float32. */
export const NF4_CODE = Float32Array.from([
  -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635, -0.18477343022823334,
  -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
  0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
]);

export interface QuantLayout {
  /** byte offsets of the sections (see native/src/core/dtype.h QuantLayout) */
  absmax: number;
  code: number;
  offset: number;
  nested: number;
  bytes: number;
  blocks: number;
  nestedBlocks: number;
}

const align64 = (x: number) => Math.ceil(x / 64) * 64;

/** The same layout as the native core's quant_layout (the two are checked against each other by tests). */
export function quantLayout(dtype: QuantDType, rows: number, cols: number): QuantLayout {
  const n = rows * cols;
  if (dtype === 'int8') {
    const absmax = align64(n);
    return { absmax, code: 0, offset: 0, nested: 0, bytes: absmax + rows * 4, blocks: rows, nestedBlocks: 0 };
  }
  const blocks = Math.ceil(n / NF4_BLOCK);
  const absmax = align64(Math.ceil(n / 2));
  if (dtype === 'nf4')
    return { absmax, code: 0, offset: 0, nested: 0, bytes: absmax + blocks * 4, blocks, nestedBlocks: 0 };
  const nestedBlocks = Math.ceil(blocks / NF4_NESTED_BLOCK);
  const code = align64(absmax + blocks);
  const offset = code + 256 * 4;
  const nested = align64(offset + 4);
  return { absmax, code, offset, nested, bytes: nested + nestedBlocks * 4, blocks, nestedBlocks };
}

const describe = (v: unknown) => (typeof v === 'string' ? JSON.stringify(v) : (JSON.stringify(v) ?? String(v)));

/**
 * The quantization of a pre-quantized checkpoint from config.json's `quantization_config`
 * (transformers' BitsAndBytesConfig.to_dict()); undefined when the model is not quantized.
 */
export function parseQuantizationConfig(q: unknown, file: string): QuantizeMode | undefined {
  if (q === undefined || q === null) return undefined;
  const where = `${file}: quantization_config`;
  if (typeof q !== 'object' || Array.isArray(q)) throw new Error(`${where} must be an object, got ${describe(q)}`);
  const o = q as Record<string, unknown>;
  if (o.quant_method !== 'bitsandbytes') {
    throw new Error(
      `${where}.quant_method is ${describe(o.quant_method)}; mlora loads bitsandbytes checkpoints only (nf4, nf4 double-quant, int8)`,
    );
  }
  const in4 = o.load_in_4bit === true || o._load_in_4bit === true;
  const in8 = o.load_in_8bit === true || o._load_in_8bit === true;
  if (in4 === in8)
    throw new Error(
      `${where}: exactly one of load_in_4bit and load_in_8bit must be true, got ${describe(o.load_in_4bit)} and ${describe(o.load_in_8bit)}`,
    );
  if (in8) {
    if (o.llm_int8_has_fp16_weight === true)
      throw new Error(`${where}.llm_int8_has_fp16_weight is true: the weights are not stored in int8`);
    return 'int8';
  }
  const type = o.bnb_4bit_quant_type ?? 'fp4';
  if (type !== 'nf4')
    throw new Error(`${where}.bnb_4bit_quant_type is ${describe(type)}; mlora loads NF4 (fp4 is not supported)`);
  const storage = o.bnb_4bit_quant_storage ?? 'uint8';
  if (storage !== 'uint8')
    throw new Error(`${where}.bnb_4bit_quant_storage is ${describe(storage)}; only "uint8" is supported`);
  return o.bnb_4bit_use_double_quant === true ? 'nf4-dq' : 'nf4';
}

/** Names of the companion tensors a quantized linear `<m>.weight` has in the checkpoint. */
export function companionNames(weight: string, mode: QuantizeMode): string[] {
  if (mode === 'int8') return [weight.replace(/weight$/, 'SCB'), weight.replace(/weight$/, 'weight_format')];
  const base = [`${weight}.absmax`, `${weight}.quant_map`, `${weight}.quant_state.bitsandbytes__nf4`];
  return mode === 'nf4-dq' ? [...base, `${weight}.nested_absmax`, `${weight}.nested_quant_map`] : base;
}

/** Reads one tensor of the checkpoint, wherever (which shard) it lives. */
export type TensorSource = (name: string) => { file: SafetensorsFile; name: string };

function need(src: TensorSource, name: string, dtype: string, numel?: number) {
  const { file } = src(name);
  const i = file.info(name);
  if (i.dtype !== dtype) throw new Error(`${file.path}: tensor '${name}' is ${i.dtype}, expected ${dtype}`);
  const n = i.shape.reduce((a, b) => a * b, 1);
  if (numel !== undefined && n !== numel)
    throw new Error(`${file.path}: tensor '${name}' has ${n} elements ([${i.shape.join(', ')}]), expected ${numel}`);
  return file.read(name);
}

/**
 * The blob of one quantized linear [rows, cols], assembled from the checkpoint's tensors; every
 * field is checked (dtype, size, block sizes, the JSON quant state's shape, the code book).
 */
export function bnbBlob(src: TensorSource, weight: string, mode: QuantizeMode, shape: readonly number[]): Uint8Array {
  const [rows, cols] = shape as [number, number];
  const n = rows * cols;
  const dtype = QUANT_DTYPE[mode];
  const L = quantLayout(dtype, rows, cols);
  const blob = new Uint8Array(L.bytes);
  const put = (off: number, a: ArrayBufferView) => blob.set(new Uint8Array(a.buffer, a.byteOffset, a.byteLength), off);
  const path = src(weight).file.path;
  if (mode === 'int8') {
    put(0, need(src, weight, 'I8', n));
    const [scb, fmt] = companionNames(weight, mode) as [string, string];
    put(L.absmax, need(src, scb, 'F32', rows));
    try {
      src(fmt);
    } catch {
      return blob; // weight_format is optional (older checkpoints); the default is row-wise
    }
    const f = need(src, fmt, 'U8', 1)[0];
    if (f !== 0) throw new Error(`${path}: tensor '${fmt}' is ${f}; only the row-wise int8 format (0) is supported`);
    return blob;
  }
  put(0, need(src, weight, 'U8', Math.ceil(n / 2)));
  const state = need(src, `${weight}.quant_state.bitsandbytes__nf4`, 'U8') as Uint8Array;
  let js: Record<string, unknown>;
  try {
    js = JSON.parse(new TextDecoder().decode(state)) as Record<string, unknown>;
  } catch (e) {
    throw new Error(
      `${path}: tensor '${weight}.quant_state.bitsandbytes__nf4' is not valid JSON: ${(e as Error).message}`,
    );
  }
  const where = `${path}: '${weight}.quant_state.bitsandbytes__nf4'`;
  if (js.quant_type !== 'nf4') throw new Error(`${where}: quant_type is ${describe(js.quant_type)}, expected "nf4"`);
  if (js.blocksize !== NF4_BLOCK)
    throw new Error(
      `${where}: blocksize is ${describe(js.blocksize)}; mlora supports ${NF4_BLOCK} (what transformers writes)`,
    );
  const sh = js.shape;
  if (!Array.isArray(sh) || sh.length !== 2 || sh[0] !== rows || sh[1] !== cols)
    throw new Error(`${where}: shape is ${describe(sh)}, expected [${rows}, ${cols}]`);
  const qm = need(src, `${weight}.quant_map`, 'F32', 16) as Float32Array;
  if (!qm.every((v, i) => v === NF4_CODE[i]))
    throw new Error(`${path}: tensor '${weight}.quant_map' is not the NF4 code book`);
  const dq = mode === 'nf4-dq';
  if (dq !== (js.nested_blocksize !== undefined)) {
    throw new Error(
      `${where}: ${dq ? 'has no nested_blocksize, but config.json says bnb_4bit_use_double_quant' : 'is double-quantized, but config.json does not say bnb_4bit_use_double_quant'}`,
    );
  }
  if (!dq) {
    put(L.absmax, need(src, `${weight}.absmax`, 'F32', L.blocks));
    return blob;
  }
  if (js.nested_blocksize !== NF4_NESTED_BLOCK)
    throw new Error(`${where}: nested_blocksize is ${describe(js.nested_blocksize)}, expected ${NF4_NESTED_BLOCK}`);
  if (typeof js.nested_offset !== 'number' || !Number.isFinite(js.nested_offset))
    throw new Error(`${where}: nested_offset must be a finite number, got ${describe(js.nested_offset)}`);
  put(L.absmax, need(src, `${weight}.absmax`, 'U8', L.blocks));
  put(L.code, need(src, `${weight}.nested_quant_map`, 'F32', 256));
  put(L.offset, Float32Array.of(js.nested_offset)); // QuantState.from_dict reads it back as float32
  put(L.nested, need(src, `${weight}.nested_absmax`, 'F32', L.nestedBlocks));
  return blob;
}
