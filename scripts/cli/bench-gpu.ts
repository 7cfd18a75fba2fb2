// "gpu": training throughput on one GPU. For each model (the bench and 1b presets, bf16 base
// weights), one and two stage actors on the same device, K adapters (default 1, 4, 8) trained
// at once as the supervisor schedules them (trainInGroups: about 2 BatchLoRA messages per
// stage in flight, no flush). Reports tokens/s and model FLOP utilisation against the bf16
// GEMM ceiling measured in the same run through the same gemm op the base layers use (f32
// activations × bf16 weights, f32 accumulation), and, given the PEFT baseline
// (scripts/device/peft_baseline.py's JSON), the speed-up over transformers + PEFT training the
// same K adapters one after another. The targets (1b, K = 8: MFU ≥ 40%, ≥ 1.5× PEFT) are
// printed as met or missed, never asserted.
//
// On a CPU device (`--device cpu`) the same code runs at tiny sizes: that is the rehearsal of
// the GPU run (scripts/device-check.sh with MLORA_DEVICE_CHECK_REHEARSE=1).
import fs from 'node:fs';
import path from 'node:path';
import { openModelDir } from '../../lib/io/hf-model.js';
import { parameterCount } from '../../lib/io/hf-tensors.js';
import { PRESETS, type LlamaConfig, type PresetName } from '../../lib/model/config.js';
import { freshState } from '../../lib/lora/state.js';
import { native } from '../../lib/native.js';
import { openDevice, parseDeviceSpec } from '../../lib/tensor.js';
import { Rng } from '../../lib/rng.js';
import { ActorPipeline } from '../../actors/runtime.js';
import { utilisation } from '../../lib/schedule/grid.js';
import { balanceSplit } from '../../lib/schedule/split.js';
import type { SourceMicroBatch } from '../../actors/scheduler/job-types.js';
import { benchLoraSpec, cacheModels, syntheticMicroBatch, trainFlopsPerToken, trainInGroups } from './bench-common.js';
import { makeModel } from './make-model.js';

export interface GpuBenchOptions {
  /** cuda:N, or cpu:N for the rehearsal. */
  device: string;
  /** Model directories (bf16 weights expected), or presets made as bf16 in the cache. */
  models: string[];
  adapters: number[];
  stages: number[];
  rank: number;
  micro: number;
  seqLen: number;
  steps: number;
  /** Side of the square GEMM that measures the ceiling. */
  ceilingN: number;
  /** Byte budget per stage (default: 90% of the device's free memory shared by the stages; CPU 4 GiB). */
  budget?: number;
  /** PEFT baseline JSON (scripts/device/peft_baseline.py). */
  baseline?: string;
}

export interface GpuBenchRecord {
  model: string;
  params: number;
  adapters: number;
  stages: number;
  micro_batch: number;
  seq_len: number;
  tokens_per_s: number;
  mfu: number;
  step_ms: number;
  busy: number[];
  bubble: number;
  peft_tokens_per_s?: number;
  /** PEFT's MFU by the same FLOP count and ceiling. */
  peft_mfu?: number;
  vs_peft?: number;
}

export interface GpuBenchResult {
  scenario: 'gpu';
  device: string;
  gemm: string;
  bf16_gemm_ceiling_tflops: number;
  ceiling_n: number;
  torch_bf16_tflops?: number;
  records: GpuBenchRecord[];
  targets: Array<{ what: string; value: number | null; goal: number; met: boolean | null }>;
}

interface PeftBaseline {
  model?: string;
  torch_bf16_tflops?: number;
  records: Array<{ model: string; adapters: number; tokens_per_s: number }>;
}

/** bf16 GEMM ceiling of a device (TFLOP/s): n×n f32 activations × n×n bf16 weights, 8 products per run, the best run. */
export async function bf16GemmCeiling(spec: string, n: number): Promise<number> {
  const d = openDevice(spec, { threads: 1, budget: 6 * n * n * 4 + 2 ** 26 });
  const rng = new Rng(9);
  const a = d.fromArray('f32', [n, n], rng.fillNormal(new Float32Array(n * n)));
  const w = rng.fillNormal(new Float32Array(n * n));
  const bits = new Uint16Array(n * n);
  const u = new Uint32Array(w.buffer);
  for (let i = 0; i < bits.length; i++) bits[i] = (u[i]! + 0x7fff + ((u[i]! >>> 16) & 1)) >>> 16;
  const b = d.fromArray('bf16', [n, n], bits);
  const c = d.alloc('f32', [n, n]);
  const reps = 8;
  const ops = Array.from({ length: reps }, () => ({ op: 'gemm' as const, c, a, b, transB: true }));
  try {
    await d.run(ops); // warm-up: cuBLAS handle, operand scratch, clocks
    // best of at least 5 runs and 300 ms: on a loaded CPU most runs are preempted
    let best = Infinity;
    const t0 = performance.now();
    for (let i = 0; i < 50 && (i < 5 || performance.now() - t0 < 300); i++) {
      const t = performance.now();
      await d.run(ops);
      best = Math.min(best, performance.now() - t);
    }
    return (reps * 2 * n ** 3) / (best / 1000) / 1e12;
  } finally {
    for (const x of [a, b, c]) x.free();
    d.trimCache(); // the stage actors get this memory back
  }
}

