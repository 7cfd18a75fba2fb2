// Measured split costs: the units the split balances (a layer's attention half, its MLP half, the
// head on the targeted rows) timed on this machine, forward + backward over one micro-batch of
// the run's shape, each as a stage program of its own. FLOP counts miss what dominates a small
// model: on stories260K (hidden 64) per-op overheads and the attention kernel's own efficiency
// make a layer's attention ~40% of its time, not the ~55% of its FLOPs, and leave the stage
// with more attention halves idle part of the run. Timed by process CPU time (other processes'
// load counts little), the least of a few repetitions. Only what the split needs is timed: the
// plan stays a pure function of these costs (lib/schedule/split.ts balanceSplit).
import type { ModelDir } from '../io/hf-model.js';
import type { LoraSpec } from '../lora/spec.js';
import { loadStageWeights, type BaseFormat } from '../model/weights.js';
import { StageProgram, type MicroBatch, type StagePlan } from '../model/stage.js';
import { openDevice, type Device, type Tensor } from '../tensor.js';
import { layerFlopsPerToken, type UnitCosts } from './split.js';

/** The micro-batch to time: what the run's messages look like. */
export interface CalibrationShape {
  /** Sequences per micro-batch message. */
  sequences: number;
  /** Tokens per sequence. */
  seqLen: number;
  /** Fraction of the rows with a target (the head runs on those only). Default 1. */
  targetFraction?: number;
  /** The LoRA adapters of one message, its rows split evenly between them. */
  adapters: LoraSpec[];
  /** CPU threads of the timing device (the stages' own). Default 1. */
  threads?: number;
  base?: BaseFormat;
  recompute?: boolean;
  /** Timed repetitions per unit after one warm-up; the least counts. Default 8. */
  reps?: number;
}

/**
 * FLOPs of one layer (forward + backward) that a unit's timing may cost at most: a micro-batch
 * larger than this is timed on fewer of its sequences and scaled up (its cost is linear in them).
 */
export const CALIBRATION_FLOPS = 4e9;

/**
 * ms of CPU per micro-batch of `shape` for each unit, or undefined when even one sequence of one
 * layer costs more than CALIBRATION_FLOPS to time: a model that large is bound by its GEMMs, which
 * the FLOP counts describe well.
 */
export async function measureUnitCosts(dir: ModelDir, shape: CalibrationShape): Promise<UnitCosts | undefined> {
  const c = dir.config;
  const T = Math.max(2, Math.round(shape.seqLen));
  const fit = Math.floor(CALIBRATION_FLOPS / (T * layerFlopsPerToken(c, T)));
  if (fit < 1) return undefined;
  const B = Math.max(1, Math.min(Math.round(shape.sequences), fit));
  const scale = shape.sequences / B;
  const reps = shape.reps ?? 8;
  const dev = openDevice('cpu:0', { threads: shape.threads ?? 1 });
  const owned: Tensor[] = [];
  const programs: StageProgram[] = [];
  try {
    const N = B * T;
    const H = c.hiddenSize;
    const own = <X extends Tensor>(x: X) => (owned.push(x), x);
    const program = async (plan: StagePlan) => {
      const p = new StageProgram(dev, c, plan, await loadStageWeights(dev, dir, plan, shape.base ?? {}), {
        recompute: !!shape.recompute,
        ...(shape.base?.computeDtype ? { computeDtype: shape.base.computeDtype } : {}),
      });
      programs.push(p);
      shape.adapters.forEach((spec, i) => p.addAdapter(i + 1, { ...spec, dropout: 0 }));
      return p;
    };
    const mb = timingBatch(dev, c.vocabSize, B, T, shape.targetFraction ?? 1, shape.adapters.length, own);
    const x = own(
      dev.fromArray(
        'f32',
        [N, H],
        Float32Array.from({ length: N * H }, (_, i) => Math.sin(i) * 0.5),
      ),
    );
    const y = own(dev.alloc('f32', [N, H]));
    const g = own(dev.alloc('f32', [N, H]));
    const cpuMs = () => {
      const u = process.cpuUsage();
      return (u.user + u.system) / 1000;
    };
    const half = async (plan: StagePlan) => {
      const p = await program(plan);
      return async () => {
        await p.forward(mb, x, y);
        await p.backward(mb, g);
      };
    };
    const L = c.numLayers;
    const last = await program({ lo: L - 1, hi: L, first: false, last: true, firstMlpOnly: true });
    const units = [
      await half({ lo: 0, hi: 1, first: false, last: false, lastAttnOnly: true }),
      await half({ lo: 0, hi: 1, first: false, last: false, firstMlpOnly: true }),
      () => last.runHead({ ...mb, segments: [] }, x, g),
    ];
    // the units take turns, so a burst of other work on the machine slows one round of them all
    // rather than one unit's every repetition
    const best = units.map(() => Infinity);
    for (let i = 0; i <= reps; i++)
      for (const [u, run] of units.entries()) {
        const t = cpuMs();
        await run();
        if (i > 0) best[u] = Math.min(best[u]!, cpuMs() - t);
      }
    const [attention, mlp, head] = best.map((ms) => ms * scale) as [number, number, number];
    return { attention, mlp, head };
  } finally {
    for (const p of programs) p.free();
    for (const t of owned) t.free();
  }
}

/**
 * A training micro-batch of B sequences of T tokens (the same made-up tokens every time): the
 * first `targetFraction` of each sequence's rows have a target, and the rows are split evenly
 * between adapters 1..A.
 */
export function timingBatch(
  dev: Device,
  vocab: number,
  B: number,
  T: number,
  targetFraction: number,
  A: number,
  own: <X extends Tensor>(x: X) => X,
): MicroBatch & { tokens: Tensor } {
  const N = B * T;
  const targeted = Math.max(1, Math.min(T - 1, Math.round(targetFraction * T)));
  const targets = Int32Array.from({ length: N }, (_, i) => (i % T < targeted ? (i * 31) % vocab : -100));
  const per = Math.ceil(N / Math.max(1, A));
  return {
    id: 1,
    numTokens: N,
    segments: Array.from({ length: A }, (_, a) => ({
      adapter: a + 1,
      rowStart: Math.min(N, a * per),
      rowEnd: Math.min(N, (a + 1) * per),
      serial: 0,
    })).filter((s) => s.rowEnd > s.rowStart),
    tokens: own(
      dev.fromArray(
        'i32',
        [N],
        Int32Array.from({ length: N }, (_, i) => (i * 7919) % vocab),
      ),
    ),
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
