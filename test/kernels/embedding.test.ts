// Token embedding: forward gathers rows (exactly, in every storage dtype), backward
// scatter-adds dy into dtable (+=, repeated ids summed). Float64 reference in the test.
import t from 'tap';
import { Rng } from '../../lib/rng.js';
import { assertClose, cpuDevice, randn } from '../support/helpers.js';
import { assertBitwise, dot, expectRefused, f32, i32, read, stored } from './util.js';

const d = cpuDevice(2);

function gatherRef(values: Float32Array, ids: Int32Array, h: number): Float32Array {
  const y = new Float32Array(ids.length * h);
  ids.forEach((id, n) => y.set(values.subarray(id * h, id * h + h), n * h));
  return y;
}

t.test('forward gathers rows exactly for f32, bf16 and f16 tables', async (t) => {
  const rng = new Rng(1, 'embedding-forward');
  const vocab = 50,
    h = 24,
    n = 40;
  const ids = Int32Array.from({ length: n }, (_, i) => (i < 4 ? 7 : rng.int(vocab))); // repeats included
  for (const dtype of ['f32', 'bf16', 'f16'] as const) {
    const { tensor, values } = stored(d, dtype, [vocab, h], randn(rng, vocab * h, 2));
    const y = d.alloc('f32', [n, h]);
    await d.run([{ op: 'embedding_forward', y, ids: i32(d, [n], ids), table: tensor }]);
    // A gather is a copy (plus an exact widening conversion): bitwise equality is the right bar.
    assertBitwise(t, read(y), gatherRef(values, ids, h), `${dtype} table`);
  }
});

t.test('forward at the extremes of each dtype range', async (t) => {
  const rng = new Rng(2, 'embedding-extreme');
  const vocab = 6,
    h = 8;
  const ids = Int32Array.from([0, 5, 3, 3, 1]);
  const ranges = { f32: 3e38, bf16: 3e38, f16: 6e4 } as const;
  for (const dtype of ['f32', 'bf16', 'f16'] as const) {
    const data = randu(rng, vocab * h).map((u, i) => (i % 3 === 0 ? u * 1e-6 : u * ranges[dtype]));
    const { tensor, values } = stored(d, dtype, [vocab, h], Float32Array.from(data));
    const y = d.alloc('f32', [ids.length, h]);
    d.runSync([{ op: 'embedding_forward', y, ids: i32(d, [ids.length], ids), table: tensor }]);
    assertBitwise(t, read(y), gatherRef(values, ids, h), `${dtype} extreme values`);
    t.ok(values.every(Number.isFinite), `${dtype} values stay finite`);
  }
});

function randu(rng: Rng, n: number): Float32Array {
  return rng.fillUniform(new Float32Array(n), -1, 1);
}

t.test('backward scatter-adds dy into dtable (+=), repeated ids summed', async (t) => {
  const rng = new Rng(3, 'embedding-backward');
  const vocab = 30,
    h = 40,
    n = 64;
  const ids = Int32Array.from({ length: n }, () => rng.int(10)); // many repeats among 10 ids
  const dy = randn(rng, n * h);
  const dt0 = randn(rng, vocab * h); // non-zero start: checks +=
  const dtable = f32(d, [vocab, h], dt0);
  await d.run([{ op: 'embedding_backward', dtable, dy: f32(d, [n, h], dy), ids: i32(d, [n], ids) }]);
  const want = Float64Array.from(dt0);
  ids.forEach((id, r) => {
    for (let j = 0; j < h; j++) want[id * h + j]! += dy[r * h + j]!;
  });
  // float sums of ≤ n terms of size ~1: rounding ≲ n·2⁻²⁴·|partial sums| ≈ 1e-5
  assertClose(t, read(dtable), want, { atol: 2e-5, rtol: 1e-5 }, 'dtable');
  // Rows of tokens that never occur are untouched.
  const got = read(dtable);
  let untouched = true;
  for (let v = 10; v < vocab; v++) for (let j = 0; j < h; j++) untouched &&= got[v * h + j] === dt0[v * h + j];
  t.ok(untouched, 'rows of absent ids are untouched');
});

t.test('backward matches finite differences of the kernel forward', async (t) => {
  const rng = new Rng(4, 'embedding-fd');
  const vocab = 5,
    h = 3,
    n = 6;
  const ids = Int32Array.from([0, 2, 2, 4, 1, 2]);
  const table = randn(rng, vocab * h);
  const c = randn(rng, n * h); // L = Σ c·y
  const idsT = i32(d, [n], ids);
  const y = d.alloc('f32', [n, h]);
  const loss = (tab: Float32Array) => {
    d.runSync([{ op: 'embedding_forward', y, ids: idsT, table: f32(d, [vocab, h], tab) }]);
    return dot(c, read(y));
  };
  const fd = new Float64Array(vocab * h);
  const step = 0.25; // L is linear in the table, so any step is exact up to float rounding of y
  for (let i = 0; i < fd.length; i++) {
    const p = Float32Array.from(table);
    p[i] = table[i]! + step;
    const up = loss(p);
    p[i] = table[i]! - step;
    fd[i] = (up - loss(p)) / (2 * step);
  }
  const dtable = d.alloc('f32', [vocab, h], { zero: true });
  d.runSync([{ op: 'embedding_backward', dtable, dy: f32(d, [n, h], c), ids: idsT }]);
  assertClose(t, read(dtable), fd, { atol: 1e-5, rtol: 1e-5 }, 'dtable vs finite differences');
});

t.test('bad arguments are Errors naming the argument', async (t) => {
  const table = f32(d, [10, 4], randn(new Rng(5), 40));
  const y = d.alloc('f32', [3, 4]);
  await expectRefused(
    t,
    d,
    [{ op: 'embedding_forward', y, ids: i32(d, [3], [1, 10, 2]), table }],
    /argument 'ids': token id 10 at row 1 is out of range \[0, 10\)/,
  );
  await expectRefused(
    t,
    d,
    [{ op: 'embedding_forward', y, ids: i32(d, [3], [1, 2, -1]), table }],
    /token id -1 at row 2 is out of range/,
  );
  await expectRefused(
    t,
    d,
    [{ op: 'embedding_backward', dtable: d.alloc('f32', [10, 4]), dy: y, ids: i32(d, [3], [0, 11, 0]) }],
    /token id 11 at row 1/,
  );
  await expectRefused(
    t,
    d,
    [{ op: 'embedding_forward', y, ids: f32(d, [3], [1, 2, 3]), table }],
    /argument 'ids' has dtype f32, expected i32/,
  );
  await expectRefused(
    t,
    d,
    [{ op: 'embedding_forward', y: d.alloc('f32', [3, 5]), ids: i32(d, [3], [1, 2, 3]), table }],
    /argument 'y' has shape \[3,5\], expected \[3,4\]/,
  );
  await expectRefused(
    t,
    d,
    [{ op: 'embedding_forward', y, ids: i32(d, [3], [1, 2, 3]), table: f32(d, [40], new Float32Array(40).fill(1)) }],
    /argument 'table' must be 2-D/,
  );
  await expectRefused(
    t,
    d,
    [{ op: 'embedding_backward', dtable: i32(d, [10, 4], new Int32Array(40)), dy: y, ids: i32(d, [3], [0, 1, 2]) }],
    /argument 'dtable' has dtype i32/,
  );
});
