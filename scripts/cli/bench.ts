// mlora bench: benchmarks, one scenario per entry of `scenarios` below. Each scenario prints a
// human table (or one JSON document with --json) and measures its own ceilings in the same
// run, so a number is always read next to what this machine could do at that moment.
//
//   mlora bench --scenario kernels [--threads N] [--json] [--quick]
//   mlora bench --scenario gemm-dtypes [--threads N] [--json] [--quick]
//   mlora bench --scenario precision [--preset bench|1b] [--modes f32,bf16,int8,nf4,nf4+bf16] [--micro-batch M --seq-len T] [--steps N] [--threads N] [--json]
//   mlora bench --scenario batchlora [--adapters 1,2,4,8] [--rank 16] [--micro-batch M --seq-len T] [--steps N] [--threads N] [--json]
//   mlora bench --scenario head [--micro-batch M --seq-len T] [--steps N] [--threads N] [--json]
//   mlora bench --scenario recompute [--micro-batch M --seq-len T] [--steps N] [--threads N] [--json]
//   mlora bench --scenario pipeline [--adapters 1,2,4,8] [--rank 16] [--micro-batch M] [--seq-len T] [--steps N] [--json]
//   mlora bench --scenario gpu [--device cuda:0] [--models bench,1b|DIR,...] [--adapters 1,4,8] [--stages 1,2] [--rank 16]
//               [--micro-batch M --seq-len T] [--steps N] [--ceiling-n N] [--baseline PEFT.json] [--json]
// --threads defaults to every core (os.availableParallelism()), as for `mlora train`.
import os, { availableParallelism } from 'node:os';
import { cpuModel } from '../../lib/machine.js';
import { native, type Op, type Tensor } from '../../lib/native.js';
import { openDevice, type Device } from '../../lib/tensor.js';
import { Rng } from '../../lib/rng.js';
import {
  batchloraScenario,
  headScenario,
  pipelineScenario,
  PRECISION_MODES,
  precisionScenario,
  recomputeScenario,
  type TrainBenchRecord,
} from './bench-train.js';
import { gpuScenario, printGpuTable } from './bench-gpu.js';

export interface BenchOptions {
  threads: number;
  json: boolean;
  /** Training scenarios: adapter counts, LoRA rank, micro-batch shape (sequences × tokens), steps. */
  adapters?: number[];
  rank?: number;
  microBatch?: number;
  seqLen?: number;
  steps?: number;
  /** Fewer repetitions (smoke runs); the numbers are noisier. */
  quick: boolean;
  /** precision scenario: the preset and the base formats to run */
  preset?: 'bench' | '1b';
  modes?: string[];
  /** The gpu scenario: device, models (presets or directories), stage counts, ceiling GEMM size, PEFT baseline JSON. */
  device?: string;
  models?: string[];
  stages?: number[];
  ceilingN?: number;
  baseline?: string;
}

interface Scenario {
  summary: string;
  run(opts: BenchOptions): Promise<unknown>;
}

