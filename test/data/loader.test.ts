// AdapterDataLoader: order (shuffle off / on), micro-batch packing, target counts, step
// sizes, state/restore equivalence, token-budget mode.
import t from 'tap';
import { AdapterDataLoader, type MicroBatch } from '../../lib/data/loader.js';
import { IGNORE_INDEX, type TokenizedExample } from '../../lib/data/tokenize.js';
import { Rng } from '../../lib/rng.js';

/** n examples; example i has length 2 + (i*7 mod 9), ids encode (i, position), the first
 *  two labels of each are masked (a prompt), the rest are targets. */
function examples(n: number, seed = 1): TokenizedExample[] {
  const rng = new Rng(seed, 'test-examples');
  return Array.from({ length: n }, (_, i) => {
    const len = 2 + ((i * 7) % 9) + rng.int(3);
    const inputIds = Int32Array.from({ length: len }, (_, j) => i * 100 + j);
    const labels = Int32Array.from(inputIds, (x, j) => (j < 2 ? IGNORE_INDEX : x));
    return { inputIds, labels };
  });
}

function drain(l: AdapterDataLoader, max = 1e6): MicroBatch[] {
  const out: MicroBatch[] = [];
  while (out.length < max) {
    const mb = l.next();
    if (!mb) break;
    out.push(mb);
  }
  return out;
}

/** Examples of each step, concatenated over its micro-batches. */
function steps(mbs: MicroBatch[]): number[][] {
  const s: number[][] = [];
  for (const mb of mbs) {
    if (mb.microIndex === 0) s.push([]);
    s[s.length - 1]!.push(...mb.examples);
  }
  return s;
}

t.test('shuffle off: batch k is examples [kB, (k+1)B) in file order; the last partial batch is kept', async (t) => {
  const data = examples(10);
  const l = new AdapterDataLoader(data, { batchSize: 4, shuffle: false, epochs: 2 });
  t.equal(l.totalSteps, 6, 'epochs · ceil(10/4)');
  const s = steps(drain(l));
  t.same(s, [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9], [0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]);
  t.equal(l.next(), null, 'null when done');
  t.ok(l.done);
});

t.test('totalSteps is capped by maxSteps', async (t) => {
  const l = new AdapterDataLoader(examples(10), { batchSize: 3, epochs: 5, maxSteps: 7, seed: 3 });
  t.equal(l.totalSteps, 7);
  t.equal(steps(drain(l)).length, 7);
  t.equal(new AdapterDataLoader(examples(9), { batchSize: 3, epochs: 2 }).totalSteps, 6);
  t.equal(new AdapterDataLoader(examples(1), { batchSize: 8 }).totalSteps, 1);
});

t.test('shuffle on: a permutation per epoch, reproducible per seed, different across epochs and seeds', async (t) => {
  const n = 23;
  const data = examples(n);
  const epochOrders = (seed: number) => {
    const l = new AdapterDataLoader(data, { batchSize: 5, epochs: 3, seed, shuffle: true });
    const flat = steps(drain(l)).flat();
    return [flat.slice(0, n), flat.slice(n, 2 * n), flat.slice(2 * n)];
  };
  const a = epochOrders(7);
  const b = epochOrders(7);
  const c = epochOrders(8);
  for (const e of a) t.same([...e].sort((x, y) => x - y), Array.from({ length: n }, (_, i) => i), 'each epoch is a permutation');
  t.same(a, b, 'same seed -> same order');
  t.notSame(a[0], a[1], 'epochs differ');
  t.notSame(a[1], a[2], 'epochs differ');
  t.notSame(a[0], c[0], 'seeds differ');
  const expected = new Rng(7, 'data', 1).shuffle(Array.from({ length: n }, (_, i) => i));
  t.same(a[1], expected, "epoch e's order is Rng(seed, 'data', e).shuffle");
});

