// What a run ran on and with which mlora: recorded in every run header of metrics.jsonl and in
// report.html, so numbers from two runs can be told apart and compared fairly.
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { native } from './native.js';

export interface MachineInfo {
  cpu: string;
  cores: number;
  /** The CPU GEMM micro-kernel the addon picked (native info). */
  gemm_kernel: string;
  cuda_devices: number;
  /** The GEMM of the CUDA kernels (cuBLAS or the tiled fallback), when CUDA is compiled in. */
  cuda_gemm?: string;
  os: string;
  node: string;
}

export function cpuModel(): string {
  try {
    const m = /^model name\s*:\s*(.+)$/m.exec(fs.readFileSync('/proc/cpuinfo', 'utf8'));
    if (m) return m[1]!.trim();
  } catch {
    /* not Linux */
  }
  return os.cpus()[0]?.model ?? 'unknown';
}

export function machineInfo(): MachineInfo {
  const info = native().info();
  return {
    cpu: cpuModel(),
    cores: os.availableParallelism(),
    gemm_kernel: info.cpu.gemmKernel,
    cuda_devices: info.cuda.devices,
    ...(info.cuda.compiled ? { cuda_gemm: info.cuda.gemm } : {}),
    os: `${os.type()} ${os.release()} ${os.arch()}`,
    node: process.version,
  };
}

/** The version in mlora's package.json. */
export function mloraVersion(): string {
  const here = path.dirname(fileURLToPath(import.meta.url));
  // here is dist/lib (compiled) or lib (sources run directly)
  for (const up of ['../..', '..']) {
    try {
      const pkg = JSON.parse(fs.readFileSync(path.resolve(here, up, 'package.json'), 'utf8')) as {
        name?: string;
        version?: string;
      };
      if (pkg.name === 'mlora' && pkg.version) return pkg.version;
    } catch {
      /* try the next */
    }
  }
  return 'unknown';
}
