// `mlora bench --scenario gemm-dtypes`: the frozen GEMMs of the bench model with the weight in
// each base format (f32, bf16, int8, NF4, double-quantized NF4; f32 or bf16 compute), against the
// f32 FMA and bf16 instruction peaks measured in the same run.
import os from 'node:os';
import { cpuModel } from '../../lib/machine.js';
import { native, type Op, type Tensor } from '../../lib/native.js';
import { openDevice } from '../../lib/tensor.js';
import { Rng } from '../../lib/rng.js';
import { BENCH_MODEL, bestMs, randomTensor, type BenchOptions } from './bench-common.js';

interface DtypeMode {
  name: string;
  /** storage of the weight */
  weight: 'f32' | 'bf16' | 'int8' | 'nf4' | 'nf4dq';
  /** GEMM operands rounded to bf16 (compute_dtype bf16) */
  bf16: boolean;
}
const DTYPE_MODES: DtypeMode[] = [
  { name: 'f32', weight: 'f32', bf16: false },
  { name: 'bf16', weight: 'bf16', bf16: true },
  { name: 'int8', weight: 'int8', bf16: false },
  { name: 'int8+bf16', weight: 'int8', bf16: true },
  { name: 'nf4', weight: 'nf4', bf16: false },
  { name: 'nf4+bf16', weight: 'nf4', bf16: true },
  { name: 'nf4-dq+bf16', weight: 'nf4dq', bf16: true },
];

