// Stage balance: balanceSplit minimises the slowest stage (checked against brute force over
// every contiguous split), honours device speeds, rejects impossible requests; explicitSplit
// validates user splits.
import t from 'tap';
import { PRESETS, type LlamaConfig } from '../../lib/model/config.js';
import {
  balanceSplit,
  describeSplit,
  explicitSplit,
  HEAD_SHARE_GAIN,
  headFlopsPerToken,
  layerFlopsPerToken,
} from '../../lib/schedule/split.js';
import { resolveLayout } from '../../actors/index.js';

/** Every way to cut L layers into S non-empty contiguous stages (layer counts). */
function compositions(L: number, S: number): number[][] {
  if (S === 1) return [[L]];
  const out: number[][] = [];
  for (let n = 1; n <= L - (S - 1); n++) for (const rest of compositions(L - n, S - 1)) out.push([n, ...rest]);
  return out;
}

/**
 * The slowest stage of the best split, by trying every one: whole layers, and every share x of
 * the head on the stage before the last (on a grid of 1/1000; taken when it gains HEAD_SHARE_GAIN).
 */
function bruteForce(c: LlamaConfig, speeds: number[], T = 512): number {
  const lf = layerFlopsPerToken(c, T),
    hf = headFlopsPerToken(c);
  const S = speeds.length;
  let whole = Infinity;
  let shared = Infinity;
  for (const comp of compositions(c.numLayers, S)) {
    const layers = comp.map((n, s) => (n * lf) / speeds[s]!);
    whole = Math.min(whole, Math.max(...layers.map((x, s) => x + (s === S - 1 ? hf / speeds[s]! : 0))));
    if (S < 2) continue;
    for (let k = 1; k <= 1000; k++) {
      const x = k / 1000;
      const cost = layers.map((l, s) => l + (s === S - 2 ? x * hf : s === S - 1 ? (1 - x) * hf : 0) / speeds[s]!);
      shared = Math.min(shared, Math.max(...cost));
    }
  }
  return shared < whole * (1 - HEAD_SHARE_GAIN) ? shared : whole;
}

const madeUp: LlamaConfig = {
  ...PRESETS.bench,
  numLayers: 12,
  hiddenSize: 256,
  intermediateSize: 688,
  numHeads: 4,
  numKvHeads: 2,
  headDim: 64,
  vocabSize: 32000,
};
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
    // the grid of shares is 1/1000 fine; the split's share is exact, then rounded to 1/1000
    t.ok(
      Math.abs(got - want) <= 2e-3 * want,
      `${name} speeds ${speeds}: slowest stage ${got} = brute-force optimum ${want} (split ${r.plans.map((p) => p.hi - p.lo)})`,
    );
  }
});

t.test('a faster device gets more layers', async (t) => {
  const flat = { ...madeUp, vocabSize: 16 }; // a negligible head: only the layers count
  const n = (speeds: number[]) => balanceSplit(flat, speeds).plans.map((p) => p.hi - p.lo);
  t.same(n([1, 1]), [6, 6]);
  t.same(n([2, 1]), [8, 4], '2× faster first device');
  t.same(n([1, 2]), [4, 8], '2× faster second device');
  t.same(n([1, 1, 1]), [4, 4, 4]);
  // with a real head, the last stage gives up layers for it, or part of the head
  const withHead = balanceSplit(madeUp, [1, 1]).plans;
  t.ok(
    withHead[1]!.hi - withHead[1]!.lo < withHead[0]!.hi - withHead[0]!.lo || withHead[0]!.headShare,
    `the head stage holds fewer layers or shares its head: ${JSON.stringify(withHead)}`,
  );
});

t.test(
  'below a layer: the stage before the last takes a share of the head where whole layers cannot balance',
  async (t) => {
    // bench preset, 2 stages: whole layers give 3 | 1 + head; half the head on stage 0 evens 2 | 2 out
    const r = balanceSplit(PRESETS.bench, [1, 1], { seqLen: 128 });
    t.same(
      r.plans.map((p) => [p.lo, p.hi]),
      [
        [0, 2],
        [2, 4],
      ],
      'layers 0-1 | 2-3',
    );
    t.ok(
      r.plans[0]!.headShare! > 0.3 && r.plans[0]!.headShare! < 0.7,
      `stage 0 runs ${r.plans[0]!.headShare} of the head`,
    );
    t.ok(Math.abs(r.cost[0]! - r.cost[1]!) <= 1e-3 * r.cost[0]!, `both stages cost the same: ${r.cost}`);
    t.match(
      describeSplit(r.plans, ['cpu:0', 'cpu:1']),
      /stage 0 on cpu:0: layers 0-1 \+ embedding \+ norm\/head\/loss of \d+% of the targeted rows/,
    );
    // the head's real cost: only targeted rows run through it, so a masked prompt makes it cheaper
    t.equal(
      headFlopsPerToken(PRESETS.bench, 0.25),
      headFlopsPerToken(PRESETS.bench) / 4,
      'a quarter of the rows targeted: a quarter of the head',
    );
    t.equal(
      headFlopsPerToken(PRESETS.bench, 0.95),
      headFlopsPerToken(PRESETS.bench),
      'nearly every row targeted: the head runs on every row',
    );
    // a negligible head: whole layers balance, no share
    const flat = balanceSplit({ ...PRESETS.bench, vocabSize: 16 }, [1, 1]);
    t.same(
      flat.plans.map((p) => p.headShare),
      [undefined, undefined],
      'no share where whole layers balance',
    );
  },
);

t.test('errors', async (t) => {
  t.throws(() => balanceSplit(PRESETS.tiny, [1, 1, 1]), /3 stages for a model of 2 layers: use at most 2 devices/);
  t.throws(() => balanceSplit(PRESETS.tiny, []), /at least one device/);
  t.throws(() => explicitSplit(PRESETS.bench, [1, 2]), /covers 3 layers, the model has 4/);
  t.throws(() => explicitSplit(PRESETS.bench, [4, 0]), /every stage needs at least one layer/);
  t.throws(() => explicitSplit(PRESETS.bench, [5, -1]), /every stage needs at least one layer/);
  t.throws(() => explicitSplit(PRESETS.bench, [1.5, 2.5]), /whole number/);
  t.same(explicitSplit(PRESETS.bench, [1, 3]), [
    { lo: 0, hi: 1, first: true, last: false },
    { lo: 1, hi: 4, first: false, last: true },
  ]);
  t.equal(
    describeSplit(explicitSplit(PRESETS.bench, [1, 3]), ['cpu:0', 'cpu:1']),
    'stage 0 on cpu:0: layers 0-0 + embedding\nstage 1 on cpu:1: layers 1-3 + norm/head/loss',
  );
  t.throws(
    () => resolveLayout(PRESETS.bench, { devices: ['cpu:0', 'cpu:1'], split: [1, 1, 2], threads: 1 }),
    /3 stages for 2 devices/,
  );
  t.throws(
    () => resolveLayout(PRESETS.tiny, { devices: ['cpu:0', 'cpu:1', 'cpu:2'], threads: 1 }),
    /use at most 2 devices/,
  );
});
