// Devices and tensors as the rest of the library sees them: parse a device spec
// ("cpu:0", "cuda:1"), open it with a thread count and a byte budget, and move data in and
// out. The tensor handles themselves are native (lib/native.ts).
import os from 'node:os';
import { native, type DType, type NativeDevice, type Tensor } from './native.js';

export type { DType, NativeDevice as Device, Tensor } from './native.js';

export interface DeviceSpec {
  kind: 'cpu' | 'cuda';
  index: number;
}

export function parseDeviceSpec(spec: string): DeviceSpec {
  const m = /^(cpu|cuda)(?::(\d+))?$/.exec(spec.trim());
  if (!m) throw new Error(`invalid device '${spec}': expected cpu:N or cuda:N (e.g. cpu:0, cuda:1)`);
  return { kind: m[1] as 'cpu' | 'cuda', index: m[2] === undefined ? 0 : Number(m[2]) };
}

export function formatBytes(b: number): string {
  if (b >= 2 ** 30) return `${(b / 2 ** 30).toFixed(b % 2 ** 30 === 0 ? 0 : 1)} GiB`;
  if (b >= 2 ** 20) return `${(b / 2 ** 20).toFixed(b % 2 ** 20 === 0 ? 0 : 1)} MiB`;
  if (b >= 2 ** 10) return `${(b / 2 ** 10).toFixed(0)} KiB`;
  return `${b} B`;
}

/** Parses "4GiB", "512MiB", "1.5G", or a plain byte count. */
export function parseBytes(s: string | number): number {
  if (typeof s === 'number') return s;
  const m = /^\s*([\d.]+)\s*(b|k|kb|kib|m|mb|mib|g|gb|gib|t|tb|tib)?\s*$/i.exec(s);
  if (!m) throw new Error(`invalid byte size '${s}': expected e.g. 512MiB, 4GiB or a number of bytes`);
  const unit = (m[2] ?? 'b').toLowerCase()[0]!;
  const mult = { b: 1, k: 2 ** 10, m: 2 ** 20, g: 2 ** 30, t: 2 ** 40 }[unit] ?? 1;
  return Math.floor(Number(m[1]) * mult);
}

export interface OpenDeviceOptions {
  threads?: number;
  budget?: number;
  /** CPU devices: pin the compute threads, one CPU id per thread (lib/schedule/cores.ts). */
  cores?: number[];
}

/** Default CPU budget: an even share of 80% of the machine's memory. */
export function defaultCpuBudget(devicesOnMachine = 1): number {
  return Math.floor((os.totalmem() * 0.8) / Math.max(1, devicesOnMachine));
}

export function openDevice(spec: string | DeviceSpec, options: OpenDeviceOptions = {}): NativeDevice {
  const s = typeof spec === 'string' ? parseDeviceSpec(spec) : spec;
  const Device = native().Device;
  if (s.kind === 'cpu') {
    return new Device({
      kind: 'cpu',
      index: s.index,
      threads: options.threads ?? 1,
      budget: options.budget ?? defaultCpuBudget(),
      ...(options.cores ? { cores: options.cores } : {}),
    });
  }
  return new Device({
    kind: 'cuda',
    index: s.index,
    threads: options.threads ?? 1,
    ...(options.budget ? { budget: options.budget } : {}),
  });
}

export function tensorFrom(device: NativeDevice, dtype: DType, shape: number[], data: ArrayLike<number>): Tensor {
  if (dtype === 'i32') return device.fromArray('i32', shape, Int32Array.from(data));
  if (dtype === 'f32') return device.fromArray('f32', shape, Float32Array.from(data));
  throw new Error(`tensorFrom: use fromArray with Uint16Array bits for ${dtype}`);
}

/** Reads an f32 tensor as a Float32Array (throws for other dtypes). */
export function readF32(t: Tensor): Float32Array {
  const a = t.read();
  if (!(a instanceof Float32Array)) throw new Error(`readF32: tensor is ${t.dtype}, not f32`);
  return a;
}