const scenarios: Record<string, Scenario> = {
  kernels: {
    summary: "GEMM shapes of the bench model vs this machine's FMA peak and sgemm ceiling; layer time split",
    run: benchKernels,
  },
  'gemm-dtypes': {
    summary:
      'frozen GEMMs of the bench model per base format: f32, bf16 (vdpbf16ps), int8 and NF4 (dequantized while packing)',
    run: benchGemmDtypes,
  },
  precision: {
    summary:
      'training tokens/s and resident memory of a preset (--preset bench|1b) with its base in f32, bf16, int8, NF4 (one device)',
    run: async (o) => {
      const log = (s: string) => (o.json ? console.error(s) : console.log(s));
      return precisionScenario(
        {
          preset: o.preset ?? 'bench',
          threads: o.threads,
          steps: o.steps ?? (o.quick ? 1 : 3),
          micro: o.microBatch ?? 1,
          seqLen: o.seqLen ?? 128,
          modes: o.modes ?? Object.keys(PRECISION_MODES),
        },
        log,
      );
    },
  },
  batchlora: {
    summary: 'K adapters batched in one micro-batch vs trained one after another (bench model, one device)',
    run: async (o) => {
      const log = (s: string) => (o.json ? console.error(s) : console.log(s));
      const shapes =
        o.microBatch || o.seqLen
          ? [{ micro: o.microBatch ?? 4, seqLen: o.seqLen ?? 256 }]
          : [
              { micro: 4, seqLen: 256 },
              { micro: 1, seqLen: 128 },
            ];
      const recs = await batchloraScenario(
        {
          adapters: o.adapters ?? [1, 2, 4, 8],
          rank: o.rank ?? 16,
          shapes,
          steps: o.steps ?? (o.quick ? 1 : 3),
          threads: o.threads,
        },
        log,
      );
      if (!o.json) printTrainTable(recs);
      return recs;
    },
  },
  head: {
    summary:
      'LM head on the targeted rows only vs on every row, for several fractions of targeted rows (bench model, one device)',
    run: async (o) => {
      const log = (s: string) => (o.json ? console.error(s) : console.log(s));
      return headScenario(
        {
          threads: o.threads,
          steps: o.steps ?? (o.quick ? 1 : 3),
          micro: o.microBatch ?? 4,
          seqLen: o.seqLen ?? 256,
          fractions: [1, 0.5, 0.25],
        },
        log,
      );
    },
  },
  recompute: {
    summary:
      'training with and without activation recomputation: time and bytes kept per micro-batch (bench model, one device)',
    run: async (o) => {
      const log = (s: string) => (o.json ? console.error(s) : console.log(s));
      return recomputeScenario(
        { threads: o.threads, steps: o.steps ?? (o.quick ? 1 : 5), micro: o.microBatch ?? 4, seqLen: o.seqLen ?? 256 },
        log,
      );
    },
  },
  gpu: {
    summary:
      'one GPU: bench and 1b models (bf16), K adapters, 1 and 2 stage actors; tokens/s, MFU vs the bf16 GEMM ceiling, vs PEFT',
    run: async (o) => {
      const log = (s: string) => (o.json ? console.error(s) : console.log(s));
      const device = o.device ?? 'cuda:0';
      const cuda = device.startsWith('cuda');
      const r = await gpuScenario(
        {
          device,
          models: o.models ?? ['bench', '1b'],
          adapters: o.adapters ?? [1, 4, 8],
          stages: o.stages ?? [1, 2],
          rank: o.rank ?? 16,
          micro: o.microBatch ?? (cuda ? 2 : 1),
          seqLen: o.seqLen ?? (cuda ? 512 : 32),
          steps: o.steps ?? (o.quick ? 1 : 3),
          ceilingN: o.ceilingN ?? (cuda ? 8192 : 256),
          ...(o.baseline ? { baseline: o.baseline } : {}),
        },
        log,
      );
      printGpuTable(r, log);
      return r;
    },
  },
  pipeline: {
    summary: '2 stage actors (1 thread each) vs 1 stage with 1 and 2 threads; busy fractions and bubble ratio',
    run: async (o) => {
      const log = (s: string) => (o.json ? console.error(s) : console.log(s));
      const recs = await pipelineScenario(
        {
          adapters: o.adapters ?? [1, 2, 4, 8],
          rank: o.rank ?? 16,
          micro: o.microBatch ?? 2,
          seqLen: o.seqLen ?? 128,
          steps: o.steps ?? (o.quick ? 1 : 3),
        },
        log,
      );
      if (!o.json) printTrainTable(recs);
      return recs;
    },
  },
};

function printTrainTable(recs: TrainBenchRecord[]): void {
  console.log('\nscenario   mode                        K  micro×seq  tokens/s   MFU   ms/step  bubble');
  for (const r of recs) {
    console.log(
      `${r.scenario.padEnd(10)} ${r.mode.padEnd(26)} ${String(r.adapters).padStart(2)}  ${`${r.micro_batch}×${r.seq_len}`.padStart(9)}  ${String(r.tokens_per_s).padStart(8)}  ${(100 * r.mfu).toFixed(1).padStart(4)}%  ${String(r.step_ms).padStart(7)}  ${r.bubble !== undefined ? `${(100 * r.bubble).toFixed(1)}%` : '-'}`,
    );
  }
  const ceil = recs[0]?.gemm_ceiling_gflops;
  if (ceil)
    console.log(
      `MFU = model FLOPs (frozen-base forward + dX, LoRA, attention, head) / GEMM ceiling measured in this run (${ceil} GFLOP/s for the first row's threads)`,
    );
}

function usage(): string {
  const lines = [
    'usage: mlora bench --scenario NAME [--threads N] [--json] [--quick] [--adapters 1,2,4,8] [--rank R] [--micro-batch M] [--seq-len T] [--steps N] [--preset bench|1b] [--modes f32,bf16,int8,nf4,nf4+bf16]',
    '       gpu only: [--device cuda:0] [--models bench,1b|DIR,...] [--stages 1,2] [--ceiling-n N] [--baseline PEFT.json]',
    '',
    'scenarios:',
  ];
  for (const [name, s] of Object.entries(scenarios)) lines.push(`  ${name.padEnd(10)} ${s.summary}`);
  return lines.join('\n');
}

