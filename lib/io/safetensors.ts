// safetensors, read and written by our own code with every bound checked.
//
// Layout (https://huggingface.co/docs/safetensors): an 8-byte little-endian u64 N, then N
// bytes of UTF-8 JSON { "__metadata__"?: {string: string}, name: {dtype, shape,
// data_offsets: [begin, end]} ... }, then the data section; offsets are relative to the
// start of the data section (byte 8 + N), little-endian, row-major.
//
// Reading opens the file by descriptor, reads only the header, validates it completely, and
// reads one tensor at a time on demand (`read`, `readF32`) or hands the absolute byte offset
// to the native core (`toDevice` → device.loadFile), so a checkpoint never has to fit in JS
// memory. A malformed file is an Error naming the file (and the tensor), never a crash or a
// silent misread. Reader and writer stay in one file (a little over 500 lines): they share the
// header's layout and its checks, and a writer apart from them could drift from what we read.
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { randomBytes } from 'node:crypto';
import type { DType, ElementDType, NativeDevice, Tensor } from '../native.js';
import { bf16ToF32, f16ToF32, f32ToBf16, f32ToF16 } from './dtype.js';

/** The dtypes of the safetensors format we know. The native core takes F32, F16, BF16, I32. */
export type StDType =
  'F64' | 'F32' | 'F16' | 'BF16' | 'I64' | 'I32' | 'I16' | 'I8' | 'U64' | 'U32' | 'U16' | 'U8' | 'BOOL';

export const ST_DTYPE_SIZE: Readonly<Record<StDType, number>> = {
  F64: 8,
  F32: 4,
  F16: 2,
  BF16: 2,
  I64: 8,
  I32: 4,
  I16: 2,
  I8: 1,
  U64: 8,
  U32: 4,
  U16: 2,
  U8: 1,
  BOOL: 1,
};

export function isStDType(s: unknown): s is StDType {
  return typeof s === 'string' && Object.prototype.hasOwnProperty.call(ST_DTYPE_SIZE, s);
}

/** The typed array `read` returns for each dtype (F16/BF16: the raw bits). */
export type StArray =
  | Float64Array
  | Float32Array
  | Uint16Array
  | BigInt64Array
  | BigUint64Array
  | Int32Array
  | Uint32Array
  | Int16Array
  | Int8Array
  | Uint8Array;

/** Native dtype <-> safetensors dtype. */
export const NATIVE_TO_ST: Readonly<Record<ElementDType, StDType>> = {
  f32: 'F32',
  f16: 'F16',
  bf16: 'BF16',
  i32: 'I32',
};
export function nativeDType(d: StDType): DType | undefined {
  return d === 'F32' ? 'f32' : d === 'F16' ? 'f16' : d === 'BF16' ? 'bf16' : d === 'I32' ? 'i32' : undefined;
}

export interface StTensorInfo {
  dtype: StDType;
  shape: number[];
  /** Byte offsets relative to the data section, as in the header. */
  begin: number;
  end: number;
}

/** Headers larger than this are refused (HF's own limit is 100 MB). */
export const MAX_HEADER_BYTES = 100 * 2 ** 20;

export function numel(shape: readonly number[]): number {
  let n = 1;
  for (const d of shape) n *= d;
  return n;
}

function fmtShape(s: readonly number[]): string {
  return `[${s.join(', ')}]`;
}

function isPlainObject(v: unknown): v is Record<string, unknown> {
  return typeof v === 'object' && v !== null && !Array.isArray(v);
}

function checkLittleEndian(): void {
  if (os.endianness() !== 'LE')
    throw new Error('safetensors: this machine is big-endian; only little-endian hosts are supported');
}

function preadFully(fd: number, dst: Uint8Array, position: number, what: () => string): void {
  let got = 0;
  while (got < dst.length) {
    const n = fs.readSync(fd, dst, got, dst.length - got, position + got);
    if (n <= 0)
      throw new Error(
        `${what()}: short read: got ${got} of ${dst.length} bytes at byte ${position} (was the file truncated?)`,
      );
    got += n;
  }
}