export async function benchGemmDtypes(opts: BenchOptions) {
  const info = native().info();
  const d = openDevice('cpu:0', { threads: opts.threads, budget: 2 ** 31 });
  const reps = opts.quick ? 1 : 3;
  const minMs = opts.quick ? 0 : 200;
  const rng = new Rng(1, 'bench-gemm-dtypes');
  const log = (s: string) => (opts.json ? console.error(s) : console.log(s));
  const { hidden: H, intermediate: I, heads, kvHeads, headDim } = BENCH_MODEL;
  const M = opts.quick ? 256 : BENCH_MODEL.tokens;
  log(
    `mlora bench --scenario gemm-dtypes   ${cpuModel()}, ${os.cpus().length} hardware threads, device threads ${opts.threads}`,
  );
  log(`gemm kernel ${info.cpu.gemmKernel}, bf16 compute ${info.cpu.gemmBf16Kernel}; avx512bf16 ${info.cpu.avx512bf16}`);
  const shapes: Array<[string, number, number]> = [
    ['q_proj/o_proj', heads * headDim, H],
    ['k_proj/v_proj', kvHeads * headDim, H],
    ['gate/up_proj', I, H],
    ['down_proj', H, I],
  ];
  // Ceilings: the f32 FMA and the bf16 kernel's instruction (vdpbf16ps), all device threads, same run.
  const out = d.alloc('f32', [1]);
  const peakOf = (bf16: boolean) => {
    let best = 0;
    for (let r = 0; r < (opts.quick ? 1 : 3); r++) {
      d.runSync([{ op: 'fma_peak', out, iterations: opts.quick ? 2e6 : 1e7, bf16 }]);
      best = Math.max(best, (out.read() as Float32Array)[0]!);
    }
    return best;
  };
  const peaks = { f32: peakOf(false), bf16: peakOf(true) };
  // Weights of every mode for every shape, made once; then the modes alternate per shape and
  // orientation, best of several runs each, so a load change hits all modes alike.
  const rows: Array<{ mode: string; name: string; orientation: string; ms: number; gflops: number }> = [];
  for (const [name, n, k] of shapes) {
    const w32 = randomTensor(d, rng, 'f32', [n, k], 0.05);
    const ws = new Map<string, Tensor>();
    for (const m of DTYPE_MODES) {
      if (ws.has(m.weight)) continue;
      if (m.weight === 'f32') ws.set('f32', w32);
      else if (m.weight === 'bf16') {
        const t = d.alloc('bf16', [n, k]);
        d.runSync([{ op: 'copy', y: t, x: w32 }]);
        ws.set('bf16', t);
      } else {
        const t = d.alloc(m.weight, [n, k]);
        d.runSync([{ op: 'quantize', dst: t, src: w32 }]);
        ws.set(m.weight, t);
      }
    }
    const x = randomTensor(d, rng, 'f32', [M, k]);
    const y = d.alloc('f32', [M, n]);
    for (const orientation of ['forward X·Wᵀ', 'backward dY·W'] as const)
      for (const m of DTYPE_MODES) {
        const w = ws.get(m.weight)!;
        const op: Op =
          orientation === 'forward X·Wᵀ'
            ? { op: 'linear_forward', y, x, w, bf16: m.bf16 }
            : { op: 'linear_backward', dx: x, dy: y, w, bf16: m.bf16 };
        const ms = bestMs(() => d.runSync([op]), reps, minMs);
        rows.push({ mode: m.name, name, orientation, ms, gflops: (2 * M * n * k) / ms / 1e6 });
      }
    for (const t of new Set(ws.values())) t.free();
    x.free();
    y.free();
  }
  log('');
  log(`frozen GEMMs of the bench model, M = ${M} tokens (best of ≥${reps} runs; GFLOP/s = 2·M·N·K / time)`);
  log(`${'layer'.padEnd(14)} ${'orientation'.padEnd(14)} ${DTYPE_MODES.map((m) => m.name.padStart(11)).join(' ')}`);
  for (const [name] of shapes)
    for (const orientation of ['forward X·Wᵀ', 'backward dY·W'])
      log(
        `${name.padEnd(14)} ${orientation.padEnd(14)} ${DTYPE_MODES.map((m) =>
          rows
            .find((r) => r.mode === m.name && r.name === name && r.orientation === orientation)!
            .gflops.toFixed(1)
            .padStart(11),
        ).join(' ')}`,
      );
  // One layer's frozen GEMMs (q, k, v, o, gate, up, down), forward + backward: total flops / total time.
  const count: Record<string, number> = { 'q_proj/o_proj': 2, 'k_proj/v_proj': 2, 'gate/up_proj': 2, down_proj: 1 };
  const layer: Record<string, number> = {};
  for (const m of DTYPE_MODES) {
    let flops = 0;
    let ms = 0;
    for (const r of rows.filter((r) => r.mode === m.name)) {
      flops += count[r.name]! * r.gflops * r.ms;
      ms += count[r.name]! * r.ms;
    }
    layer[m.name] = flops / ms;
  }
  peaks.f32 = Math.max(peaks.f32, peakOf(false));
  peaks.bf16 = Math.max(peaks.bf16, peakOf(true));
  out.free();
  log('');
  log(
    `ceilings (same run): f32 FMA peak ${peaks.f32.toFixed(1)} GFLOP/s; bf16 kernel instruction peak ${peaks.bf16.toFixed(1)} GFLOP/s (${(peaks.bf16 / peaks.f32).toFixed(2)}x)`,
  );
  log(
    `one layer's frozen GEMMs (fwd + bwd): ${DTYPE_MODES.map((m) => `${m.name} ${layer[m.name]!.toFixed(1)}`).join(', ')} GFLOP/s`,
  );
  log(
    `ratios: bf16/f32 ${(layer.bf16! / layer.f32!).toFixed(2)}x; nf4+bf16 / bf16 ${((100 * layer['nf4+bf16']!) / layer.bf16!).toFixed(0)}%; ` +
      `int8+bf16 / bf16 ${((100 * layer['int8+bf16']!) / layer.bf16!).toFixed(0)}%; nf4 / f32 ${((100 * layer.nf4!) / layer.f32!).toFixed(0)}%; int8 / f32 ${((100 * layer.int8!) / layer.f32!).toFixed(0)}%`,
  );
  return {
    scenario: 'gemm-dtypes',
    machine: {
      cpu: cpuModel(),
      hardwareThreads: os.cpus().length,
      deviceThreads: opts.threads,
      gemmKernel: info.cpu.gemmKernel,
      gemmBf16Kernel: info.cpu.gemmBf16Kernel,
    },
    tokens: M,
    ceilings: { fmaPeakGflops: peaks.f32, bf16PeakGflops: peaks.bf16 },
    gemm: rows,
    layerGflops: layer,
  };
}