/** A model directory: the path given, or a preset made once as bf16 in the cache. */
async function modelDirOf(m: string, log: (s: string) => void): Promise<string> {
  if (!(m in PRESETS)) {
    if (!fs.existsSync(path.join(m, 'config.json')))
      throw new Error(
        `--models: ${m} is neither a preset (${Object.keys(PRESETS).join(', ')}) nor a model directory (no config.json)`,
      );
    return m;
  }
  const dir = path.join(cacheModels(), `${m}-bf16-seed0`);
  if (fs.existsSync(path.join(dir, 'config.json'))) return dir;
  log(`making the ${m} model (bf16, seed 0) in ${dir} (once)`);
  const tmp = `${dir}.tmp-${process.pid}`;
  await makeModel(tmp, m as PresetName, 0, 'bf16');
  fs.rmSync(dir, { recursive: true, force: true });
  fs.renameSync(tmp, dir);
  return dir;
}

function readBaseline(file: string): PeftBaseline {
  let j: PeftBaseline;
  try {
    j = JSON.parse(fs.readFileSync(file, 'utf8')) as PeftBaseline;
  } catch (e) {
    throw new Error(`--baseline ${file}: ${(e as Error).message}`);
  }
  if (!Array.isArray(j.records))
    throw new Error(`--baseline ${file}: field 'records' must be a list, got ${typeof j.records}`);
  return j;
}

/** The model's short name in tables: the preset whose shape it has, else the folder name. */
function modelName(c: LlamaConfig, dir: string): string {
  for (const [name, p] of Object.entries(PRESETS))
    if (
      p.hiddenSize === c.hiddenSize &&
      p.numLayers === c.numLayers &&
      p.vocabSize === c.vocabSize &&
      p.intermediateSize === c.intermediateSize
    )
      return name;
  return path.basename(dir);
}

