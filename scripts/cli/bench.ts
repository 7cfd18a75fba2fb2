// mlora bench: benchmarks, one scenario per entry of `scenarios` below. Each scenario prints a
// human table (or one JSON document with --json) and measures its own ceilings in the same
// run, so a number is always read next to what this machine could do at that moment.
//
//   mlora bench --scenario kernels [--threads N] [--json] [--quick]
//   mlora bench --scenario gemm-dtypes [--threads N] [--json] [--quick]
//   mlora bench --scenario precision [--preset bench|1b] [--modes f32,bf16,int8,nf4,nf4+bf16] [--micro-batch M --seq-len T] [--steps N] [--threads N] [--json]
//   mlora bench --scenario batchlora [--adapters 1,2,4,8] [--rank 16] [--micro-batch M --seq-len T] [--steps N] [--threads N] [--pack-weights auto|true|false] [--json]
//   mlora bench --scenario head [--micro-batch M --seq-len T] [--steps N] [--threads N] [--json]
//   mlora bench --scenario recompute [--micro-batch M --seq-len T] [--steps N] [--threads N] [--json]
//   mlora bench --scenario pipeline [--adapters 1,2,4,8] [--rank 16] [--micro-batch M] [--seq-len T] [--steps N] [--rounds N] [--pack-weights auto|true|false] [--json]
//   mlora bench --scenario gpu [--device cuda:0] [--models bench,1b|DIR,...] [--adapters 1,4,8] [--stages 1,2] [--rank 16]
//               [--micro-batch M --seq-len T] [--steps N] [--ceiling-n N] [--baseline PEFT.json] [--json]
// --threads defaults to every core (os.availableParallelism()), as for `mlora train`.
//
// The scenarios live in files of their own, bench-<scenario>.ts (kernels with bench-layer.ts);
// bench-common.ts holds what they share. This file is the table of scenarios, the option
// parser and the usage.
import { availableParallelism } from 'node:os';
import { batchloraScenario } from './bench-batchlora.js';
import { headScenario } from './bench-head.js';
import { pipelineScenario } from './bench-pipeline.js';
import { PRECISION_MODES, precisionScenario } from './bench-precision.js';
import { recomputeScenario } from './bench-recompute.js';
import { gpuScenario, printGpuTable } from './bench-gpu.js';
import type { BenchOptions, TrainBenchRecord } from './bench-common.js';
import { benchGemmDtypes } from './bench-gemm-dtypes.js';
import { benchKernels } from './bench-kernels.js';

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
          ...(o.packWeights !== undefined ? { packWeights: o.packWeights } : {}),
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
          rounds: o.rounds ?? (o.quick ? 1 : 3),
          ...(o.packWeights !== undefined ? { packWeights: o.packWeights } : {}),
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
    'usage: mlora bench --scenario NAME [--threads N] [--json] [--quick] [--adapters 1,2,4,8] [--rank R] [--micro-batch M] [--seq-len T] [--steps N] [--rounds N] [--preset bench|1b] [--modes f32,bf16,int8,nf4,nf4+bf16] [--pack-weights auto|true|false]',
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
      } else if (a === '--pack-weights' || a.startsWith('--pack-weights=')) {
        const v = value();
        if (v !== 'auto' && v !== 'true' && v !== 'false')
          return { error: `--pack-weights must be auto, true or false, got '${v}'` };
        opts.packWeights = v === 'auto' ? v : v === 'true';
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
        ['--rank', '--micro-batch', '--seq-len', '--steps', '--rounds', '--ceiling-n'].some(
          (f) => a === f || a.startsWith(`${f}=`),
        )
      ) {
        const flag = a.split('=')[0]!;
        const v = value();
        const n = Number(v);
        if (!Number.isInteger(n) || n < 1) return { error: `${flag} must be a positive integer, got '${v}'` };
        if (flag === '--rank') opts.rank = n;
        else if (flag === '--micro-batch') opts.microBatch = n;
        else if (flag === '--seq-len') opts.seqLen = n;
        else if (flag === '--ceiling-n') opts.ceilingN = n;
        else if (flag === '--rounds') opts.rounds = n;
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
