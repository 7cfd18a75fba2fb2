// `mlora bench --scenario kernels`: the bench model's GEMM shapes (f32 and bf16 weights, forward
// and backward) and attention, against this machine's FMA peak and a large sgemm measured in the
// same run; then one layer's time split by kernel family and its LoRA overhead (bench-layer.ts).
import os from 'node:os';
import { cpuModel } from '../../lib/machine.js';
import { native, type Op, type Tensor } from '../../lib/native.js';
import { openDevice, type Device } from '../../lib/tensor.js';
import { Rng } from '../../lib/rng.js';
import { BENCH_MODEL, bestMs, randomTensor, type BenchOptions } from './bench-common.js';
import { layerSplit, loraOverhead } from './bench-layer.js';

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

export async function benchKernels(opts: BenchOptions) {
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

  const panels = await panelRows(d, rng, opts, shapes.slice(0, 4), [256, M]);
  log('');
  log(
    'frozen weights packed once (pack_weights) vs packed per call: the four projections, forward + dX, f32 ' +
      `(compute-thread CPU ms, best of ${opts.quick ? 1 : 7} alternated runs)`,
  );
  log(`${'M'.padStart(6)} ${'per call ms'.padStart(12)} ${'panels ms'.padStart(10)} ${'speed-up'.padStart(9)}`);
  for (const r of panels)
    log(
      `${String(r.m).padStart(6)} ${r.perCallMs.toFixed(2).padStart(12)} ${r.panelsMs.toFixed(2).padStart(10)} ${`${r.speedup.toFixed(3)}×`.padStart(9)}`,
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
    packedPanels: panels,
    attention,
    layerSplit: split,
    loraOverhead: loraCost,
  };
}

interface PanelRow {
  m: number;
  perCallMs: number;
  panelsMs: number;
  speedup: number;
}

/** The projections' forward and dX GEMMs at M rows with weights packed per call and packed once
 *  (Device.packWeights): two sets of the same weights, timed in alternation. */
async function panelRows(
  d: Device,
  rng: Rng,
  opts: BenchOptions,
  shapes: Array<[string, number, number]>,
  ms: number[],
): Promise<PanelRow[]> {
  const reps = opts.quick ? 1 : 7;
  const out: PanelRow[] = [];
  for (const m of ms) {
    const owned: Tensor[] = [];
    const own = (t: Tensor) => (owned.push(t), t);
    const set = () =>
      shapes.flatMap(([, n, k]): Op[] => {
        const w = own(randomTensor(d, rng, 'f32', [n, k], 0.05));
        const x = own(randomTensor(d, rng, 'f32', [m, k]));
        const y = own(d.alloc('f32', [m, n]));
        return [
          { op: 'linear_forward', y, x, w },
          { op: 'linear_backward', dx: x, dy: y, w },
        ];
      });
    const perCall = set(),
      packed = set();
    await d.packWeights(packed.filter((o) => o.op === 'linear_forward').map((o) => (o as { w: Tensor }).w));
    // CPU time of the compute thread (runStats): what the GEMMs cost, however busy the machine
    const cpuMs = async (ops: Op[]) => {
      d.runStats(true);
      await d.run(ops);
      return d.runStats(true).cpuMs;
    };
    await cpuMs(perCall);
    await cpuMs(packed);
    let a = Infinity,
      b = Infinity;
    for (let r = 0; r < reps; r++) {
      a = Math.min(a, await cpuMs(perCall));
      b = Math.min(b, await cpuMs(packed));
    }
    out.push({ m, perCallMs: a, panelsMs: b, speedup: a / b });
    for (const t of owned) t.free();
  }
  return out;
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
