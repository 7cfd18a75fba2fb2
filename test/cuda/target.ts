// Which device the CUDA tests run on (not a test file itself). On a GPU: cuda:0, against the
// CPU backend. Without one the GPU tests skip with the reason, except in a rehearsal of the
// device check (MLORA_DEVICE_CHECK_REHEARSE=1, set by scripts/device-check.sh): then a second
// CPU device, cpu:1, stands in for cuda:0, so that every GPU test's own code (shapes, argument
// layouts, tolerances, the pipeline wiring) runs here before a GPU minute is spent on it. A
// rehearsal proves the test code, not the CUDA kernels: cpu:1 runs the CPU kernels.
import { native } from '../../lib/native.js';

const info = native().info();

export const rehearsal = process.env.MLORA_DEVICE_CHECK_REHEARSE === '1';

/** The device spec the GPU side of each comparison opens. */
export const gpuSpec = info.cuda.devices > 0 ? 'cuda:0' : rehearsal ? 'cpu:1' : 'cuda:0';

/** Why the GPU tests are skipped here (false: they run, on gpuSpec). */
export const noGpu: string | false =
  info.cuda.devices > 0 || rehearsal
    ? false
    : `no usable CUDA device (compiled: ${info.cuda.compiled}): ${info.cuda.reason}`;

/** A label for messages: what the GPU side really is. */
export const gpuLabel =
  info.cuda.devices > 0 ? 'cuda:0' : rehearsal ? 'cpu:1 (rehearsal stand-in for cuda:0)' : 'cuda:0 (absent)';

/** Whether the GPU side is a real CUDA device (cuBLAS-only tests need one even in a rehearsal). */
export const realGpu = info.cuda.devices > 0;