export interface SafetensorsFile {
  /** The path as given. */
  readonly path: string;
  /** Absolute path (what device.loadFile is given). */
  readonly absPath: string;
  readonly fileSize: number;
  readonly headerSize: number;
  /** Absolute byte offset of the data section (8 + headerSize). */
  readonly dataStart: number;
  /** Tensors by name, in header order. */
  readonly tensors: ReadonlyMap<string, StTensorInfo>;
  /** The `__metadata__` string map ({} when absent). */
  readonly metadata: Readonly<Record<string, string>>;
  /** Things a strict reader (HF's) would refuse but we accept: gaps, trailing bytes. */
  readonly warnings: readonly string[];
  /** Header info of one tensor; an Error naming the file when it is absent. */
  info(name: string): StTensorInfo;
  /** A copy of the tensor's contents, in the typed array of its dtype. */
  read(name: string): StArray;
  /** The tensor as f32 (F32 as is; F16, BF16, F64 converted). */
  readF32(name: string): Float32Array;
  /**
   * The tensor in device memory. Without `dtype` (or with the file's own), F32/F16/BF16/I32
   * are read straight from the file by the native core; other combinations are converted in
   * JS (one tensor at a time): F64/F32/F16/BF16 → f32/f16/bf16, I64/I32/I16/I8/U8 → i32.
   */
  toDevice(device: NativeDevice, name: string, options?: { dtype?: DType }): Promise<Tensor>;
}

/** Parses and validates a header (exported for tests); `file` names the file in errors. */
export function parseHeader(
  file: string,
  json: unknown,
  dataSize: number,
): { tensors: Map<string, StTensorInfo>; metadata: Record<string, string>; warnings: string[] } {
  if (!isPlainObject(json)) {
    throw new Error(
      `${file}: header is not a JSON object (got ${Array.isArray(json) ? 'an array' : json === null ? 'null' : typeof json})`,
    );
  }
  const metadata: Record<string, string> = {};
  const tensors = new Map<string, StTensorInfo>();
  const warnings: string[] = [];
  for (const [name, v] of Object.entries(json)) {
    if (name === '__metadata__') {
      if (!isPlainObject(v)) throw new Error(`${file}: __metadata__ must be an object of strings`);
      for (const [k, s] of Object.entries(v)) {
        if (typeof s !== 'string')
          throw new Error(`${file}: __metadata__ '${k}' must be a string, got ${JSON.stringify(s)}`);
        metadata[k] = s;
      }
      continue;
    }
    const where = `${file}: tensor '${name}'`;
    if (!isPlainObject(v)) throw new Error(`${where}: entry must be an object {dtype, shape, data_offsets}`);
    const { dtype, shape, data_offsets: offs } = v;
    if (!isStDType(dtype)) {
      throw new Error(
        `${where}: unknown dtype ${JSON.stringify(dtype)} (known: ${Object.keys(ST_DTYPE_SIZE).join(', ')})`,
      );
    }
    if (!Array.isArray(shape) || !shape.every((d) => Number.isSafeInteger(d) && d >= 0)) {
      throw new Error(`${where}: shape must be a list of non-negative integers, got ${JSON.stringify(shape)}`);
    }
    if (!Array.isArray(offs) || offs.length !== 2 || !offs.every((d) => Number.isSafeInteger(d) && d >= 0)) {
      throw new Error(
        `${where}: data_offsets must be [begin, end] with non-negative integers, got ${JSON.stringify(offs)}`,
      );
    }
    const [begin, end] = offs as [number, number];
    if (end < begin) throw new Error(`${where}: data_offsets [${begin}, ${end}] end before they begin`);
    if (end > dataSize) {
      throw new Error(
        `${where}: data_offsets [${begin}, ${end}] run past the end of the data section (${dataSize} bytes)`,
      );
    }
    const need = numel(shape as number[]) * ST_DTYPE_SIZE[dtype];
    if (end - begin !== need) {
      throw new Error(
        `${where}: data_offsets [${begin}, ${end}] hold ${end - begin} bytes but ${dtype} ${fmtShape(shape as number[])} needs ${need}`,
      );
    }
    tensors.set(name, { dtype, shape: [...(shape as number[])], begin, end });
  }
  // No two tensors may share bytes; gaps and trailing bytes are accepted with a warning.
  const sorted = [...tensors.entries()].filter(([, t]) => t.end > t.begin).sort((a, b) => a[1].begin - b[1].begin);
  let pos = 0;
  let prev: string | undefined;
  for (const [name, t] of sorted) {
    if (t.begin < pos) {
      throw new Error(
        `${file}: tensor '${name}' (bytes [${t.begin}, ${t.end})) overlaps tensor '${prev}' (ends at byte ${pos})`,
      );
    }
    if (t.begin > pos)
      warnings.push(`${file}: ${t.begin - pos} unused bytes before tensor '${name}' (HF's loader refuses gaps)`);
    pos = t.end;
    prev = name;
  }
  if (pos < dataSize)
    warnings.push(`${file}: ${dataSize - pos} unused bytes after the last tensor (HF's loader refuses them)`);
  return { tensors, metadata, warnings };
}

