// CPU time per micro-batch of each pipeline stage for candidate splits of a model: the stage
// programs of a split run one training micro-batch in turn, as the pipeline runs them (forward
// down the stages, the head share on the stage before the last, the last stage's loss and
// backward, backward up), timed by process CPU time (so other processes' load does not count),
// min over repetitions. It tells whether the cost model's split balances on this machine.
// Run: node dist/scripts/split-costs.js [MODEL_DIR] [SEQS×TOKENS] [REPS]
//   default: the demo model (data/models/stories260K), 8×192, 10; splits: 'auto' (balanceSplit
//   on FLOPs at the sequence length), 'measured' (balanceSplit on unit costs timed at this shape:
//   lib/schedule/calibrate.ts), and every whole-layer and half-layer 2-stage split.
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { openModelDir } from '../lib/io/hf-model.js';
import { loadStageWeights } from '../lib/model/weights.js';
import { StageProgram, type MicroBatch, type StagePlan } from '../lib/model/stage.js';
import { balanceSplit, describeSplit, explicitSplit } from '../lib/schedule/split.js';
import { measureUnitCosts, processCpuMs } from '../lib/schedule/calibrate.js';
import { openDevice, type Tensor } from '../lib/tensor.js';
import { LORA_TARGETS } from '../lib/model/config.js';
import type { LoraSpec } from '../lib/lora/adapter.js';

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');
const modelDir = process.argv[2] ?? path.join(root, 'data/models/stories260K');
const [B, T] = (process.argv[3] ?? '8x192').split(/[x×]/).map(Number) as [number, number];
const reps = Number(process.argv[4] ?? 10);
const dir = openModelDir(modelDir);
const c = dir.config;
const dev = openDevice('cpu:0', { threads: 1 });
const spec: LoraSpec = { r: 8, alpha: 16, dropout: 0, targets: [...LORA_TARGETS], useRslora: false, seed: 1 };
const N = B * T,
  H = c.hiddenSize;
const tokens = Int32Array.from({ length: N }, (_, i) => (i * 7919) % c.vocabSize);
const targets = Int32Array.from({ length: N }, (_, i) => (i % T === T - 1 ? -100 : (i * 31) % c.vocabSize));
const weights = Float32Array.from(targets, (x) => (x < 0 ? 0 : 1 / N));
const positions = Int32Array.from({ length: N }, (_, i) => i % T);
const cuSeqlens = Int32Array.from({ length: B + 1 }, (_, b) => b * T);
const rowsOf = (id: number, lo: number, hi: number, segments = true): MicroBatch => ({
  id,
  numTokens: hi - lo,
  segments: segments ? [{ adapter: 1, rowStart: 0, rowEnd: hi - lo, serial: 0 }] : [],
  tensors: {
    positions: dev.fromArray('i32', [N], positions),
    cuSeqlens: dev.fromArray('i32', [B + 1], cuSeqlens),
    targets: dev.fromArray('i32', [hi - lo], targets.subarray(lo, hi)),
    weights: dev.fromArray('f32', [hi - lo], weights.subarray(lo, hi)),
  },
});

/** [stage 0 ms, stage 1 ms] of a 2-stage split (min over reps after 2 warm-ups). */
async function cost(plans: StagePlan[]): Promise<number[]> {
  const P: StageProgram[] = [];
  for (const p of plans) {
    const s = new StageProgram(dev, c, p, await loadStageWeights(dev, dir, p));
    s.addAdapter(1, spec);
    P.push(s);
  }
  const [s0, s1] = P as [StageProgram, StageProgram];
  const ids = dev.fromArray('i32', [N], tokens);
  const act = dev.alloc('f32', [N, H]),
    grad = dev.alloc('f32', [N, H]),
    xf = dev.alloc('f32', [N, H]);
  const share = plans[0]!.headShare ?? 0;
  const best = [Infinity, Infinity];
  const views: Tensor[] = [];
  for (let rep = 0; rep < reps + 2; rep++) {
    const mb = rowsOf(rep, 0, N);
    let t = processCpuMs();
    await s0.forward(mb, ids, act);
    let c0 = processCpuMs() - t;
    let c1: number;
    t = processCpuMs();
    if (share > 0) {
      // the last stage's rows [0, r) of the head, the stage before's [r, N): as the runtime splits them
      const r = Math.round(N * (1 - share));
      await s1.forward(mb, act, xf);
      const mine = [xf.rows(0, r), grad.rows(0, r)] as const;
      await s1.runHead(rowsOf(-1, 0, r, false), mine[0], mine[1]);
      await s1.backward(mb, grad);
      c1 = processCpuMs() - t;
      t = processCpuMs();
      const theirs = [xf.rows(r, N), grad.rows(r, N)] as const;
      await s0.runHead(rowsOf(-2, r, N, false), theirs[0], theirs[1]);
      c0 += processCpuMs() - t;
      views.push(...mine, ...theirs);
    } else {
      await s1.trainLast(mb, act, grad);
      c1 = processCpuMs() - t;
    }
    t = processCpuMs();
    await s0.backward(mb, grad);
    c0 += processCpuMs() - t;
    if (rep >= 2) [best[0], best[1]] = [Math.min(best[0]!, c0), Math.min(best[1]!, c1)];
  }
  for (const v of views) v.free();
  for (const x of [ids, act, grad, xf]) x.free();
  for (const s of P) s.free();
  return best;
}

const measured = await measureUnitCosts(dir, [{ sequences: B, seqLen: T, adapter: spec }]);
const candidates: Array<[string, StagePlan[]]> = [
  ['auto', balanceSplit(c, [1, 1], { seqLen: T }).plans],
  ['measured', balanceSplit(c, [1, 1], { seqLen: T, ...(measured ? { costs: measured } : {}) }).plans],
];
for (let u = 1; u < 2 * c.numLayers; u++) {
  const layers = [u / 2, c.numLayers - u / 2];
  candidates.push([`[${layers.join(', ')}]`, explicitSplit(c, layers)]);
}
console.log(
  `${modelDir}: ${c.numLayers} layers, hidden ${H}, vocab ${c.vocabSize}; micro-batch ${B} × ${T} tokens, r 8 on all modules, 1 thread, min of ${reps}`,
);
for (const [name, plans] of candidates.slice(0, 2))
  console.log(`${name}: ${describeSplit(plans, ['cpu:0', 'cpu:1']).replace(/\n/g, ' | ')}`);
if (measured)
  console.log(
    `measured unit costs (ms): attention ${measured.attention.toFixed(2)}, MLP ${measured.mlp.toFixed(2)}, head ${measured.head.toFixed(2)}`,
  );
console.log('split        stage 0 ms  stage 1 ms  slower');
for (const [name, plans] of candidates) {
  const [a, b] = await cost(plans);
  console.log(
    `${name.padEnd(12)} ${a!.toFixed(1).padStart(10)}  ${b!.toFixed(1).padStart(10)}  ${Math.max(a!, b!).toFixed(1).padStart(6)}`,
  );
}
