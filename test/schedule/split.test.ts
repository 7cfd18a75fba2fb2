// Stage balance: balanceSplit minimises the slowest stage (checked against brute force over
// every contiguous split), honours device speeds, rejects impossible requests; explicitSplit
// validates user splits.
import t from 'tap';
import { PRESETS, type LlamaConfig } from '../../lib/model/config.js';
import {
  attentionFlopsPerToken,
  balanceSplit,
  describeSplit,
  explicitSplit,
  flopCosts,
  HALF_LAYER_GAIN,
  HEAD_SHARE_GAIN,
  headFlopsPerToken,
  layerFlopsPerToken,
  mlpFlopsPerToken,
} from '../../lib/schedule/split.js';
import type { StagePlan } from '../../lib/model/batch.js';
import { resolveLayout } from '../../actors/index.js';

/** Every way to cut U units into S non-empty contiguous stages of multiples of `step` units (unit counts). */
function compositions(U: number, S: number, step: number): number[][] {
  if (S === 1) return [[U]];
  const out: number[][] = [];
  for (let n = step; n <= U - (S - 1) * step; n += step)
    for (const rest of compositions(U - n, S - 1, step)) out.push([n, ...rest]);
  return out;
}

/**
 * The slowest stage of the best split, by trying every one, in half-layer units (2l: layer l's
 * attention, 2l + 1 its MLP): whole layers, and every share x of the head on the stage before
 * the last (on a grid of 1/1000; taken when it gains HEAD_SHARE_GAIN); then the same with cuts
 * inside layers too, taken when that gains HALF_LAYER_GAIN over the whole-layer best.
 */
function bruteForce(c: LlamaConfig, speeds: number[], T = 512): number {
  const af = attentionFlopsPerToken(c, T),
    mf = mlpFlopsPerToken(c),
    hf = headFlopsPerToken(c);
  const S = speeds.length;
  const U = 2 * c.numLayers;
  const family = (step: number) => {
    let whole = Infinity;
    let shared = Infinity;
    for (const comp of compositions(U, S, step)) {
      let u0 = 0;
      const layers = comp.map((n, s) => {
        let w = 0;
        for (let u = u0; u < u0 + n; u++) w += u % 2 === 0 ? af : mf;
        u0 += n;
        return w / speeds[s]!;
      });
      whole = Math.min(whole, Math.max(...layers.map((x, s) => x + (s === S - 1 ? hf / speeds[s]! : 0))));
      if (S < 2) continue;
      for (let k = 1; k <= 1000; k++) {
        const x = k / 1000;
        const cost = layers.map((l, s) => l + (s === S - 2 ? x * hf : s === S - 1 ? (1 - x) * hf : 0) / speeds[s]!);
        shared = Math.min(shared, Math.max(...cost));
      }
    }
    return shared < whole * (1 - HEAD_SHARE_GAIN) ? shared : whole;
  };
  const whole = family(2);
  const halves = family(1);
  return halves < whole * (1 - HALF_LAYER_GAIN) ? halves : whole;
}