export async function gpuScenario(o: GpuBenchOptions, log: (s: string) => void): Promise<GpuBenchResult> {
  const dev = parseDeviceSpec(o.device);
  const info = native().info();
  if (dev.kind === 'cuda' && dev.index >= info.cuda.devices)
    throw new Error(`--device ${o.device}: not available (${info.cuda.devices} CUDA device(s): ${info.cuda.reason})`);
  const ceiling = await bf16GemmCeiling(o.device, o.ceilingN);
  log(
    `bf16 GEMM ceiling on ${o.device} (${o.ceilingN}³, f32 × bf16 through the gemm op): ${ceiling.toFixed(ceiling < 10 ? 3 : 1)} TFLOP/s`,
  );
  const baseline = o.baseline && fs.existsSync(o.baseline) ? readBaseline(o.baseline) : undefined;
  if (o.baseline && !baseline) log(`no PEFT baseline at ${o.baseline}: the vs-PEFT column stays empty`);
  const records: GpuBenchRecord[] = [];
  const spec = benchLoraSpec(o.rank);
  const maxK = Math.max(...o.adapters);
  for (const m of o.models) {
    const modelDir = await modelDirOf(m, log);
    const c = openModelDir(modelDir).config;
    const name = modelName(c, modelDir);
    const flops = trainFlopsPerToken(c, spec, o.seqLen);
    const rng = new Rng(2);
    const mbs = new Map<number, SourceMicroBatch>();
    for (let id = 1; id <= maxK; id++) mbs.set(id, syntheticMicroBatch(rng, c, o.micro, o.seqLen));
    for (const S of o.stages) {
      const plans = balanceSplit(c, new Array(S).fill(1)).plans;
      const budget = o.budget ?? (dev.kind === 'cuda' ? Math.floor((0.9 * freeBytes(o.device)) / S) : 4 * 2 ** 30);
      const t0 = performance.now();
      const p = await ActorPipeline.start({
        modelDir,
        config: c,
        plans,
        devices: new Array(S).fill(o.device),
        threads: new Array(S).fill(1),
        budgets: new Array(S).fill(budget),
        maxTokens: Math.ceil(maxK / Math.min(maxK, 2 * S)) * o.micro * o.seqLen,
        inflight: 2 * S,
      });
      log(
        `${name}: ${S} stage actor(s) on ${o.device} (layers ${plans.map((q) => `${q.lo}-${q.hi - 1}`).join(' | ')}), loaded in ${((performance.now() - t0) / 1000).toFixed(1)} s`,
      );
      try {
        for (let id = 1; id <= maxK; id++)
          await p.addAdapter(id, { ...spec, seed: id }, freshState(c, { ...spec, seed: id }));
        for (const K of o.adapters) {
          const ids = Array.from({ length: K }, (_, i) => i + 1);
          const groups: number[][] = Array.from({ length: Math.min(K, 2 * S) }, () => []);
          ids.forEach((id, i) => groups[i % groups.length]!.push(id));
          const versions = new Map<number, number>();
          await trainInGroups(p, groups, mbs, 1, versions); // warm-up: buffers, cuBLAS plans
          const from = p.schedule().at(-1)?.end ?? 0;
          const ms = await trainInGroups(p, groups, mbs, o.steps, versions);
          const u = utilisation(
            p.schedule().filter((r) => r.start >= from),
            S,
          );
          const tps = (K * o.micro * o.seqLen * o.steps) / (ms / 1000);
          const peft = baseline?.records.find((r) => r.model === name && r.adapters === K)?.tokens_per_s;
          const rec: GpuBenchRecord = {
            model: name,
            params: parameterCount(c),
            adapters: K,
            stages: S,
            micro_batch: o.micro,
            seq_len: o.seqLen,
            tokens_per_s: Math.round(tps),
            mfu: Math.round(((tps * flops) / (ceiling * 1e12)) * 1e4) / 1e4,
            step_ms: Math.round(ms / o.steps),
            busy: u.busy.map((b) => Math.round(b * 1000) / 1000),
            bubble: Math.round(u.bubble * 1000) / 1000,
            ...(peft
              ? {
                  peft_tokens_per_s: peft,
                  peft_mfu: Math.round(((peft * flops) / (ceiling * 1e12)) * 1e4) / 1e4,
                  vs_peft: Math.round((tps / peft) * 100) / 100,
                }
              : {}),
          };
          records.push(rec);
          log(
            `${name} S=${S} K=${K}: ${rec.tokens_per_s} tok/s, MFU ${(100 * rec.mfu).toFixed(1)}%, ${rec.step_ms} ms/step, busy ${rec.busy.map((b) => `${Math.round(100 * b)}%`).join('/')}`,
          );
        }
      } finally {
        await p.close();
      }
    }
  }
  const best = (model: string, K: number) =>
    records.filter((r) => r.model === model && r.adapters === K).sort((a, b) => b.tokens_per_s - a.tokens_per_s)[0];
  const b8 = best('1b', 8);
  const targets = [
    { what: '1b, K=8: MFU (best layout)', value: b8 ? b8.mfu : null, goal: 0.4 },
    { what: '1b, K=8: tokens/s over PEFT one after another', value: b8?.vs_peft ?? null, goal: 1.5 },
  ].map((x) => ({ ...x, met: x.value === null ? null : x.value >= x.goal }));
  return {
    scenario: 'gpu',
    device: o.device,
    gemm: dev.kind === 'cuda' ? info.cuda.gemm : `cpu (${info.cpu.gemmKernel})`,
    bf16_gemm_ceiling_tflops: Math.round(ceiling * 1000) / 1000,
    ceiling_n: o.ceilingN,
    ...(baseline?.torch_bf16_tflops ? { torch_bf16_tflops: baseline.torch_bf16_tflops } : {}),
    records,
    targets,
  };
}

/** A CUDA device's default byte budget (its free memory less a reserve, lib/tensor.ts). */
function freeBytes(spec: string): number {
  return openDevice(spec).memory().budget;
}

export function printGpuTable(r: GpuBenchResult, out: (s: string) => void): void {
  out(
    `\nmlora bench --scenario gpu on ${r.device} (gemm ${r.gemm}); bf16 GEMM ceiling ${r.bf16_gemm_ceiling_tflops} TFLOP/s (${r.ceiling_n}³, this run)` +
      (r.torch_bf16_tflops ? `; torch bf16 matmul ${r.torch_bf16_tflops} TFLOP/s` : ''),
  );
  out('model  params   S   K  micro×seq  tokens/s    MFU  ms/step  busy        PEFT tok/s  vs PEFT');
  for (const x of r.records) {
    out(
      `${x.model.padEnd(6)} ${`${(x.params / 1e6).toFixed(x.params < 1e7 ? 2 : 0)}M`.padStart(6)}  ${String(x.stages).padStart(2)}  ${String(x.adapters).padStart(2)}  ${`${x.micro_batch}×${x.seq_len}`.padStart(9)}  ${String(x.tokens_per_s).padStart(8)}  ${(100 * x.mfu).toFixed(1).padStart(5)}%  ${String(x.step_ms).padStart(7)}  ${x.busy
        .map((b) => `${Math.round(100 * b)}%`)
        .join('/')
        .padEnd(
          10,
        )}  ${String(x.peft_tokens_per_s ?? '-').padStart(10)}  ${x.vs_peft !== undefined ? `${x.vs_peft}×` : '-'}`,
    );
  }
  for (const t of r.targets)
    out(
      `target ${t.what}: ${t.value === null ? 'not measured' : t.value} (goal ≥ ${t.goal}) ${t.met === null ? '' : t.met ? 'MET' : 'MISSED'}`,
    );
  out(
    'MFU = model FLOPs (frozen-base forward + dX, LoRA forward + backward, attention, head) / the bf16 GEMM ceiling above; S = stage actors on the one device',
  );
}