/** Opens a safetensors file: reads and validates its header only. */
export function openSafetensors(file: string): SafetensorsFile {
  checkLittleEndian();
  const absPath = path.resolve(file);
  const name = file;
  let fd: number;
  try {
    fd = fs.openSync(absPath, 'r');
  } catch (e) {
    throw new Error(`${name}: cannot open: ${(e as Error).message}`);
  }
  let fileSize: number;
  let headerSize: number;
  let json: unknown;
  try {
    fileSize = fs.fstatSync(fd).size;
    if (fileSize < 8) throw new Error(`${name}: file is ${fileSize} bytes, too short for the 8-byte header length`);
    const lenBuf = Buffer.alloc(8);
    preadFully(fd, lenBuf, 0, () => name);
    const n = lenBuf.readBigUInt64LE(0);
    if (n > BigInt(MAX_HEADER_BYTES))
      throw new Error(
        `${name}: header length ${n} is over the limit of ${MAX_HEADER_BYTES} bytes (not a safetensors file?)`,
      );
    headerSize = Number(n);
    if (8 + headerSize > fileSize) {
      throw new Error(
        `${name}: header length ${headerSize} runs past the end of the file (${fileSize} bytes: truncated?)`,
      );
    }
    const hb = Buffer.alloc(headerSize);
    preadFully(fd, hb, 8, () => name);
    let text: string;
    try {
      text = new TextDecoder('utf-8', { fatal: true }).decode(hb);
    } catch {
      throw new Error(`${name}: header is not valid UTF-8`);
    }
    try {
      json = JSON.parse(text);
    } catch (e) {
      throw new Error(`${name}: header is not valid JSON (${(e as Error).message})`);
    }
  } finally {
    fs.closeSync(fd);
  }
  const dataStart = 8 + headerSize;
  const { tensors, metadata, warnings } = parseHeader(name, json, fileSize - dataStart);

  const info = (t: string): StTensorInfo => {
    const i = tensors.get(t);
    if (!i) throw new Error(`${name}: no tensor '${t}'`);
    return i;
  };

  const read = (t: string): StArray => {
    const i = info(t);
    const bytes = i.end - i.begin;
    const buf = new ArrayBuffer(bytes);
    const fd2 = fs.openSync(absPath, 'r');
    try {
      preadFully(fd2, new Uint8Array(buf), dataStart + i.begin, () => `${name}: tensor '${t}'`);
    } finally {
      fs.closeSync(fd2);
    }
    switch (i.dtype) {
      case 'F64':
        return new Float64Array(buf);
      case 'F32':
        return new Float32Array(buf);
      case 'F16':
      case 'BF16':
      case 'U16':
        return new Uint16Array(buf);
      case 'I64':
        return new BigInt64Array(buf);
      case 'U64':
        return new BigUint64Array(buf);
      case 'I32':
        return new Int32Array(buf);
      case 'U32':
        return new Uint32Array(buf);
      case 'I16':
        return new Int16Array(buf);
      case 'I8':
        return new Int8Array(buf);
      case 'U8':
      case 'BOOL':
        return new Uint8Array(buf);
    }
  };

  const readF32 = (t: string): Float32Array => {
    const i = info(t);
    const a = read(t);
    switch (i.dtype) {
      case 'F32':
        return a as Float32Array;
      case 'F16':
        return f16ToF32(a as Uint16Array);
      case 'BF16':
        return bf16ToF32(a as Uint16Array);
      case 'F64':
        return Float32Array.from(a as Float64Array);
      default:
        throw new Error(`${name}: tensor '${t}' is ${i.dtype}, not a floating-point dtype`);
    }
  };

  const toDevice = async (device: NativeDevice, t: string, options: { dtype?: DType } = {}): Promise<Tensor> => {
    const i = info(t);
    const own = nativeDType(i.dtype);
    const want = options.dtype ?? own;
    if (!want) {
      throw new Error(
        `${name}: tensor '${t}' is ${i.dtype}, which the native core does not hold; pass {dtype} to convert (f32, f16, bf16 or i32)`,
      );
    }
    if (want === own) return device.loadFile(absPath, dataStart + i.begin, want, i.shape);
    if (want === 'i32') {
      if (!['I64', 'I32', 'I16', 'I8', 'U8', 'U16', 'BOOL'].includes(i.dtype)) {
        throw new Error(`${name}: tensor '${t}' is ${i.dtype}; it cannot be converted to i32`);
      }
      const a = read(t);
      const out = new Int32Array(a.length);
      for (let k = 0; k < a.length; k++) {
        const v = Number(a[k]!);
        if (v < -2147483648 || v > 2147483647)
          throw new Error(`${name}: tensor '${t}': element ${k} (${v}) does not fit in i32`);
        out[k] = v;
      }
      return device.fromArray('i32', i.shape, out);
    }
    const f = readF32(t);
    if (want === 'f32') return device.fromArray('f32', i.shape, f);
    return device.fromArray(want, i.shape, want === 'bf16' ? f32ToBf16(f) : f32ToF16(f));
  };

  return {
    path: file,
    absPath,
    fileSize,
    headerSize,
    dataStart,
    tensors,
    metadata,
    warnings,
    info,
    read,
    readF32,
    toDevice,
  };
}

