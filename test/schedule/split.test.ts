// Stage balance: balanceSplit minimises the slowest stage (checked against brute force over
// every contiguous split), honours device speeds, rejects impossible requests; explicitSplit
// validates user splits.
import t from 'tap';
import { PRESETS, type LlamaConfig } from '../../lib/model/config.js';
import { balanceSplit, describeSplit, explicitSplit, headFlopsPerToken, layerFlopsPerToken } from '../../lib/schedule/split.js';
import { resolveLayout } from '../../actors/supervisor.js';

/** Every way to cut L layers into S non-empty contiguous stages (layer counts). */
function compositions(L: number, S: number): number[][] {
  if (S === 1) return [[L]];
  const out: number[][] = [];
  for (let n = 1; n <= L - (S - 1); n++) for (const rest of compositions(L - n, S - 1)) out.push([n, ...rest]);
  return out;
}

function bruteForce(c: LlamaConfig, speeds: number[], T = 512): number {
  const lf = layerFlopsPerToken(c, T), hf = headFlopsPerToken(c);
  const S = speeds.length;
  let best = Infinity;
  for (const comp of compositions(c.numLayers, S)) {
    const worst = Math.max(...comp.map((n, s) => (n * lf + (s === S - 1 ? hf : 0)) / speeds[s]!));
    best = Math.min(best, worst);
  }
  return best;
}

const madeUp: LlamaConfig = { ...PRESETS.bench, numLayers: 12, hiddenSize: 256, intermediateSize: 688, numHeads: 4, numKvHeads: 2, headDim: 64, vocabSize: 32000 };
const cases: Array<[string, LlamaConfig, number[]]> = [
  ['tiny', PRESETS.tiny, [1]],
  ['tiny', PRESETS.tiny, [1, 1]],
  ['tiny', PRESETS.tiny, [1, 3]],
  ['bench', PRESETS.bench, [1, 1]],
  ['bench', PRESETS.bench, [1, 1, 1]],
  ['bench', PRESETS.bench, [1, 1, 1, 1]],
  ['bench', PRESETS.bench, [2, 1]],
  ['bench', PRESETS.bench, [1, 4, 2]],
  ['made-up 12 layers', madeUp, [1, 1, 1]],
  ['made-up 12 layers', madeUp, [1, 2, 1, 3]],
  ['made-up 12 layers', madeUp, [3, 1, 1, 1, 1]],
];

t.test('the split minimises the slowest stage (brute force over all contiguous splits)', async (t) => {
  for (const [name, c, speeds] of cases) {
    const r = balanceSplit(c, speeds);
    const S = speeds.length;
    // contiguous, covering, non-empty, first/last flags
    t.equal(r.plans.length, S);
    t.equal(r.plans[0]!.lo, 0);
    t.equal(r.plans[S - 1]!.hi, c.numLayers);
    for (let s = 0; s < S; s++) {
      const p = r.plans[s]!;
      t.ok(p.hi > p.lo, `${name} ${speeds}: stage ${s} has a layer`);
      if (s > 0) t.equal(p.lo, r.plans[s - 1]!.hi);
      t.equal(p.first, s === 0);
      t.equal(p.last, s === S - 1);
    }
    const want = bruteForce(c, speeds);
    const got = Math.max(...r.cost);
    t.ok(Math.abs(got - want) <= 1e-9 * want, `${name} speeds ${speeds}: slowest stage ${got} = brute-force optimum ${want} (split ${r.plans.map((p) => p.hi - p.lo)})`);
  }
});

t.test('a faster device gets more layers', async (t) => {
  const flat = { ...madeUp, vocabSize: 16 }; // a negligible head: only the layers count
  const n = (speeds: number[]) => balanceSplit(flat, speeds).plans.map((p) => p.hi - p.lo);
  t.same(n([1, 1]), [6, 6]);
  t.same(n([2, 1]), [8, 4], '2× faster first device');
  t.same(n([1, 2]), [4, 8], '2× faster second device');
  t.same(n([1, 1, 1]), [4, 4, 4]);
  // with a real head, the last stage gives up layers for it
  const withHead = balanceSplit(madeUp, [1, 1]).plans.map((p) => p.hi - p.lo);
  t.ok(withHead[1]! < withHead[0]!, `the head stage holds fewer layers: ${withHead}`);
});

t.test('errors', async (t) => {
  t.throws(() => balanceSplit(PRESETS.tiny, [1, 1, 1]), /3 stages for a model of 2 layers: use at most 2 devices/);
  t.throws(() => balanceSplit(PRESETS.tiny, []), /at least one device/);
  t.throws(() => explicitSplit(PRESETS.bench, [1, 2]), /covers 3 layers, the model has 4/);
  t.throws(() => explicitSplit(PRESETS.bench, [4, 0]), /every stage needs at least one layer/);
  t.throws(() => explicitSplit(PRESETS.bench, [5, -1]), /every stage needs at least one layer/);
  t.throws(() => explicitSplit(PRESETS.bench, [1.5, 2.5]), /whole number/);
  t.same(explicitSplit(PRESETS.bench, [1, 3]), [{ lo: 0, hi: 1, first: true, last: false }, { lo: 1, hi: 4, first: false, last: true }]);
  t.equal(
    describeSplit(explicitSplit(PRESETS.bench, [1, 3]), ['cpu:0', 'cpu:1']),
    'stage 0 on cpu:0: layers 0-0 + embedding\nstage 1 on cpu:1: layers 1-3 + norm/head/loss',
  );
  t.throws(() => resolveLayout(PRESETS.bench, { devices: ['cpu:0', 'cpu:1'], split: [1, 1, 2], threads: 1 }), /3 stages for 2 devices/);
  t.throws(() => resolveLayout(PRESETS.tiny, { devices: ['cpu:0', 'cpu:1', 'cpu:2'], threads: 1 }), /use at most 2 devices/);
});