export function parseBenchArgs(
  argv: string[],
): { scenario: string; opts: BenchOptions } | { error: string } | { help: true } {
  let scenario = '';
  const opts: BenchOptions = { threads: availableParallelism(), json: false, quick: false };
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i]!;
    const value = (): string => {
      const v = a.includes('=') ? a.slice(a.indexOf('=') + 1) : argv[++i];
      if (v === undefined) throw new Error(`${a} needs a value`);
      return v;
    };
    try {
      if (a === '--help' || a === '-h') return { help: true };
      else if (a === '--scenario' || a.startsWith('--scenario=')) scenario = value();
      else if (a === '--threads' || a.startsWith('--threads=')) {
        const v = value();
        opts.threads = Number(v);
        if (!Number.isInteger(opts.threads) || opts.threads < 1)
          return { error: `--threads must be a positive integer, got '${v}'` };
      } else if (a === '--preset' || a.startsWith('--preset=')) {
        const v = value();
        if (v !== 'bench' && v !== '1b') return { error: `--preset must be bench or 1b, got '${v}'` };
        opts.preset = v;
      } else if (a === '--modes' || a.startsWith('--modes=')) {
        const v = value();
        opts.modes = v.split(',');
        const bad = opts.modes.filter((m) => !(m in PRECISION_MODES));
        if (bad.length)
          return {
            error: `--modes: unknown mode(s) ${bad.join(', ')} (known: ${Object.keys(PRECISION_MODES).join(', ')})`,
          };
      } else if (a === '--json') opts.json = true;
      else if (a === '--quick') opts.quick = true;
      else if (a === '--adapters' || a.startsWith('--adapters=') || a === '--stages' || a.startsWith('--stages=')) {
        const flag = a.split('=')[0]!;
        const v = value();
        const list = v.split(',').map(Number);
        if (list.some((n) => !Number.isInteger(n) || n < 1))
          return { error: `${flag} must be a list of positive integers, got '${v}'` };
        if (flag === '--adapters') opts.adapters = list;
        else opts.stages = list;
      } else if (a === '--device' || a.startsWith('--device=')) {
        const v = value();
        if (!/^(cpu|cuda)(:\d+)?$/.test(v)) return { error: `--device must be cpu:N or cuda:N, got '${v}'` };
        opts.device = v.includes(':') ? v : `${v}:0`;
      } else if (a === '--models' || a.startsWith('--models=')) {
        const v = value();
        opts.models = v.split(',').filter(Boolean);
        if (!opts.models.length) return { error: `--models must name presets or model directories, got '${v}'` };
      } else if (a === '--baseline' || a.startsWith('--baseline=')) opts.baseline = value();
      else if (
        ['--rank', '--micro-batch', '--seq-len', '--steps', '--ceiling-n'].some((f) => a === f || a.startsWith(`${f}=`))
      ) {
        const flag = a.split('=')[0]!;
        const v = value();
        const n = Number(v);
        if (!Number.isInteger(n) || n < 1) return { error: `${flag} must be a positive integer, got '${v}'` };
        if (flag === '--rank') opts.rank = n;
        else if (flag === '--micro-batch') opts.microBatch = n;
        else if (flag === '--seq-len') opts.seqLen = n;
        else if (flag === '--ceiling-n') opts.ceilingN = n;
        else opts.steps = n;
      } else return { error: `unknown option '${a}'` };
    } catch (e) {
      return { error: (e as Error).message };
    }
  }
  if (!scenario) return { error: 'missing --scenario' };
  if (!scenarios[scenario])
    return { error: `unknown scenario '${scenario}' (known: ${Object.keys(scenarios).join(', ')})` };
  return { scenario, opts };
}

export async function main(argv: string[]): Promise<number> {
  const parsed = parseBenchArgs(argv);
  if ('help' in parsed) {
    console.log(usage());
    return 0;
  }
  if ('error' in parsed) {
    console.error(`mlora bench: ${parsed.error}\n\n${usage()}`);
    return 2;
  }
  const result = await scenarios[parsed.scenario]!.run(parsed.opts);
  if (parsed.opts.json) console.log(JSON.stringify(result, null, 2));
  return 0;
}

// ---------------------------------------------------------------------------------------------
// Shared measuring helpers

/** Best wall time (ms) of fn over at least `minReps` runs and `minMs` total, after one warm-up. */
function bestMs(fn: () => void, minReps: number, minMs: number): number {
  fn();
  let best = Infinity;
  let total = 0;
  for (let r = 0; r < minReps || total < minMs; r++) {
    const t0 = performance.now();
    fn();
    const dt = performance.now() - t0;
    best = Math.min(best, dt);
    total += dt;
    if (r > 50) break;
  }
  return best;
}

function randomTensor(d: Device, rng: Rng, dtype: 'f32' | 'bf16', shape: number[], std = 1): Tensor {
  const n = shape.reduce((a, b) => a * b, 1);
  const x = rng.fillNormal(new Float32Array(n), std);
  if (dtype === 'f32') return d.fromArray('f32', shape, x);
  const bits = new Uint16Array(n);
  const u = new Uint32Array(x.buffer);
  for (let i = 0; i < n; i++) bits[i] = (u[i]! + 0x7fff + ((u[i]! >>> 16) & 1)) >>> 16; // round to nearest even
  return d.fromArray('bf16', shape, bits);
}

// ---------------------------------------------------------------------------------------------
// Scenario: gemm-dtypes

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