// ---------------------------------------------------------------------------------------
// Writing

export interface StTensorSource {
  dtype: StDType;
  shape: readonly number[];
  /** The contents, or a function producing them when the file is written (one tensor in memory at a time). */
  data: StArray | (() => StArray);
}

const ARRAY_OF: Record<StDType, string> = {
  F64: 'Float64Array',
  F32: 'Float32Array',
  F16: 'Uint16Array',
  BF16: 'Uint16Array',
  I64: 'BigInt64Array',
  U64: 'BigUint64Array',
  I32: 'Int32Array',
  U32: 'Uint32Array',
  I16: 'Int16Array',
  U16: 'Uint16Array',
  I8: 'Int8Array',
  U8: 'Uint8Array',
  BOOL: 'Uint8Array',
};

/** fsync a directory (after renames into it), where the filesystem allows it. */
export function fsyncDir(dir: string): void {
  let fd: number | undefined;
  try {
    fd = fs.openSync(dir, 'r');
    fs.fsyncSync(fd);
  } catch {
    // some filesystems refuse fsync on a directory; the rename is still atomic
  } finally {
    if (fd !== undefined) fs.closeSync(fd);
  }
}

/** A temp name next to `p`: `p.tmp-<pid>-<rand>`. */
export function tempSibling(p: string): string {
  return `${p}.tmp-${process.pid}-${randomBytes(4).toString('hex')}`;
}

/**
 * Writes `contents` to `file` atomically: a temp file next to it, fsync, rename over, fsync
 * of the directory. `contents` is written chunk by chunk.
 */
