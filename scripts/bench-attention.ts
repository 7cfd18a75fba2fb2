// Times attention_forward / attention_backward on the representative case of a hidden-512
// LLaMA layer (8 query heads × 64, 4 kv heads, 8 packed sequences × 256 tokens) and a GEMM of
// the same FLOPs for comparison. Run: node dist/scripts/bench-attention.js [threads]
import { openDevice } from '../lib/tensor.js';
import { Rng } from '../lib/rng.js';

const threads = Number(process.argv[2] ?? 1);
const dev = openDevice('cpu:0', { threads, budget: 2 ** 30 });
const rng = new Rng(1, 'bench-attention');
const nseq = 8,
  T = 256,
  hq = 8,
  hkv = 4,
  d = 64,
  n = nseq * T;
const rnd = (len: number) => rng.fillNormal(new Float32Array(len), 1);
const q = dev.fromArray('f32', [n, hq * d], rnd(n * hq * d));
const k = dev.fromArray('f32', [n, hkv * d], rnd(n * hkv * d));
const v = dev.fromArray('f32', [n, hkv * d], rnd(n * hkv * d));
const dout = dev.fromArray('f32', [n, hq * d], rnd(n * hq * d));
const out = dev.alloc('f32', [n, hq * d]),
  lse = dev.alloc('f32', [hq, n]);
const dq = dev.alloc('f32', [n, hq * d]),
  dk = dev.alloc('f32', [n, hkv * d]),
  dv = dev.alloc('f32', [n, hkv * d]);
const cuSeqlens = dev.fromArray(
  'i32',
  [nseq + 1],
  Int32Array.from({ length: nseq + 1 }, (_, i) => i * T),
);
const common = { cuSeqlens, heads: hq, kvHeads: hkv };
const fwd = { op: 'attention_forward', out, lse, q, k, v, ...common } as const;
const bwd = { op: 'attention_backward', dq, dk, dv, dout, q, k, v, out, lse, ...common } as const;

// Causal: each row sees on average T/2 keys. Forward = 2 matmuls (QKᵀ, PV), backward = 5
// (QKᵀ and dO·Vᵀ recomputed, dV, dK, dQ), 2 FLOPs per multiply-add.
const fwdFlops = 2 * 2 * n * (T / 2) * hq * d;
const bwdFlops = 2.5 * fwdFlops;

// Best wall time of `reps` runs. On a shared machine, also the CPU time per run divided by the
// thread count (a better estimate of the unshared speed when other processes take cores).
const cpuMs: number[] = [];
function time(ops: object[], reps: number): number {
  dev.runSync(ops as never);
  let best = Infinity;
  const c0 = process.cpuUsage();
  for (let r = 0; r < reps; r++) {
    const t0 = process.hrtime.bigint();
    dev.runSync(ops as never);
    best = Math.min(best, Number(process.hrtime.bigint() - t0) / 1e6);
  }
  const c = process.cpuUsage(c0);
  cpuMs.push((c.user + c.system) / 1e3 / reps / threads);
  return best;
}

const tf = time([fwd], 10);
const tb = time([bwd], 10);
// A GEMM with the forward's FLOPs: [2048, 512] · [512, 256]
const a = dev.fromArray('f32', [n, 512], rnd(n * 512));
const b = dev.fromArray('f32', [256, 512], rnd(256 * 512));
const c = dev.alloc('f32', [n, 256]);
const tg = time([{ op: 'gemm', c, a, b, transB: true }], 5);
const gf = (flops: number, ms: number) => ((flops / ms) * 1e-6).toFixed(1);
console.log(`attention, n ${n} (${nseq}×${T}), ${hq} heads × ${d}, ${hkv} kv heads, ${threads} thread(s), best of 10:`);
const line = (name: string, flops: number, ms: number, cpu: number) =>
  console.log(
    `  ${name.padEnd(44)} ${ms.toFixed(2).padStart(8)} ms ${gf(flops, ms).padStart(6)} GFLOP/s   ` +
      `(CPU time/thread ${cpu.toFixed(2)} ms, ${gf(flops, cpu)} GFLOP/s)`,
  );
line(`forward (${(fwdFlops / 1e9).toFixed(3)} GFLOP)`, fwdFlops, tf, cpuMs[0]!);
line(`backward (${(bwdFlops / 1e9).toFixed(3)} GFLOP)`, bwdFlops, tb, cpuMs[1]!);
line("gemm 2048×256×512 (the forward's FLOPs)", 2 * n * 256 * 512, tg, cpuMs[2]!);
