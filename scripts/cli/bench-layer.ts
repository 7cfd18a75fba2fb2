// One LLaMA decoder layer of the bench model as a program of addon ops (layerProgram), for the
// kernels scenario: its time split by kernel family (layerSplit) and the cost of LoRA on all
// seven projections (loraOverhead). Its own file: the program spells out a whole layer forward
// and backward, op by op, which is most of the kernel benchmark's length.
import { native, type Op, type Tensor } from '../../lib/native.js';
import type { Device } from '../../lib/tensor.js';
import type { Rng } from '../../lib/rng.js';
import { BENCH_MODEL, randomTensor, type BenchOptions } from './bench-common.js';

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
export function loraOverhead(d: Device, rng: Rng, opts: BenchOptions, log: (s: string) => void) {
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
    log(
      `  ratio ${ratio.toFixed(3)}× (linear ops take the segments: LoRA's expand runs in the base GEMMs' tile epilogues; ` +
        'backward reads dy and x once per row group for dxa, dA and dB)',
    );
    return { noLoraMs: best[0], loraMs: best[1], ratio };
  } catch (e) {
    log(`  (LoRA overhead failed: ${(e as Error).message})`);
    return { error: (e as Error).message };
  } finally {
    for (const t of owned) if (!t.freed) t.free();
  }
}

export function layerSplit(d: Device, rng: Rng, opts: BenchOptions, log: (s: string) => void) {
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