export function writeFileAtomic(file: string, contents: Iterable<Uint8Array> | string): void {
  const tmp = tempSibling(file);
  let fd: number | undefined;
  try {
    fd = fs.openSync(tmp, 'wx', 0o644);
    const chunks = typeof contents === 'string' ? [Buffer.from(contents, 'utf8')] : contents;
    for (const c of chunks) {
      let off = 0;
      while (off < c.length) off += fs.writeSync(fd, c, off, c.length - off);
    }
    fs.fsyncSync(fd);
    fs.closeSync(fd);
    fd = undefined;
    fs.renameSync(tmp, file);
  } catch (e) {
    if (fd !== undefined) fs.closeSync(fd);
    fs.rmSync(tmp, { force: true });
    throw e;
  }
  fsyncDir(path.dirname(path.resolve(file)));
}

/**
 * The order tensors are laid out in: larger element size first, then by name, so every
 * tensor is aligned to its element size. (The Rust library sorts by dtype rank descending,
 * then name: the same order when all tensors share a dtype, as checkpoints do.)
 */
export function safetensorsOrder(entries: Array<[string, { dtype: StDType }]>): Array<[string, { dtype: StDType }]> {
  return [...entries].sort(
    (a, b) => ST_DTYPE_SIZE[b[1].dtype] - ST_DTYPE_SIZE[a[1].dtype] || (a[0] < b[0] ? -1 : a[0] > b[0] ? 1 : 0),
  );
}

/**
 * Writes a safetensors file atomically (temp file, fsync, rename). The header is padded with
 * spaces to a multiple of 8 bytes, as HF does.
 */
export function writeSafetensors(
  file: string,
  tensors: Record<string, StTensorSource>,
  metadata?: Record<string, string>,
): void {
  checkLittleEndian();
  const header: Record<string, unknown> = {};
  if (metadata && Object.keys(metadata).length) {
    for (const [k, v] of Object.entries(metadata)) {
      if (typeof v !== 'string') throw new Error(`${file}: __metadata__ '${k}' must be a string`);
    }
    header.__metadata__ = metadata;
  }
  const order = safetensorsOrder(Object.entries(tensors)) as Array<[string, StTensorSource]>;
  let offset = 0;
  for (const [name, t] of order) {
    if (name === '__metadata__') throw new Error(`${file}: '__metadata__' cannot be a tensor name`);
    if (!isStDType(t.dtype)) throw new Error(`${file}: tensor '${name}': unknown dtype ${JSON.stringify(t.dtype)}`);
    if (!t.shape.every((d) => Number.isSafeInteger(d) && d >= 0)) {
      throw new Error(`${file}: tensor '${name}': shape must be non-negative integers, got ${JSON.stringify(t.shape)}`);
    }
    const bytes = numel(t.shape) * ST_DTYPE_SIZE[t.dtype];
    header[name] = { dtype: t.dtype, shape: [...t.shape], data_offsets: [offset, offset + bytes] };
    offset += bytes;
  }
  let json = JSON.stringify(header);
  const raw = Buffer.byteLength(json, 'utf8');
  json += ' '.repeat((8 - (raw % 8)) % 8);
  const hbuf = Buffer.from(json, 'utf8');
  const lenBuf = Buffer.alloc(8);
  lenBuf.writeBigUInt64LE(BigInt(hbuf.length));

  function* chunks(): Generator<Uint8Array> {
    yield lenBuf;
    yield hbuf;
    for (const [name, t] of order) {
      const data = typeof t.data === 'function' ? t.data() : t.data;
      const n = numel(t.shape);
      if (data.constructor.name !== ARRAY_OF[t.dtype]) {
        throw new Error(
          `${file}: tensor '${name}': ${t.dtype} data must be a ${ARRAY_OF[t.dtype]}, got ${data.constructor.name}`,
        );
      }
      if (data.length !== n) {
        throw new Error(
          `${file}: tensor '${name}': ${t.dtype} ${fmtShape(t.shape)} needs ${n} elements, got ${data.length}`,
        );
      }
      yield new Uint8Array(data.buffer, data.byteOffset, data.byteLength);
    }
  }
  writeFileAtomic(file, chunks());
}