/** A plan's length in half-layer units. */
const unitsOf = (p: StagePlan) => 2 * (p.hi - p.lo) - (p.firstMlpOnly ? 1 : 0) - (p.lastAttnOnly ? 1 : 0);

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
      t.ok(unitsOf(p) > 0, `${name} ${speeds}: stage ${s} has a layer or half of one`);
      // contiguous: the next stage starts at the layer this one ended, or inside it when this one ran its attention half only
      if (s > 0) t.equal(p.lo, r.plans[s - 1]!.hi - (r.plans[s - 1]!.lastAttnOnly ? 1 : 0));
      if (s > 0) t.equal(!!p.firstMlpOnly, !!r.plans[s - 1]!.lastAttnOnly, 'a layer cut has both halves');
      t.equal(p.first, s === 0);
      t.equal(p.last, s === S - 1);
    }
    const want = bruteForce(c, speeds);
    const got = Math.max(...r.cost);
    // the grid of shares is 1/1000 fine; the split's share is exact, then rounded to 1/1000
    t.ok(
      Math.abs(got - want) <= 2e-3 * want,
      `${name} speeds ${speeds}: slowest stage ${got} = brute-force optimum ${want} (split ${r.plans.map((p) => unitsOf(p) / 2)})`,
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
    unitsOf(withHead[1]!) < unitsOf(withHead[0]!) || withHead[0]!.headShare,
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

/** The shape of stories260K (5 layers, hidden 64, vocab 512): the demo's model. */
const STORIES: LlamaConfig = {
  ...PRESETS.tiny,
  numLayers: 5,
  intermediateSize: 172,
  numHeads: 8,
  numKvHeads: 4,
  headDim: 8,
};

t.test("inside a layer: an odd number of equal layers on 2 stages is cut after a layer's attention", async (t) => {
  // stories260K at 256 tokens: whole layers give
  // 3 | 2 + head, ~10% apart; a cut after layer 2's attention and a share of the head even it out
  const c = STORIES;
  const r = balanceSplit(c, [1, 1], { seqLen: 256 });
  t.same(
    r.plans.map((p) => [p.lo, p.hi, !!p.lastAttnOnly, !!p.firstMlpOnly]),
    [
      [0, 3, true, false],
      [2, 5, false, true],
    ],
    'layers 0-1 and the attention of 2 | the MLP of 2 and layers 3-4',
  );
  t.ok(Math.abs(r.cost[0]! - r.cost[1]!) <= 1e-3 * r.cost[0]!, `both stages cost the same: ${r.cost}`);
  t.equal(
    attentionFlopsPerToken(c, 256) + mlpFlopsPerToken(c),
    layerFlopsPerToken(c, 256),
    'the halves make the layer',
  );
  // where whole layers balance (an even number of them, a negligible head), no cut inside one
  const even = balanceSplit({ ...c, numLayers: 4, vocabSize: 16 }, [1, 1], { seqLen: 256 });
  t.same(
    even.plans.map((p) => [p.lo, p.hi, p.lastAttnOnly, p.firstMlpOnly]),
    [
      [0, 2, undefined, undefined],
      [2, 4, undefined, undefined],
    ],
  );
});

t.test('errors', async (t) => {
  t.throws(() => balanceSplit(PRESETS.tiny, [1, 1, 1]), /3 stages for a model of 2 layers: use at most 2 devices/);
  t.throws(() => balanceSplit(PRESETS.tiny, []), /at least one device/);
  t.throws(() => explicitSplit(PRESETS.bench, [1, 2]), /covers 3 layers, the model has 4/);
  t.throws(() => explicitSplit(PRESETS.bench, [4, 0]), /every stage needs at least half a layer/);
  t.throws(() => explicitSplit(PRESETS.bench, [5, -1]), /every stage needs at least half a layer/);
  t.throws(() => explicitSplit(PRESETS.bench, [1.25, 2.75]), /whole numbers or halves/);
  t.same(explicitSplit(PRESETS.bench, [1.5, 2, 0.5]), [
    { lo: 0, hi: 2, first: true, last: false, lastAttnOnly: true },
    { lo: 1, hi: 4, first: false, last: false, firstMlpOnly: true, lastAttnOnly: true },
    { lo: 3, hi: 4, first: false, last: true, firstMlpOnly: true },
  ]);
  t.equal(
    describeSplit(explicitSplit(PRESETS.bench, [1.5, 2, 0.5]), ['cpu:0', 'cpu:1', 'cpu:2']),
    [
      'stage 0 on cpu:0: layer 0 to the attention of layer 1 + embedding',
      'stage 1 on cpu:1: the MLP of layer 1 to the attention of layer 3',
      'stage 2 on cpu:2: the MLP of layer 3 + norm/head/loss',
    ].join('\n'),
  );
  t.same(explicitSplit(PRESETS.bench, [1, 3]), [
    { lo: 0, hi: 1, first: true, last: false },
    { lo: 1, hi: 4, first: false, last: true },
  ]);
  t.equal(
    describeSplit(explicitSplit(PRESETS.bench, [1, 3]), ['cpu:0', 'cpu:1']),
    'stage 0 on cpu:0: layer 0 + embedding\nstage 1 on cpu:1: layers 1-3 + norm/head/loss',
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

t.test('measured costs: the split balances the unit costs it is given, FLOP counts by default', async (t) => {
  // stories260K: at 256 tokens FLOPs put a layer's attention at 55% of it
  const c = STORIES;
  const profile = { seqLen: 256 };
  t.same(
    balanceSplit(c, [1, 1], { ...profile, costs: flopCosts(c, profile) }),
    balanceSplit(c, [1, 1], profile),
    'no costs given: the FLOP costs',
  );
  // costs as timed on a CPU (ms per micro-batch): the attention half is the cheaper one, so the
  // stage with three of them (0) takes more of the head, 0.5 + (mlp - attention) / (2 head) of it
  const costs = { attention: 2.4, mlp: 3.6, head: 1.5 };
  const r = balanceSplit(c, [1, 1], { ...profile, costs });
  t.same(
    r.plans.map((p) => [p.lo, p.hi, !!p.lastAttnOnly, !!p.firstMlpOnly]),
    [
      [0, 3, true, false],
      [2, 5, false, true],
    ],
  );
  t.equal(r.plans[0]!.headShare, 0.9, 'stage 0 runs 90% of the head');
  t.ok(Math.abs(r.cost[0]! - r.cost[1]!) <= 1e-9, `both stages cost the same: ${r.cost}`);
  t.ok(Math.abs(r.cost[0]! - (3 * 2.4 + 2 * 3.6 + 0.9 * 1.5)) <= 1e-9, `stage cost in the costs' unit: ${r.cost[0]}`);
  t.ok(balanceSplit(c, [1, 1], profile).plans[0]!.headShare! < 0.5, 'FLOPs give stage 0 less than half');
});