async function benchGemmDtypes(opts: BenchOptions) {
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

// ---------------------------------------------------------------------------------------------
// Scenario: kernels

/** The bench model: 4 layers, hidden 512, 8 heads × 64 (4 KV heads), intermediate 1376, vocab 8192. */
const BENCH_MODEL = { hidden: 512, heads: 8, kvHeads: 4, headDim: 64, intermediate: 1376, vocab: 8192, tokens: 2048 };

interface GemmRow {
  name: string;
  orientation: 'forward X·Wᵀ' | 'backward dY·W';
  dtype: 'f32' | 'bf16';
  m: number;
  n: number;
  k: number;
  ms: number;
  gflops: number;
  ofSgemm: number;
  ofPeak: number;
}

async function benchKernels(opts: BenchOptions) {
  const info = native().info();
  const d = openDevice('cpu:0', { threads: opts.threads, budget: 2 ** 31 });
  const reps = opts.quick ? 1 : 3;
  const minMs = opts.quick ? 0 : 300;
  const rng = new Rng(1, 'bench-kernels');
  const log = (s: string) => {
    if (!opts.json) console.log(s);
  };

  log(
    `mlora bench --scenario kernels   ${cpuModel()}, ${os.cpus().length} hardware threads, device threads ${opts.threads}`,
  );
  log(`gemm kernel ${info.cpu.gemmKernel}; avx2 ${info.cpu.avx2}, avx512f ${info.cpu.avx512f}, f16c ${info.cpu.f16c}`);

  // Ceiling 1: FP32 FMA throughput of the kernel's vector unit, all device threads.
  const out = d.alloc('f32', [1]);
  const fmaPeak = () => {
    let best = 0;
    for (let r = 0; r < (opts.quick ? 1 : 5); r++) {
      d.runSync([{ op: 'fma_peak', out, iterations: opts.quick ? 2e6 : 2e7 }]);
      best = Math.max(best, (out.read() as Float32Array)[0]!);
    }
    return best;
  };
  let peak = fmaPeak();

  // Ceiling 2: a large square sgemm with our kernel.
  const S = opts.quick ? 512 : 2048;
  const A = randomTensor(d, rng, 'f32', [S, S]);
  const B = randomTensor(d, rng, 'f32', [S, S]);
  const C = d.alloc('f32', [S, S]);
  const sq = bestMs(() => d.runSync([{ op: 'gemm', c: C, a: A, b: B }]), reps, minMs);
  const sgemm = (2 * S ** 3) / sq / 1e6;
  A.free();
  B.free();
  C.free();

  const { hidden: H, intermediate: I, vocab: V, tokens: M, heads, kvHeads, headDim } = BENCH_MODEL;
  const shapes: Array<[string, number, number]> = [
    ['q_proj/o_proj', heads * headDim, H],
    ['k_proj/v_proj', kvHeads * headDim, H],
    ['gate/up_proj', I, H],
    ['down_proj', H, I],
    ['lm_head', V, H],
  ];
  const rows: GemmRow[] = [];
  for (const dtype of ['f32', 'bf16'] as const)
    for (const [name, n, k] of shapes) {
      const w = randomTensor(d, rng, dtype, [n, k], 0.05);
      const x = randomTensor(d, rng, 'f32', [M, k]);
      const y = d.alloc('f32', [M, n]);
      for (const orientation of ['forward X·Wᵀ', 'backward dY·W'] as const) {
        const op: Op =
          orientation === 'forward X·Wᵀ'
            ? { op: 'linear_forward', y, x, w }
            : { op: 'linear_backward', dx: x, dy: y, w };
        const ms = bestMs(() => d.runSync([op]), reps, minMs);
        const gflops = (2 * M * n * k) / ms / 1e6;
        rows.push({ name, orientation, dtype, m: M, n, k, ms, gflops, ofSgemm: 0, ofPeak: 0 });
      }
      w.free();
      x.free();
      y.free();
    }
  // The peak again at the end: the machine may be shared, keep the better of the two.
  peak = Math.max(peak, fmaPeak());
  out.free();
  for (const r of rows) {
    r.ofSgemm = r.gflops / sgemm;
    r.ofPeak = r.gflops / peak;
  }

  log('');
  log(
    `ceilings (same run): FMA peak ${peak.toFixed(1)} GFLOP/s; sgemm ${S}³ ${sgemm.toFixed(1)} GFLOP/s (${((100 * sgemm) / peak).toFixed(0)}% of peak)`,
  );
  log('');
  log(`GEMM shapes of the bench model, M = ${M} tokens (best of ≥${reps} runs; GFLOP/s = 2·M·N·K / time)`);
  log(
    `${'layer'.padEnd(14)} ${'orientation'.padEnd(14)} ${'W'.padEnd(5)} ${'M×N×K'.padEnd(16)} ${'ms'.padStart(8)} ${'GFLOP/s'.padStart(8)} ${'of sgemm'.padStart(9)} ${'of peak'.padStart(8)}`,
  );
  for (const r of rows)
    log(
      `${r.name.padEnd(14)} ${r.orientation.padEnd(14)} ${r.dtype.padEnd(5)} ${`${r.m}×${r.n}×${r.k}`.padEnd(16)} ` +
        `${r.ms.toFixed(2).padStart(8)} ${r.gflops.toFixed(1).padStart(8)} ${`${(100 * r.ofSgemm).toFixed(0)}%`.padStart(9)} ${`${(100 * r.ofPeak).toFixed(0)}%`.padStart(8)}`,
    );

  const attention = attentionRows(d, rng, opts, sgemm);
  log('');
  log(
    `attention (causal, ${M} tokens packed as ${M}/T sequences, ${heads} heads, ${kvHeads} kv heads; GFLOP/s of causal FLOPs: forward 4·M·(T/2)·heads·d, backward 2.5× that)`,
  );
  log(
    `${'T'.padStart(5)} ${'d'.padStart(4)} ${'fwd ms'.padStart(8)} ${'bwd ms'.padStart(8)} ${'fwd GF/s'.padStart(9)} ${'bwd GF/s'.padStart(9)} ${'fwd+bwd'.padStart(8)} ${'of sgemm'.padStart(9)}`,
  );
  for (const r of attention)
    log(
      `${String(r.seqLen).padStart(5)} ${String(r.headDim).padStart(4)} ${r.fwdMs.toFixed(2).padStart(8)} ${r.bwdMs.toFixed(2).padStart(8)} ` +
        `${r.fwdGflops.toFixed(1).padStart(9)} ${r.bwdGflops.toFixed(1).padStart(9)} ${r.gflops.toFixed(1).padStart(8)} ${`${(100 * r.ofSgemm).toFixed(0)}%`.padStart(9)}`,
    );

  // ---- Time split of one full layer forward+backward by kernel family --------------------
  const split = layerSplit(d, rng, opts, log);
  const loraCost = loraOverhead(d, rng, opts, log);
  return {
    scenario: 'kernels',
    machine: {
      cpu: cpuModel(),
      hardwareThreads: os.cpus().length,
      deviceThreads: opts.threads,
      gemmKernel: info.cpu.gemmKernel,
    },
    model: BENCH_MODEL,
    ceilings: { fmaPeakGflops: peak, sgemm: { size: S, gflops: sgemm } },
    gemm: rows,
    attention,
    layerSplit: split,
    loraOverhead: loraCost,
  };
}

interface AttentionRow {
  seqLen: number;
  headDim: number;
  fwdMs: number;
  bwdMs: number;
  fwdGflops: number;
  bwdGflops: number;
  /** forward + backward together */
  gflops: number;
  ofSgemm: number;
}

/** attention_forward / attention_backward of the bench model's heads at sequence 256 and 512,
 *  head dim 64 and 128, over the bench model's token count. */
function attentionRows(d: Device, rng: Rng, opts: BenchOptions, sgemm: number): AttentionRow[] {
  const { tokens: n, heads: hq, kvHeads: hkv } = BENCH_MODEL;
  const reps = opts.quick ? 1 : 3;
  const minMs = opts.quick ? 0 : 300;
  const rows: AttentionRow[] = [];
  for (const T of [256, 512])
    for (const hd of [64, 128]) {
      const owned: Tensor[] = [];
      const f32 = (shape: number[]) => (owned.push(randomTensor(d, rng, 'f32', shape)), owned[owned.length - 1]!);
      const buf = (shape: number[]) => (owned.push(d.alloc('f32', shape)), owned[owned.length - 1]!);
      const q = f32([n, hq * hd]),
        k = f32([n, hkv * hd]),
        v = f32([n, hkv * hd]),
        dout = f32([n, hq * hd]);
      const out = buf([n, hq * hd]),
        lse = buf([hq, n]);
      const dq = buf([n, hq * hd]),
        dk = buf([n, hkv * hd]),
        dv = buf([n, hkv * hd]);
      const nseq = n / T;
      const cuSeqlens = d.fromArray(
        'i32',
        [nseq + 1],
        Int32Array.from({ length: nseq + 1 }, (_, i) => i * T),
      );
      owned.push(cuSeqlens);
      const common = { cuSeqlens, heads: hq, kvHeads: hkv };
      const fwdMs = bestMs(() => d.runSync([{ op: 'attention_forward', out, lse, q, k, v, ...common }]), reps, minMs);
      const bwdMs = bestMs(
        () => d.runSync([{ op: 'attention_backward', dq, dk, dv, dout, q, k, v, out, lse, ...common }]),
        reps,
        minMs,
      );
      for (const t of owned) t.free();
      const fwdFlops = 4 * n * (T / 2) * hq * hd,
        bwdFlops = 2.5 * fwdFlops;
      const gflops = (fwdFlops + bwdFlops) / (fwdMs + bwdMs) / 1e6;
      rows.push({
        seqLen: T,
        headDim: hd,
        fwdMs,
        bwdMs,
        fwdGflops: fwdFlops / fwdMs / 1e6,
        bwdGflops: bwdFlops / bwdMs / 1e6,
        gflops,
        ofSgemm: gflops / sgemm,
      });
    }
  return rows;
}

// ---------------------------------------------------------------------------------------------
// LAYER SPLIT: one LLaMA decoder layer (bench model sizes, M tokens as 4 packed sequences, LoRA
// rank 16 on q/k/v/o for 2 adapters of M/2 rows each), forward then backward, every op timed
// on its own and summed by kernel family. Runs only once every op it needs is in the addon.

const LAYER_OPS = [
  'copy',
  'linear_forward',
  'linear_backward',
  'rmsnorm_forward',
  'rmsnorm_backward',
  'rope_forward',
  'rope_backward',
  'attention_forward',
  'attention_backward',
  'swiglu_forward',
  'swiglu_backward',
  'lora_forward',
  'lora_backward',
] as const;

/** linear, attention, …; a linear op with LoRA segments (the fused projection) is linear+lora. */
function family(op: Op): string {
  const fused = (op.op === 'linear_forward' || op.op === 'linear_backward') && op.segments?.length;
  return op.op.replace(/_(forward|backward)$/, '') + (fused ? '+lora' : '');
}

/** A linear op followed by the LoRA op of the same projection becomes one op with `segments`,
 *  as lib/model/layer.ts issues them (the CPU fuses LoRA's expand into the base GEMM). */
function fuseProjections(program: Op[]): Op[] {
  const out: Op[] = [];
  for (let i = 0; i < program.length; i++) {
    const a = program[i]!,
      b = program[i + 1];
    if (a.op === 'linear_forward' && b?.op === 'lora_forward' && b.y === a.y && b.x === a.x) {
      out.push({ ...a, segments: b.segments });
      i++;
    } else if (a.op === 'linear_backward' && b?.op === 'lora_backward' && b.dx === a.dx && b.dy === a.dy) {
      out.push({ ...a, x: b.x, segments: b.segments });
      i++;
    } else out.push(a);
  }
  return out;
}

/** Which projections get LoRA in layerProgram, for how many adapters (equal row shares). */
export interface LayerLora {
  modules: ReadonlyArray<'q' | 'k' | 'v' | 'o' | 'gate' | 'up' | 'down'>;
  adapters: number;
  rank: number;
}

/** The split's default: rank 16 on q/k/v/o for 2 adapters. */
const SPLIT_LORA: LayerLora = { modules: ['q', 'k', 'v', 'o'], adapters: 2, rank: 16 };

/** The ops of one layer forward+backward over freshly allocated tensors (all listed in `owned`). */
export function layerProgram(
  d: Device,
  rng: Rng,
  owned: Tensor[],
  lora: LayerLora = SPLIT_LORA,
): { program: Op[]; description: string } {
  const { hidden: H, intermediate: I, tokens: T, heads, kvHeads, headDim: hd } = BENCH_MODEL;
  const nseq = 4;
  const { rank, adapters } = lora;
  const maxPos = T / nseq;
  const f32 = (shape: number[], std = 1) => {
    const t = randomTensor(d, rng, 'f32', shape, std);
    owned.push(t);
    return t;
  };
  const buf = (shape: number[]) => {
    const t = d.alloc('f32', shape);
    owned.push(t);
    return t;
  };
  const i32 = (shape: number[], data: Int32Array) => {
    const t = d.fromArray('i32', shape, data);
    owned.push(t);
    return t;
  };
  const x = f32([T, H]);
  const wNorm1 = f32([H], 0.1);
  const wNorm2 = f32([H], 0.1);
  const Wq = f32([heads * hd, H], 0.05),
    Wk = f32([kvHeads * hd, H], 0.05),
    Wv = f32([kvHeads * hd, H], 0.05);
  const Wo = f32([H, heads * hd], 0.05);
  const Wg = f32([I, H], 0.05),
    Wu = f32([I, H], 0.05),
    Wd = f32([H, I], 0.05);
  const pos = i32(
    [T],
    Int32Array.from({ length: T }, (_, i) => i % maxPos),
  );
  const cu = i32(
    [nseq + 1],
    Int32Array.from({ length: nseq + 1 }, (_, i) => i * maxPos),
  );
  const cosT = buf([maxPos, hd / 2]);
  const sinT = buf([maxPos, hd / 2]);
  {
    const c = new Float32Array(maxPos * (hd / 2));
    const s = new Float32Array(maxPos * (hd / 2));
    for (let p = 0; p < maxPos; p++)
      for (let i = 0; i < hd / 2; i++) {
        const ang = p / 10000 ** ((2 * i) / hd);
        c[p * (hd / 2) + i] = Math.cos(ang);
        s[p * (hd / 2) + i] = Math.sin(ang);
      }
    cosT.write(c);
    sinT.write(s);
  }
  // LoRA segments for one projection [in → out]: `adapters` adapters, equal shares of the rows.
  const segments = (inF: number, outF: number) =>
    Array.from({ length: adapters }, (_, s) => ({
      rowStart: Math.floor((s * T) / adapters),
      rowEnd: Math.floor(((s + 1) * T) / adapters),
      a: f32([rank, inF], 0.05),
      b: f32([outF, rank], 0.05),
      scale: 2,
      xa: buf([Math.floor(((s + 1) * T) / adapters) - Math.floor((s * T) / adapters), rank]),
      da: buf([rank, inF]),
      db: buf([outF, rank]),
    }));
  type Module = LayerLora['modules'][number];
  const seg = (m: Module, inF: number, outF: number) => (lora.modules.includes(m) ? segments(inF, outF) : []);
  const segQ = seg('q', H, heads * hd),
    segK = seg('k', H, kvHeads * hd),
    segV = seg('v', H, kvHeads * hd);
  const segO = seg('o', heads * hd, H),
    segG = seg('gate', H, I),
    segU = seg('up', H, I),
    segD = seg('down', I, H);
  // The LoRA op of a projection, or nothing where it has no adapter.
  const fwd = (y: Tensor, xx: Tensor, segs: typeof segQ): Op[] =>
    segs.length ? [{ op: 'lora_forward', y, x: xx, segments: segs }] : [];
  const bwd = (dxx: Tensor, dy: Tensor, xx: Tensor, segs: typeof segQ): Op[] =>
    segs.length ? [{ op: 'lora_backward', dx: dxx, dy, x: xx, segments: segs }] : [];

  const rstd1 = buf([T]),
    rstd2 = buf([T]);
  const h1 = buf([T, H]),
    q = buf([T, heads * hd]),
    k = buf([T, kvHeads * hd]),
    v = buf([T, kvHeads * hd]);
  const qr = buf([T, heads * hd]),
    kr = buf([T, kvHeads * hd]);
  const att = buf([T, heads * hd]),
    lse = buf([heads, T]);
  const x1 = buf([T, H]),
    h2 = buf([T, H]),
    gate = buf([T, I]),
    up = buf([T, I]),
    hm = buf([T, I]),
    x2 = buf([T, H]);
  const dx2 = f32([T, H]);
  const dx1 = buf([T, H]),
    dhm = buf([T, I]),
    dgate = buf([T, I]),
    dup = buf([T, I]),
    dh2 = buf([T, H]);
  const datt = buf([T, heads * hd]),
    dqr = buf([T, heads * hd]),
    dkr = buf([T, kvHeads * hd]),
    dv = buf([T, kvHeads * hd]);
  const dq = buf([T, heads * hd]),
    dk = buf([T, kvHeads * hd]),
    dh1 = buf([T, H]),
    dx0 = buf([T, H]);
  const dwNorm1 = buf([H]),
    dwNorm2 = buf([H]);

  const program: Op[] = [
    // forward
    { op: 'rmsnorm_forward', y: h1, rstd: rstd1, x, w: wNorm1, eps: 1e-5 },
    { op: 'linear_forward', y: q, x: h1, w: Wq },
    ...fwd(q, h1, segQ),
    { op: 'linear_forward', y: k, x: h1, w: Wk },
    ...fwd(k, h1, segK),
    { op: 'linear_forward', y: v, x: h1, w: Wv },
    ...fwd(v, h1, segV),
    { op: 'rope_forward', y: qr, x: q, pos, cos: cosT, sin: sinT, heads },
    { op: 'rope_forward', y: kr, x: k, pos, cos: cosT, sin: sinT, heads: kvHeads },
    { op: 'attention_forward', out: att, lse, q: qr, k: kr, v, cuSeqlens: cu, heads, kvHeads },
    { op: 'copy', y: x1, x },
    { op: 'linear_forward', y: x1, x: att, w: Wo, accumulate: true },
    ...fwd(x1, att, segO),
    { op: 'rmsnorm_forward', y: h2, rstd: rstd2, x: x1, w: wNorm2, eps: 1e-5 },
    { op: 'linear_forward', y: gate, x: h2, w: Wg },
    ...fwd(gate, h2, segG),
    { op: 'linear_forward', y: up, x: h2, w: Wu },
    ...fwd(up, h2, segU),
    { op: 'swiglu_forward', h: hm, gate, up },
    { op: 'copy', y: x2, x: x1 },
    { op: 'linear_forward', y: x2, x: hm, w: Wd, accumulate: true },
    ...fwd(x2, hm, segD),
    // backward (dx2 given)
    { op: 'copy', y: dx1, x: dx2 },
    { op: 'linear_backward', dx: dhm, dy: dx2, w: Wd },
    ...bwd(dhm, dx2, hm, segD),
    { op: 'swiglu_backward', dgate, dup, dh: dhm, gate, up },
    { op: 'linear_backward', dx: dh2, dy: dgate, w: Wg },
    ...bwd(dh2, dgate, h2, segG),
    { op: 'linear_backward', dx: dh2, dy: dup, w: Wu, accumulate: true },
    ...bwd(dh2, dup, h2, segU),
    { op: 'rmsnorm_backward', dx: dx1, dy: dh2, x: x1, w: wNorm2, rstd: rstd2, dw: dwNorm2, accumulate: true },
    { op: 'linear_backward', dx: datt, dy: dx1, w: Wo },
    ...bwd(datt, dx1, att, segO),
    {
      op: 'attention_backward',
      dq: dqr,
      dk: dkr,
      dv,
      dout: datt,
      q: qr,
      k: kr,
      v,
      out: att,
      lse,
      cuSeqlens: cu,
      heads,
      kvHeads,
    },
    { op: 'rope_backward', dx: dq, dy: dqr, pos, cos: cosT, sin: sinT, heads },
    { op: 'rope_backward', dx: dk, dy: dkr, pos, cos: cosT, sin: sinT, heads: kvHeads },
    { op: 'linear_backward', dx: dh1, dy: dq, w: Wq },
    ...bwd(dh1, dq, h1, segQ),
    { op: 'linear_backward', dx: dh1, dy: dk, w: Wk, accumulate: true },
    ...bwd(dh1, dk, h1, segK),
    { op: 'linear_backward', dx: dh1, dy: dv, w: Wv, accumulate: true },
    ...bwd(dh1, dv, h1, segV),
    { op: 'copy', y: dx0, x: dx1 },
    { op: 'rmsnorm_backward', dx: dx0, dy: dh1, x, w: wNorm1, rstd: rstd1, dw: dwNorm1, accumulate: true },
  ];
  return {
    program: fuseProjections(program),
    description:
      `${T} tokens (${nseq} sequences of ${maxPos}), ` +
      (lora.modules.length
        ? `LoRA rank ${rank} on ${lora.modules.join('/')} for ${adapters} adapter${adapters > 1 ? 's' : ''}`
        : 'no LoRA'),
  };
}

/** One layer forward+backward with LoRA (rank 16, all 7 projections, 4 adapters) against the
 *  same layer without: the whole program timed as one run, best of alternating repetitions. */
function loraOverhead(d: Device, rng: Rng, opts: BenchOptions, log: (s: string) => void) {
  const variants: Array<[string, LayerLora]> = [
    ['no LoRA', { modules: [], adapters: 1, rank: 16 }],
    ['LoRA r16 ×4 adapters, 7 modules', { modules: ['q', 'k', 'v', 'o', 'gate', 'up', 'down'], adapters: 4, rank: 16 }],
  ];
  const owned: Tensor[] = [];
  try {
    const programs = variants.map(([, l]) => layerProgram(d, rng, owned, l).program);
    for (const p of programs) d.runSync(p);
    const best = programs.map(() => Infinity);
    for (let r = 0; r < (opts.quick ? 1 : 5); r++)
      programs.forEach((p, i) => {
        const t0 = performance.now();
        d.runSync(p);
        best[i] = Math.min(best[i]!, performance.now() - t0);
      });
    const ratio = best[1]! / best[0]!;
    log('');
    log('LoRA overhead of one layer forward+backward (bench model, 2048 tokens)');
    variants.forEach(([name], i) => log(`  ${name.padEnd(34)} ${best[i]!.toFixed(1).padStart(8)} ms`));
    log(`  ratio ${ratio.toFixed(3)}× (the LoRA expand runs inside the base GEMMs: linear ops take the segments)`);
    return { noLoraMs: best[0], loraMs: best[1], ratio };
  } catch (e) {
    log(`  (LoRA overhead failed: ${(e as Error).message})`);
    return { error: (e as Error).message };
  } finally {
    for (const t of owned) if (!t.freed) t.free();
  }
}

function layerSplit(d: Device, rng: Rng, opts: BenchOptions, log: (s: string) => void) {
  log('');
  log('time split of one layer forward+backward by kernel family');
  const have = native().info().ops;
  const missing = LAYER_OPS.filter((o) => !have.includes(o));
  if (missing.length) {
    log(`  (needs ops: ${missing.join(', ')})`);
    return { needsOps: missing };
  }
  const owned: Tensor[] = [];
  try {
    const { program, description } = layerProgram(d, rng, owned);
    d.runSync(program); // warm-up, and checks every op's arguments
    const reps = opts.quick ? 1 : 3;
    const best = new Array<number>(program.length).fill(Infinity);
    for (let r = 0; r < reps; r++)
      program.forEach((op, i) => {
        const t0 = performance.now();
        d.runSync([op]);
        best[i] = Math.min(best[i]!, performance.now() - t0);
      });
    const byFamily = new Map<string, number>();
    program.forEach((op, i) => byFamily.set(family(op), (byFamily.get(family(op)) ?? 0) + best[i]!));
    const total = best.reduce((a, b) => a + b, 0);
    const sorted = [...byFamily.entries()].sort((a, b) => b[1] - a[1]);
    log(`  ${description}; total ${total.toFixed(1)} ms`);
    for (const [fam, ms] of sorted)
      log(`  ${fam.padEnd(14)} ${ms.toFixed(2).padStart(9)} ms ${`${((100 * ms) / total).toFixed(1)}%`.padStart(7)}`);
    return { totalMs: total, families: Object.fromEntries(sorted) };
  } catch (e) {
    log(`  (layer split failed: ${(e as Error).message})`);
    return { error: (e as Error).message };
  } finally {
    for (const t of owned) if (!t.freed) t.free();
  }
}