t.test('micro-batches: split, packed offsets, positions, targets and counts', async (t) => {
  const data = examples(11);
  const l = new AdapterDataLoader(data, { batchSize: 5, microBatchSize: 2, shuffle: false });
  const mbs = drain(l);
  t.same(mbs.map((m) => m.examples), [[0, 1], [2, 3], [4], [5, 6], [7, 8], [9], [10]], 'micro size 2, the last of a step smaller');
  t.same(mbs.map((m) => [m.step, m.microIndex, m.microCount, m.lastOfStep]), [
    [0, 0, 3, false], [0, 1, 3, false], [0, 2, 3, true],
    [1, 0, 3, false], [1, 1, 3, false], [1, 2, 3, true],
    [2, 0, 1, true],
  ]);
  for (const mb of mbs) {
    const lens = mb.examples.map((i) => data[i]!.inputIds.length);
    const cu = [0];
    for (const n of lens) cu.push(cu[cu.length - 1]! + n);
    t.same(Array.from(mb.cuSeqlens), cu, `step ${mb.step}.${mb.microIndex}: cuSeqlens`);
    t.equal(mb.numTokens, cu[cu.length - 1]);
    t.same(Array.from(mb.positions), lens.flatMap((n) => Array.from({ length: n }, (_, j) => j)), 'positions restart per sequence');
    t.same(Array.from(mb.inputIds), mb.examples.flatMap((i) => Array.from(data[i]!.inputIds)), 'ids concatenated, no padding');
    t.same(Array.from(mb.labels), mb.examples.flatMap((i) => Array.from(data[i]!.labels)));
    // targets: labels shifted within each sequence
    const want: number[] = [];
    let nt = 0;
    for (const i of mb.examples) {
      const lab = data[i]!.labels;
      for (let j = 0; j < lab.length; j++) want.push(j + 1 < lab.length ? lab[j + 1]! : IGNORE_INDEX);
      for (let j = 1; j < lab.length; j++) if (lab[j] !== IGNORE_INDEX) nt++;
    }
    t.same(Array.from(mb.targets), want, 'targets never cross a sequence boundary');
    t.equal(mb.numTargetTokens, nt, 'numTargetTokens = labels ≠ -100 after the first position of each sequence');
  }
  for (const s of [0, 1, 2]) {
    const ms = mbs.filter((m) => m.step === s);
    const total = ms.reduce((a, m) => a + m.numTargetTokens, 0);
    for (const m of ms) t.equal(m.stepTargetTokens, total, `step ${s}: stepTargetTokens is the whole step's count`);
  }
});

t.test('a label at position 0 is never counted as a target', async (t) => {
  const ex = [{ inputIds: Int32Array.from([5, 6, 7]), labels: Int32Array.from([5, 6, 7]) }, { inputIds: Int32Array.from([8]), labels: Int32Array.from([8]) }];
  const mb = new AdapterDataLoader(ex, { batchSize: 2, shuffle: false }).next()!;
  t.equal(mb.numTargetTokens, 2);
  t.same(Array.from(mb.targets), [6, 7, -100, -100]);
});

t.test('state/restore: resuming gives the same micro-batches as an uninterrupted run', async (t) => {
  const data = examples(17);
  const opts = { batchSize: 4, microBatchSize: 3, epochs: 3, seed: 11, shuffle: true };
  const ref = drain(new AdapterDataLoader(data, opts));
  for (const cut of [0, 1, 5, 6, 13, ref.length - 1, ref.length]) {
    const a = new AdapterDataLoader(data, opts);
    drain(a, cut);
    const st = JSON.parse(JSON.stringify(a.state()));
    const b = new AdapterDataLoader(data, opts);
    b.restore(st);
    const rest = drain(b);
    t.equal(rest.length, ref.length - cut, `cut at ${cut}: the rest has the right length`);
    t.same(rest, ref.slice(cut), `cut at ${cut} (step ${st.step}, micro ${st.microIndex}): identical continuation`);
  }
  const other = new AdapterDataLoader(data, { ...opts, seed: 12 });
  t.throws(() => other.restore(new AdapterDataLoader(data, opts).state()), /cannot restore a state saved with seed 11 into a loader with seed 12/);
});

t.test('token-budget mode packs whole examples greedily within the budget', async (t) => {
  const data = examples(20);
  const budget = 24;
  const l = new AdapterDataLoader(data, { batchSize: 8, microBatchSize: 8, maxTokensPerMicroBatch: budget, shuffle: false });
  const mbs = drain(l);
  t.same(steps(mbs), [[0, 1, 2, 3, 4, 5, 6, 7], [8, 9, 10, 11, 12, 13, 14, 15], [16, 17, 18, 19]], 'steps unchanged by the budget');
  for (let k = 0; k < mbs.length; k++) {
    const mb = mbs[k]!;
    t.ok(mb.numTokens <= budget || mb.examples.length === 1, `micro ${k}: ${mb.numTokens} tokens within budget`);
    const nxt = mbs[k + 1];
    if (nxt && nxt.step === mb.step) t.ok(mb.numTokens + data[nxt.examples[0]!]!.inputIds.length > budget, 'greedy: the next example would not fit');
  }
});

t.test('bad options are clear errors', async (t) => {
  const d = examples(3);
  t.throws(() => new AdapterDataLoader(d, { batchSize: 2, microBatchSize: 3 }), /micro_batch_size \(3\) must not exceed batch_size \(2\)/);
  t.throws(() => new AdapterDataLoader(d, { batchSize: 0 }), /batch_size must be a positive integer, got 0/);
  t.throws(() => new AdapterDataLoader([], { batchSize: 2 }), /the dataset has no examples/);
});
