// Measured split costs: the units the split balances (a layer's attention half, its MLP half, the
// head on the targeted rows) timed on this machine, forward + backward over the run's kinds of
// micro-batch, each unit as a stage program of its own. FLOP counts miss what dominates a small
// model: on stories260K (hidden 64) per-op overheads and the attention kernel's own efficiency
// make a layer's attention ~40% of its time, not the ~55% of its FLOPs, and the adapters' LoRA
// moves it further (an adapter without gate_proj has the cheaper MLP), so the FLOP split left the
// stage with more attention halves idle part of the run. Timed by process CPU time (other
// processes' load counts little), the least of a few rounds in which every unit of every
// micro-batch takes its turn. Only what the split needs is timed: the plan stays a pure
// function of these costs (lib/schedule/split.ts balanceSplit).
import type { ModelDir } from '../io/hf-model.js';
import type { LoraSpec } from '../lora/spec.js';
import { loadStageWeights, type BaseFormat } from '../model/weights.js';
import { StageProgram, type MicroBatch, type StagePlan } from '../model/stage.js';
import { openDevice, type Device, type Tensor } from '../tensor.js';
import { layerFlopsPerToken, type UnitCosts } from './split.js';

/** One kind of micro-batch the run trains on (one adapter's), and how often it comes. */
export interface CalibrationBatch {
  /** Sequences per micro-batch. */
  sequences: number;
  /** Tokens per sequence. */
  seqLen: number;
  /** Fraction of the rows with a target (the head runs on those only). Default 1. */
  targetFraction?: number;
  adapter: LoraSpec;
  /** Micro-batches of this kind per round of the run (e.g. per step of every adapter). Default 1. */
  weight?: number;
}

export interface CalibrationOptions {
  /** CPU threads of the timing device (the stages' own). Default 1. */
  threads?: number;
  base?: BaseFormat;
  recompute?: boolean;
  /** Timed rounds after one warm-up; the least of each unit counts. Default 6. */
  reps?: number;
}

/**
 * FLOPs of one layer (forward + backward) that a unit's timing may cost at most: a micro-batch
 * larger than this is timed on fewer of its sequences and scaled up (its cost is linear in them).
 */
export const CALIBRATION_FLOPS = 4e9;

/**
 * ms of CPU per round of `batches` (each micro-batch's cost times its weight, summed) for each
 * unit, or undefined when even one sequence of one layer costs more than CALIBRATION_FLOPS to
 * time: a model that large is bound by its GEMMs, which the FLOP counts describe well.
 */
export async function measureUnitCosts(
  dir: ModelDir,
  batches: CalibrationBatch[],
  o: CalibrationOptions = {},
): Promise<UnitCosts | undefined> {
  const c = dir.config;
  const shapes = batches.map((b) => {
    const T = Math.max(2, Math.round(b.seqLen));
    const B = Math.min(
      Math.max(1, Math.round(b.sequences)),
      Math.floor(CALIBRATION_FLOPS / (T * layerFlopsPerToken(c, T))),
    );
    return { T, B, scale: ((b.weight ?? 1) * b.sequences) / B };
  });
  if (!batches.length || shapes.some((s) => s.B < 1)) return undefined;
  const reps = o.reps ?? 6;
  const dev = openDevice('cpu:0', { threads: o.threads ?? 1 });
  const owned: Tensor[] = [];
  const programs: StageProgram[] = [];
  const own = <X extends Tensor>(x: X) => (owned.push(x), x);
  try {
    const program = async (plan: StagePlan) => {
      const p = new StageProgram(dev, c, plan, await loadStageWeights(dev, dir, plan, o.base ?? {}), {
        recompute: !!o.recompute,
        ...(o.base?.computeDtype ? { computeDtype: o.base.computeDtype } : {}),
      });
      programs.push(p);
      batches.forEach((b, i) => p.addAdapter(i + 1, { ...b.adapter, dropout: 0 }));
      return p;
    };
    const L = c.numLayers;
    const attention = await program({ lo: 0, hi: 1, first: false, last: false, lastAttnOnly: true });
    const mlp = await program({ lo: 0, hi: 1, first: false, last: false, firstMlpOnly: true });
    const head = await program({ lo: L - 1, hi: L, first: false, last: true, firstMlpOnly: true });
    // per micro-batch: [attention, MLP, head], each a call that runs the unit forward and backward
    const units = shapes.map(({ B, T }, i) => {
      const mb = timingBatch(dev, c.vocabSize, B, T, batches[i]!.targetFraction ?? 1, i + 1, own);
      const H = c.hiddenSize;
      const x = own(
        dev.fromArray(
          'f32',
          [B * T, H],
          Float32Array.from({ length: B * T * H }, (_, k) => 0.5 * Math.sin(k)),
        ),
      );
      const y = own(dev.alloc('f32', [B * T, H]));
      const g = own(dev.alloc('f32', [B * T, H]));
      const half = (p: StageProgram) => async () => {
        await p.forward(mb, x, y);
        await p.backward(mb, g);
      };
      return [half(attention), half(mlp), () => head.runHead({ ...mb, segments: [] }, x, g)];
    });
    // every unit takes its turn each round, so a burst of other work on the machine slows one
    // round of them all rather than one unit's every repetition
    const best = units.map((u) => u.map(() => Infinity));
    for (let r = 0; r <= reps; r++)
      for (const [i, us] of units.entries())
        for (const [k, run] of us.entries()) {
          const t = processCpuMs();
          await run();
          if (r > 0) best[i]![k] = Math.min(best[i]![k]!, processCpuMs() - t);
        }
    const sum = (k: number) => best.reduce((a, b, i) => a + b[k]! * shapes[i]!.scale, 0);
    return { attention: sum(0), mlp: sum(1), head: sum(2) };
  } finally {
    for (const p of programs) p.free();
    for (const t of owned) t.free();
  }
}

/** This process's CPU time so far, in ms (user + system, every thread): what the unit timings count. */
export function processCpuMs(): number {
  const u = process.cpuUsage();
  return (u.user + u.system) / 1000;
}

/**
 * A training micro-batch of B sequences of T tokens of one adapter: the first `targetFraction`
 * of each sequence's rows have a target (made-up ones; the timing does not depend on them).
 */
export function timingBatch(
  dev: Device,
  vocab: number,
  B: number,
  T: number,
  targetFraction: number,
  adapter: number,
  own: <X extends Tensor>(x: X) => X,
): MicroBatch {
  const N = B * T;
  const targeted = Math.max(1, Math.min(T - 1, Math.round(targetFraction * T)));
  const targets = Int32Array.from({ length: N }, (_, i) => (i % T < targeted ? (i * 31) % vocab : -100));
  return {
    id: 1,
    numTokens: N,
    segments: [{ adapter, rowStart: 0, rowEnd: N, serial: 0 }],
    tensors: {
      positions: own(
        dev.fromArray(
          'i32',
          [N],
          Int32Array.from({ length: N }, (_, i) => i % T),
        ),
      ),
      cuSeqlens: own(
        dev.fromArray(
          'i32',
          [B + 1],
          Int32Array.from({ length: B + 1 }, (_, b) => b * T),
        ),
      ),
      targets: own(dev.fromArray('i32', [N], targets)),
      weights: own(
        dev.fromArray(
          'f32',
          [N],
          Float32Array.from(targets, (t) => (t < 0 ? 0 : 1 / N)),
        ),
      ),
    },
  };
}
