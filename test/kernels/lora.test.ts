// Segmented multi-adapter LoRA (BatchLoRA): K adapters with their own rank, scale, dropout, seed
// and position, each on its own row segment, in one call. Checked against a float64 reference
// (with the dropout mask read back from the kernel and checked on its own), finite differences
// of the kernel itself, a loop of single-segment calls, += semantics, and argument checks.
// One file though long: every case drives the same segmented op through one inputs()/reference
// pair, and split files would each need the float64 reference and its dropout read-back.
import t, { type Test } from 'tap';
import { Rng } from '../../lib/rng.js';
import type { Device, Tensor } from '../../lib/tensor.js';
import { assertClose, cpuDevice, randn, type Tolerance } from '../support/helpers.js';
import { assertBitwise, dot, expectRefused, f32, KERNEL_PATHS, read, skipUnless, withKernel } from './util.js';

const d = cpuDevice(2);

interface Spec {
  rowStart: number;
  rowEnd: number;
  r: number;
  scale: number;
  dropout: number;
  seed: number;
  position: number;
}

interface Adapter extends Spec {
  a: Float32Array; // [r, in]
  b: Float32Array; // [out, r]
}

const IN = 24,
  OUT = 20,
  ROWS = 40;
// Ranks 2, 4, 8 with different scales; rows 10..12 and 37..39 belong to no adapter; segments 1 and
// 2 touch at row 25.
const SPECS: Spec[] = [
  { rowStart: 0, rowEnd: 10, r: 2, scale: 2.0, dropout: 0.1, seed: 11, position: 1000 },
  { rowStart: 13, rowEnd: 25, r: 4, scale: 0.5, dropout: 0.25, seed: 22, position: 77 },
  { rowStart: 25, rowEnd: 37, r: 8, scale: 0.25, dropout: 0.5, seed: 2 ** 40 + 3, position: 0 },
];

function adapters(rng: Rng, specs: Spec[], dropout: boolean, inDim = IN, outDim = OUT): Adapter[] {
  return specs.map((s) => ({
    ...s,
    dropout: dropout ? s.dropout : 0,
    a: randn(rng, s.r * inDim, 0.3),
    b: randn(rng, outDim * s.r, 0.3),
  }));
}

/** The multiplier (0 or 1/(1-p)) the kernel applies to each input element of a segment, read back
 *  by running it with A = identity on x = ones: then xa = mask exactly. */
function kernelMask(
  dev: Device,
  rows: number,
  inDim: number,
  p: number,
  seed: number,
  position: number,
  rowStart = 0,
): Float32Array {
  const eye = new Float32Array(inDim * inDim);
  for (let i = 0; i < inDim; i++) eye[i * inDim + i] = 1;
  const x = f32(dev, [rowStart + rows, inDim], new Float32Array((rowStart + rows) * inDim).fill(1));
  const y = f32(dev, [rowStart + rows, 1], new Float32Array(rowStart + rows).fill(0.5));
  const xa = dev.alloc('f32', [rows, inDim]);
  dev.runSync([
    {
      op: 'lora_forward',
      y,
      x,
      segments: [
        {
          rowStart,
          rowEnd: rowStart + rows,
          a: f32(dev, [inDim, inDim], eye),
          b: f32(dev, [1, inDim], new Float32Array(inDim).fill(1)),
          scale: 1,
          dropout: p,
          seed,
          position,
          xa,
        },
      ],
    },
  ]);
  return read(xa);
}

function masks(ads: Adapter[], inDim = IN): Float32Array[] {
  return ads.map((s) =>
    s.dropout > 0
      ? kernelMask(d, s.rowEnd - s.rowStart, inDim, s.dropout, s.seed, s.position)
      : new Float32Array((s.rowEnd - s.rowStart) * inDim).fill(1),
  );
}

/** Float64 reference of forward (y += …, xa) and backward (dx += …, dA += …, dB += …). */
function reference(
  ads: Adapter[],
  ms: Float32Array[],
  x: Float32Array,
  y0: Float32Array,
  dy: Float32Array,
  dx0: Float32Array,
  inDim = IN,
  outDim = OUT,
) {
  const y = Float64Array.from(y0),
    dx = Float64Array.from(dx0);
  const xas: Float64Array[] = [],
    das: Float64Array[] = [],
    dbs: Float64Array[] = [];
  ads.forEach((s, k) => {
    const n = s.rowEnd - s.rowStart,
      r = s.r,
      m = ms[k]!;
    const xd = Float64Array.from({ length: n * inDim }, (_, i) => x[s.rowStart * inDim + i]! * m[i]!);
    const xa = new Float64Array(n * r),
      dxa = new Float64Array(n * r);
    const da = new Float64Array(r * inDim),
      db = new Float64Array(outDim * r);
    for (let i = 0; i < n; i++)
      for (let q = 0; q < r; q++) {
        let acc = 0;
        for (let c = 0; c < inDim; c++) acc += xd[i * inDim + c]! * s.a[q * inDim + c]!;
        xa[i * r + q] = acc;
      }
    for (let i = 0; i < n; i++)
      for (let o = 0; o < outDim; o++) {
        let acc = 0;
        for (let q = 0; q < r; q++) acc += xa[i * r + q]! * s.b[o * r + q]!;
        y[(s.rowStart + i) * outDim + o]! += s.scale * acc;
      }
    for (let i = 0; i < n; i++)
      for (let q = 0; q < r; q++) {
        let acc = 0;
        for (let o = 0; o < outDim; o++) acc += dy[(s.rowStart + i) * outDim + o]! * s.b[o * r + q]!;
        dxa[i * r + q] = s.scale * acc;
      }
    for (let o = 0; o < outDim; o++)
      for (let q = 0; q < r; q++) {
        let acc = 0;
        for (let i = 0; i < n; i++) acc += dy[(s.rowStart + i) * outDim + o]! * xa[i * r + q]!;
        db[o * r + q] = s.scale * acc;
      }
    for (let q = 0; q < r; q++)
      for (let c = 0; c < inDim; c++) {
        let acc = 0;
        for (let i = 0; i < n; i++) acc += dxa[i * r + q]! * xd[i * inDim + c]!;
        da[q * inDim + c] = acc;
      }
    for (let i = 0; i < n; i++)
      for (let c = 0; c < inDim; c++) {
        let acc = 0;
        for (let q = 0; q < r; q++) acc += dxa[i * r + q]! * s.a[q * inDim + c]!;
        dx[(s.rowStart + i) * inDim + c]! += m[i * inDim + c]! * acc;
      }
    xas.push(xa);
    das.push(da);
    dbs.push(db);
  });
  return { y, dx, xas, das, dbs };
}

interface Bound {
  seg: Record<string, unknown>;
  xa: Tensor;
  da: Tensor;
  db: Tensor;
}

/** Device tensors for the adapters; da/db start at the given values (non-zero, to check +=). */
function bind(
  dev: Device,
  ads: Adapter[],
  da0: Float32Array[],
  db0: Float32Array[],
  inDim = IN,
  outDim = OUT,
): Bound[] {
  return ads.map((s, k) => {
    const xa = dev.alloc('f32', [s.rowEnd - s.rowStart, s.r]);
    const da = f32(dev, [s.r, inDim], da0[k]!),
      db = f32(dev, [outDim, s.r], db0[k]!);
    const seg = {
      rowStart: s.rowStart,
      rowEnd: s.rowEnd,
      scale: s.scale,
      dropout: s.dropout,
      seed: s.seed,
      position: s.position,
      a: f32(dev, [s.r, inDim], s.a),
      b: f32(dev, [outDim, s.r], s.b),
      xa,
      da,
      db,
    };
    return { seg, xa, da, db };
  });
}

/** Seeded inputs of one problem: x and dy, and start values (non-zero, to check +=) of y, dx and each adapter's dA, dB. */
function inputs(rng: Rng, ads: Adapter[], rows = ROWS, inDim = IN, outDim = OUT) {
  return {
    x: randn(rng, rows * inDim),
    y0: randn(rng, rows * outDim),
    dy: randn(rng, rows * outDim),
    dx0: randn(rng, rows * inDim),
    da0: ads.map((s) => randn(rng, s.r * inDim)),
    db0: ads.map((s) => randn(rng, outDim * s.r)),
  };
}

/** Each adapter's dA and dB after `calls` backward calls: the start value plus `calls` × the reference's. */
function assertAdapterGrads(
  t: Test,
  bound: Bound[],
  ref: ReturnType<typeof reference>,
  p: { da0: Float32Array[]; db0: Float32Array[] },
  tol: Tolerance,
  at: string,
  calls = 1,
) {
  bound.forEach((b, k) => {
    const da = ref.das[k]!.map((v, i) => p.da0[k]![i]! + calls * v);
    assertClose(t, read(b.da), da, tol, `dA of adapter ${k} ${at}`);
    const db = ref.dbs[k]!.map((v, i) => p.db0[k]![i]! + calls * v);
    assertClose(t, read(b.db), db, tol, `dB of adapter ${k} ${at}`);
  });
}

// Tolerances: every product is a float GEMM with k ≤ 24 over O(1) values (|x|~1, |A|,|B|~0.3),
// so rounding is ~k·2⁻²⁴·|terms| ≲ 2e-6; 2e-5 leaves margin without hiding a wrong index.
const TOL = { atol: 2e-5, rtol: 2e-5 };

for (const dropout of [false, true]) {
  t.test(
    `forward and backward vs float64, ranks 2/4/8, uncovered rows, dropout ${dropout ? 'on' : 'off'}`,
    async (t) => {
      const rng = new Rng(30, 'lora', dropout ? 1 : 0);
      const ads = adapters(rng, SPECS, dropout);
      const ms = masks(ads);
      const p = inputs(rng, ads);
      const { x, y0, dy, dx0 } = p;
      const ref = reference(ads, ms, x, y0, dy, dx0);
      const bound = bind(d, ads, p.da0, p.db0);
      const xt = f32(d, [ROWS, IN], x),
        y = f32(d, [ROWS, OUT], y0),
        dx = f32(d, [ROWS, IN], dx0);
      await d.run([{ op: 'lora_forward', y, x: xt, segments: bound.map((b) => b.seg) as never }]);
      assertClose(t, read(y), ref.y, TOL, 'y (+=)');
      bound.forEach((b, k) => assertClose(t, read(b.xa), ref.xas[k]!, TOL, `xa of adapter ${k} (rank ${ads[k]!.r})`));
      await d.run([
        { op: 'lora_backward', dx, dy: f32(d, [ROWS, OUT], dy), x: xt, segments: bound.map((b) => b.seg) as never },
      ]);
      assertClose(t, read(dx), ref.dx, TOL, 'dx (+=)');
      assertAdapterGrads(t, bound, ref, p, TOL, '(+=)');
      // Rows no segment covers are not touched at all.
      const yv = read(y),
        dxv = read(dx);
      const uncovered = [10, 11, 12, 37, 38, 39];
      t.ok(
        uncovered.every((r) => yv.subarray(r * OUT, r * OUT + OUT).every((v, j) => v === y0[r * OUT + j])),
        'uncovered rows of y unchanged',
      );
      t.ok(
        uncovered.every((r) => dxv.subarray(r * IN, r * IN + IN).every((v, j) => v === dx0[r * IN + j])),
        'uncovered rows of dx unchanged',
      );
    },
  );
}

// The kernel runs AVX-512, AVX2 or portable tile code (the widest whose vector width divides in
// and out, unless MLORA_GEMM_KERNEL asks for a narrower one; read at each call). Every path this
// CPU has, on widths that all paths accept, ranks below, at and above one vector (padded xa
// rows), segments longer than one row block, dropout on; 1 and 2 threads bitwise equal. The long
// case has segments of several backward row groups (512 rows each, the last one partial), whose
// shares of dA and dB are summed after the groups' passes.
const PATH_CASES: Array<{ name: string; rows: number; specs: Spec[]; tol: Tolerance }> = [
  {
    name: 'segments of 70-79 rows',
    rows: 230,
    specs: [
      { rowStart: 0, rowEnd: 70, r: 16, scale: 2.0, dropout: 0.1, seed: 5, position: 300 },
      { rowStart: 75, rowEnd: 150, r: 5, scale: 0.5, dropout: 0, seed: 0, position: 0 },
      { rowStart: 150, rowEnd: 229, r: 20, scale: 0.25, dropout: 0.3, seed: 9, position: 12 },
    ],
    // Sums of up to 48 (forward) or 79 (dA, dB: over a segment's rows) float products of O(1)
    // terms: rounding ≲ 79·2⁻²⁴·|terms| ≈ 1e-5.
    tol: { atol: 5e-5, rtol: 5e-5 },
  },
  {
    name: 'segments of 3 and 2 row groups',
    rows: 1700,
    specs: [
      { rowStart: 0, rowEnd: 1100, r: 16, scale: 2.0, dropout: 0.1, seed: 5, position: 300 },
      { rowStart: 1100, rowEnd: 1690, r: 5, scale: 0.5, dropout: 0, seed: 0, position: 0 },
    ],
    // dA and dB sum 1100 products of O(1) terms (|dA|, |dB| up to ~100): float rounding of such a
    // sum is ~1e-5 relative; 2e-4 leaves margin without hiding a lost or doubled group (≥ 1e-1).
    tol: { atol: 2e-4, rtol: 2e-4 },
  },
];
for (const [kernel, have] of KERNEL_PATHS) {
  for (const { name, rows, specs, tol } of PATH_CASES) {
    t.test(
      `MLORA_GEMM_KERNEL=${kernel}, ${name}: forward and backward vs float64, 1 and 2 threads bitwise`,
      skipUnless(kernel, have),
      async (t) => {
        const inDim = 48,
          outDim = 32;
        const rng = new Rng(36, 'lora-path', kernel, rows);
        const ads = adapters(rng, specs, true, inDim, outDim);
        const ms = masks(ads, inDim);
        const p = inputs(rng, ads, rows, inDim, outDim);
        const { x, y0, dy, dx0 } = p;
        const ref = reference(ads, ms, x, y0, dy, dx0, inDim, outDim);
        const results: Float32Array[][] = [];
        await withKernel(kernel, async () => {
          for (const threads of [1, 2]) {
            const dev = cpuDevice(threads);
            const bound = bind(dev, ads, p.da0, p.db0, inDim, outDim);
            const xt = f32(dev, [rows, inDim], x),
              y = f32(dev, [rows, outDim], y0),
              dx = f32(dev, [rows, inDim], dx0);
            const segments = bound.map((b) => b.seg) as never;
            await dev.run([
              { op: 'lora_forward', y, x: xt, segments },
              { op: 'lora_backward', dx, dy: f32(dev, [rows, outDim], dy), x: xt, segments },
            ]);
            const at = `(${threads} thread(s))`;
            assertClose(t, read(y), ref.y, tol, `y ${at}`);
            assertClose(t, read(dx), ref.dx, tol, `dx ${at}`);
            bound.forEach((b, k) =>
              assertClose(t, read(b.xa), ref.xas[k]!, tol, `xa of adapter ${k} (rank ${ads[k]!.r}) ${at}`),
            );
            assertAdapterGrads(t, bound, ref, p, tol, at);
            results.push([read(y), read(dx), ...bound.flatMap((b) => [read(b.xa), read(b.da), read(b.db)])]);
          }
        });
        results[1]!.forEach((arr, i) =>
          assertBitwise(t, arr, results[0]![i]!, `output ${i}: 2 threads == 1 thread, bitwise`),
        );
      },
    );
  }
}

// linear_forward / linear_backward with `segments`: the base projection and its LoRA in one
// call (the CPU adds LoRA's expand to each finished tile of the base GEMM). Against the float64
// reference of base + LoRA, for every path, = and += (accumulate), dropout on; 1 and 2 threads
// bitwise equal.
for (const [kernel, have] of KERNEL_PATHS) {
  t.test(
    `fused projection (linear + LoRA), MLORA_GEMM_KERNEL=${kernel}: vs float64`,
    skipUnless(kernel, have),
    async (t) => {
      const inDim = 80,
        outDim = 48,
        rows = 150;
      const specs: Spec[] = [
        { rowStart: 3, rowEnd: 71, r: 16, scale: 2.0, dropout: 0.2, seed: 5, position: 30 },
        { rowStart: 71, rowEnd: 140, r: 7, scale: 0.5, dropout: 0, seed: 0, position: 0 },
      ];
      const rng = new Rng(37, 'lora-fused', kernel);
      const ads = adapters(rng, specs, true, inDim, outDim);
      const ms = masks(ads, inDim);
      const p = inputs(rng, ads, rows, inDim, outDim);
      const { x, y0, dy, dx0 } = p;
      const w = randn(rng, outDim * inDim, 0.2);
      for (const accumulate of [false, true]) {
        const zy = new Float32Array(rows * outDim),
          zx = new Float32Array(rows * inDim);
        const ref = reference(ads, ms, x, accumulate ? y0 : zy, dy, accumulate ? dx0 : zx, inDim, outDim);
        const y = Float64Array.from(ref.y),
          dx = Float64Array.from(ref.dx);
        for (let i = 0; i < rows; i++) {
          for (let o = 0; o < outDim; o++) {
            let acc = 0;
            for (let c = 0; c < inDim; c++) acc += x[i * inDim + c]! * w[o * inDim + c]!;
            y[i * outDim + o]! += acc;
          }
          for (let c = 0; c < inDim; c++) {
            let acc = 0;
            for (let o = 0; o < outDim; o++) acc += dy[i * outDim + o]! * w[o * inDim + c]!;
            dx[i * inDim + c]! += acc;
          }
        }
        // Base sums of 80 (forward) or 48 (backward) products plus the LoRA terms: ≲ 1e-5.
        const tol = { atol: 5e-5, rtol: 5e-5 };
        const results: Float32Array[][] = [];
        await withKernel(kernel, async () => {
          for (const threads of [1, 2]) {
            const dev = cpuDevice(threads);
            const bound = bind(dev, ads, p.da0, p.db0, inDim, outDim);
            const xt = f32(dev, [rows, inDim], x),
              wt = f32(dev, [outDim, inDim], w);
            const yt = f32(dev, [rows, outDim], accumulate ? y0 : randn(rng, rows * outDim, 3));
            const dxt = f32(dev, [rows, inDim], accumulate ? dx0 : randn(rng, rows * inDim, 3));
            const segments = bound.map((b) => b.seg) as never;
            await dev.run([
              { op: 'linear_forward', y: yt, x: xt, w: wt, accumulate, segments },
              { op: 'linear_backward', dx: dxt, dy: f32(dev, [rows, outDim], dy), w: wt, x: xt, accumulate, segments },
            ]);
            const at = `(${accumulate ? '+=' : '='}, ${threads} thread(s))`;
            assertClose(t, read(yt), y, tol, `y ${at}`);
            assertClose(t, read(dxt), dx, tol, `dx ${at}`);
            bound.forEach((b, k) => assertClose(t, read(b.xa), ref.xas[k]!, tol, `xa of adapter ${k} ${at}`));
            assertAdapterGrads(t, bound, ref, p, tol, at);
            results.push([read(yt), read(dxt), ...bound.flatMap((b) => [read(b.da), read(b.db)])]);
          }
          // The separate ops (linear, then lora) give the same bits: the fused expand does the
          // same arithmetic per element.
          const dev = cpuDevice(1);
          const bound = bind(dev, ads, p.da0, p.db0, inDim, outDim);
          const xt = f32(dev, [rows, inDim], x),
            wt = f32(dev, [outDim, inDim], w);
          const yt = f32(dev, [rows, outDim], y0),
            dxt = f32(dev, [rows, inDim], dx0),
            dyt = f32(dev, [rows, outDim], dy);
          const segments = bound.map((b) => b.seg) as never;
          await dev.run([
            { op: 'linear_forward', y: yt, x: xt, w: wt, accumulate },
            { op: 'lora_forward', y: yt, x: xt, segments },
            { op: 'linear_backward', dx: dxt, dy: dyt, w: wt, accumulate },
            { op: 'lora_backward', dx: dxt, dy: dyt, x: xt, segments },
          ]);
          assertBitwise(t, read(yt), results[0]![0]!, 'y: fused == linear_forward + lora_forward, bitwise');
          assertBitwise(t, read(dxt), results[0]![1]!, 'dx: fused == linear_backward + lora_backward, bitwise');
        });
        results[1]!.forEach((arr, i) =>
          assertBitwise(t, arr, results[0]![i]!, `output ${i}: 2 threads == 1 thread, bitwise`),
        );
      }
    },
  );
}

t.test('dropout mask: values, rate ≈ p, independence, reproducibility, position dependence', async (t) => {
  const rows = 256,
    inDim = 64;
  for (const p of [0.05, 0.3]) {
    const m = kernelMask(d, rows, inDim, p, 1234, 500);
    const keep = Math.fround(1 / (1 - p));
    t.ok(
      m.every((v) => v === 0 || v === keep),
      `p=${p}: every multiplier is 0 or 1/(1-p)`,
    );
    const rate = m.filter((v) => v === 0).length / m.length;
    // 16384 Bernoulli draws: σ = sqrt(p(1-p)/16384) ≤ 0.0036; allow ~5σ
    t.ok(Math.abs(rate - p) < 0.02, `p=${p}: observed drop rate ${rate.toFixed(4)} ≈ ${p}`);
    // columns 2k and 2k+1 come from two halves of one hash: their drops must be independent
    let both = 0;
    for (let i = 0; i < m.length; i += 2) if (m[i] === 0 && m[i + 1] === 0) both++;
    const pairRate = both / (m.length / 2);
    t.ok(
      Math.abs(pairRate - p * p) < 0.02,
      `p=${p}: P(both of a column pair dropped) ${pairRate.toFixed(4)} ≈ p² = ${(p * p).toFixed(4)}`,
    );
  }
  const m = kernelMask(d, rows, inDim, 0.3, 1234, 500);
  assertBitwise(t, kernelMask(d, rows, inDim, 0.3, 1234, 500), m, 'same seed and position: same mask');
  const fresh = cpuDevice(1);
  assertBitwise(
    t,
    kernelMask(fresh, rows, inDim, 0.3, 1234, 500),
    m,
    'same mask on a fresh single-thread device (replay)',
  );
  const agree = (a: Float32Array, b: Float32Array) => a.filter((v, i) => (v === 0) === (b[i] === 0)).length / a.length;
  // two independent masks agree on a fraction p² + (1-p)² = 0.58 of the elements
  const otherPos = kernelMask(d, rows, inDim, 0.3, 1234, 501);
  t.ok(agree(m, otherPos) < 0.7, `different position: a different mask (agreement ${agree(m, otherPos).toFixed(3)})`);
  const otherSeed = kernelMask(d, rows, inDim, 0.3, 1235, 500);
  t.ok(agree(m, otherSeed) < 0.7, `different seed: a different mask (agreement ${agree(m, otherSeed).toFixed(3)})`);
  // The mask of a row depends on position + row only, not on where the segment sits in the batch.
  assertBitwise(
    t,
    kernelMask(d, rows - 5, inDim, 0.3, 1234, 505, 7),
    m.subarray(5 * inDim),
    'mask follows position + row, not the batch row',
  );
});

t.test('the segmented call equals a loop of single-segment calls, bit for bit', async (t) => {
  // Bitwise, because the kernel runs the segments one after another with the same GEMM calls on
  // the same rows as a single-segment call would; nothing is shared or reordered across segments.
  const rng = new Rng(31, 'lora-loop');
  const ads = adapters(rng, SPECS, true);
  const { x, y0, dy, dx0, da0, db0 } = inputs(rng, ads);
  const xt = f32(d, [ROWS, IN], x),
    dyt = f32(d, [ROWS, OUT], dy);
  const one = bind(d, ads, da0, db0),
    many = bind(d, ads, da0, db0);
  const yOne = f32(d, [ROWS, OUT], y0),
    yMany = f32(d, [ROWS, OUT], y0);
  const dxOne = f32(d, [ROWS, IN], dx0),
    dxMany = f32(d, [ROWS, IN], dx0);
  await d.run([
    { op: 'lora_forward', y: yOne, x: xt, segments: one.map((b) => b.seg) as never },
    { op: 'lora_backward', dx: dxOne, dy: dyt, x: xt, segments: one.map((b) => b.seg) as never },
  ]);
  await d.run(many.map((b) => ({ op: 'lora_forward' as const, y: yMany, x: xt, segments: [b.seg] as never })));
  await d.run(
    many.map((b) => ({ op: 'lora_backward' as const, dx: dxMany, dy: dyt, x: xt, segments: [b.seg] as never })),
  );
  assertBitwise(t, read(yOne), read(yMany), 'y');
  assertBitwise(t, read(dxOne), read(dxMany), 'dx');
  one.forEach((b, k) => {
    assertBitwise(t, read(b.xa), read(many[k]!.xa), `xa ${k}`);
    assertBitwise(t, read(b.da), read(many[k]!.da), `dA ${k}`);
    assertBitwise(t, read(b.db), read(many[k]!.db), `dB ${k}`);
  });
  // and the order the segments are listed in does not matter either
  const rev = bind(d, ads, da0, db0).reverse();
  const yRev = f32(d, [ROWS, OUT], y0);
  await d.run([{ op: 'lora_forward', y: yRev, x: xt, segments: rev.map((b) => b.seg) as never }]);
  assertBitwise(t, read(yRev), read(yOne), 'y with segments listed in reverse');
});

t.test('backward accumulates: two calls add twice into dA, dB and dx', async (t) => {
  const rng = new Rng(32, 'lora-acc');
  const ads = adapters(rng, SPECS, true);
  const ms = masks(ads);
  const p = inputs(rng, ads);
  const { x, y0, dy, dx0 } = p;
  const ref = reference(ads, ms, x, y0, dy, dx0);
  const bound = bind(d, ads, p.da0, p.db0);
  const xt = f32(d, [ROWS, IN], x),
    dx = f32(d, [ROWS, IN], dx0),
    dyt = f32(d, [ROWS, OUT], dy);
  const segs = bound.map((b) => b.seg) as never;
  await d.run([
    { op: 'lora_forward', y: f32(d, [ROWS, OUT], y0), x: xt, segments: segs },
    { op: 'lora_backward', dx, dy: dyt, x: xt, segments: segs },
    { op: 'lora_backward', dx, dy: dyt, x: xt, segments: segs },
  ]);
  assertClose(
    t,
    read(dx),
    ref.dx.map((v, i) => v + (v - dx0[i]!)),
    TOL,
    'dx = dx0 + 2·Δ',
  );
  assertAdapterGrads(t, bound, ref, p, TOL, '= start + 2·Δ', 2);
  // da/db are optional: without them backward only adds into dx
  const dxOnly = f32(d, [ROWS, IN], dx0);
  const noGrads = bound.map((b) => ({ ...b.seg, da: undefined, db: undefined }));
  await d.run([{ op: 'lora_backward', dx: dxOnly, dy: dyt, x: xt, segments: noGrads as never }]);
  assertClose(t, read(dxOnly), ref.dx, TOL, 'dx without dA/dB');
});

t.test('gradients equal finite differences of the kernel forward (dropout on)', async (t) => {
  const rng = new Rng(33, 'lora-fd');
  const rows = 6,
    inDim = 5,
    outDim = 4,
    r = 3;
  const spec: Spec = { rowStart: 1, rowEnd: 5, r, scale: 1.5, dropout: 0.3, seed: 99, position: 12 };
  const [ad] = adapters(rng, [spec], true, inDim, outDim);
  const x = randn(rng, rows * inDim),
    y0 = randn(rng, rows * outDim),
    c = randn(rng, rows * outDim);
  const xa = d.alloc('f32', [4, r]),
    y = d.alloc('f32', [rows, outDim]);
  const loss = (xx: Float32Array, a: Float32Array, b: Float32Array) => {
    y.write(y0);
    d.runSync([
      {
        op: 'lora_forward',
        y,
        x: f32(d, [rows, inDim], xx),
        segments: [{ ...spec, a: f32(d, [r, inDim], a), b: f32(d, [outDim, r], b), xa }],
      },
    ]);
    return dot(c, read(y));
  };
  // L = Σ c·y is linear in each single entry of x, A or B, so central differences are exact up to
  // the float rounding of y (~1e-7·|y|, summed over 24 entries), divided by 2·step = 0.2.
  const step = 0.1;
  const fd = (which: 0 | 1 | 2) => {
    const base = [x, ad!.a, ad!.b] as const;
    return Float64Array.from(base[which], (v, i) => {
      const args = base.map((arr) => Float32Array.from(arr)) as [Float32Array, Float32Array, Float32Array];
      args[which][i] = v + step;
      const up = loss(...args);
      args[which][i] = v - step;
      return (up - loss(...args)) / (2 * step);
    });
  };
  loss(x, ad!.a, ad!.b); // leaves xa of the unperturbed forward for backward
  const dx = d.alloc('f32', [rows, inDim], { zero: true });
  const da = d.alloc('f32', [r, inDim], { zero: true }),
    db = d.alloc('f32', [outDim, r], { zero: true });
  d.runSync([
    {
      op: 'lora_backward',
      dx,
      dy: f32(d, [rows, outDim], c),
      x: f32(d, [rows, inDim], x),
      segments: [{ ...spec, a: f32(d, [r, inDim], ad!.a), b: f32(d, [outDim, r], ad!.b), xa, da, db }],
    },
  ]);
  const FD = { atol: 2e-4, rtol: 1e-4 };
  assertClose(t, read(dx), fd(0), FD, 'dx vs finite differences');
  assertClose(t, read(da), fd(1), FD, 'dA vs finite differences');
  assertClose(t, read(db), fd(2), FD, 'dB vs finite differences');
  t.ok(
    read(dx)
      .subarray(0, inDim)
      .every((v) => v === 0),
    'row 0 (outside the segment) gets no gradient',
  );
});

t.test('extreme range: large and tiny activations, no overflow where the result fits', async (t) => {
  const rng = new Rng(34, 'lora-extreme');
  const ads = adapters(rng, SPECS, true);
  const ms = masks(ads);
  // rows alternate between 1e15 and 1e-15 magnitudes: LoRA is linear, so the relative error stays float-sized
  const x = randn(rng, ROWS * IN).map((v, i) => v * (Math.floor(i / IN) % 2 ? 1e15 : 1e-15));
  const y0 = randn(rng, ROWS * OUT).map((v, i) => v * (Math.floor(i / OUT) % 2 ? 1e15 : 1e-15));
  const dy = randn(rng, ROWS * OUT, 1e10),
    dx0 = randn(rng, ROWS * IN, 1e10);
  const ref = reference(ads, ms, x, y0, dy, dx0);
  // fresh accumulators (dA, dB start at 0 here: any O(1) start would vanish next to ~1e25 gradients)
  const bound = bind(
    d,
    ads,
    ads.map((s) => new Float32Array(s.r * IN)),
    ads.map((s) => new Float32Array(OUT * s.r)),
  );
  const xt = f32(d, [ROWS, IN], x),
    y = f32(d, [ROWS, OUT], y0),
    dx = f32(d, [ROWS, IN], dx0);
  const segs = bound.map((b) => b.seg) as never;
  await d.run([
    { op: 'lora_forward', y, x: xt, segments: segs },
    { op: 'lora_backward', dx, dy: f32(d, [ROWS, OUT], dy), x: xt, segments: segs },
  ]);
  // per row, relative to that row's magnitude (mixed rows make a single atol meaningless)
  const rowwise = (got: Float32Array, want: Float64Array, width: number, label: string) => {
    let worst = 0;
    for (let r = 0; r < ROWS; r++) {
      const w = want.subarray(r * width, r * width + width),
        g = got.subarray(r * width, r * width + width);
      const scale = Math.max(...Array.from(w, Math.abs));
      for (let j = 0; j < width; j++) worst = Math.max(worst, Math.abs(g[j]! - w[j]!) / scale);
    }
    t.ok(worst < 1e-5, `${label}: worst error relative to its row's magnitude ${worst.toExponential(2)} < 1e-5`);
  };
  rowwise(read(y), ref.y, OUT, 'y');
  rowwise(read(dx), ref.dx, IN, 'dx');
  bound.forEach((b, k) => {
    for (const [name, want, got] of [
      ['dA', ref.das[k]!, read(b.da)],
      ['dB', ref.dbs[k]!, read(b.db)],
    ] as const) {
      const scale = Math.max(...Array.from(want, Math.abs));
      t.ok(
        got.every((v, i) => Math.abs(v - want[i]!) <= 1e-5 * scale),
        `${name} ${k} (dominated by the 1e15 rows) within 1e-5 of its max`,
      );
      t.ok(got.every(Number.isFinite), `${name} ${k} finite (|values| up to ~1e25)`);
    }
  });
});

t.test('bad arguments are Errors naming the argument', async (t) => {
  const rng = new Rng(35, 'lora-bad');
  const x = f32(d, [ROWS, IN], randn(rng, ROWS * IN)),
    y = f32(d, [ROWS, OUT], randn(rng, ROWS * OUT));
  const a4 = f32(d, [4, IN], randn(rng, 4 * IN)),
    b4 = f32(d, [OUT, 4], randn(rng, OUT * 4));
  const seg = (o: Record<string, unknown> = {}) => ({
    rowStart: 0,
    rowEnd: 8,
    a: a4,
    b: b4,
    scale: 1,
    xa: d.alloc('f32', [8, 4]),
    ...o,
  });
  const fwd = (segments: unknown[]) => [{ op: 'lora_forward', y, x, segments }];
  const bwd = (segments: unknown[]) => [{ op: 'lora_backward', dx: d.alloc('f32', [ROWS, IN]), dy: y, x, segments }];
  const wl = f32(d, [OUT, IN], randn(rng, OUT * IN));
  const cases: Array<[unknown[], RegExp]> = [
    [
      fwd([seg(), seg({ rowStart: 5, rowEnd: 13, xa: d.alloc('f32', [8, 4]) })]),
      /segments\[0\] rows \[0, 8\) and segments\[1\] rows \[5, 13\) overlap/,
    ],
    [
      fwd([seg({ rowStart: 30, rowEnd: 41, xa: d.alloc('f32', [11, 4]) })]),
      /segments\[0\]: rows \[rowStart, rowEnd\) = \[30, 41\) must be a non-empty range inside \[0, 40\)/,
    ],
    [fwd([seg({ rowStart: 3, rowEnd: 3 })]), /= \[3, 3\) must be a non-empty range/],
    [fwd([seg({ rowStart: -1 })]), /= \[-1, 8\)/],
    [
      fwd([seg({ b: f32(d, [OUT, 2], randn(rng, OUT * 2)) })]),
      /segments\[0\]: argument 'b' has shape \[20,2\], expected \[20,4\] \(out from y, rank 4 from a\)/,
    ],
    [fwd([seg({ xa: d.alloc('f32', [8, 2]) })]), /argument 'xa' has shape \[8,2\], expected \[8,4\]/],
    [fwd([seg({ xa: d.alloc('f32', [7, 4]) })]), /argument 'xa' has shape \[7,4\], expected \[8,4\]/],
    [
      fwd([seg({ a: f32(d, [4, IN + 1], randn(rng, 4 * (IN + 1))) })]),
      /argument 'a' has shape \[4,25\], expected \[r,24\]/,
    ],
    [fwd([seg({ dropout: 1 })]), /argument 'dropout' must be in \[0, 1\)/],
    [fwd([seg({ dropout: -0.1 })]), /argument 'dropout' must be in \[0, 1\)/],
    [fwd([seg({ seed: -5 })]), /argument 'seed' must be a non-negative integer/],
    [fwd([seg({ seed: 1.5 })]), /argument 'seed' must be an integer/],
    [fwd([seg({ position: -2 })]), /argument 'position' must be >= 0/],
    [fwd([seg({ scale: undefined })]), /argument 'scale' must be a number/],
    [fwd([seg({ a: undefined })]), /argument 'a' is missing/],
    [fwd([seg({ xa: x.reshape([(ROWS * IN) / 4, 4]).rows(0, 8) })]), /'xa' and 'x' overlap/],
    [fwd([seg({ a: d.alloc('bf16', [4, IN]) })]), /argument 'a' has dtype bf16, expected f32/],
    [fwd(['nope']), /'segments\[0\]' must be an object/],
    [[{ op: 'lora_forward', y, x }], /argument 'segments' must be an array/],
    [
      [{ op: 'lora_forward', y: f32(d, [ROWS - 1, OUT], randn(rng, (ROWS - 1) * OUT)), x, segments: [] }],
      /argument 'y' has shape \[39,20\], expected \[40,20\]/,
    ],
    [bwd([seg({ da: d.alloc('f32', [2, IN]) })]), /argument 'da' has shape \[2,24\], expected \[4,24\] \(like a\)/],
    [bwd([seg({ db: d.alloc('f32', [OUT, 8]) })]), /argument 'db' has shape \[20,8\], expected \[20,4\] \(like b\)/],
    [bwd([seg({ da: a4 })]), /'da' and 'a' overlap/],
    [[{ op: 'lora_backward', dx: x, dy: y, x, segments: [seg()] }], /'dx' and 'x' overlap/],
    [
      [{ op: 'lora_backward', dx: d.alloc('f32', [ROWS, IN + 1]), dy: y, x, segments: [seg()] }],
      /argument 'dx' has shape \[40,25\], expected \[40,24\]/,
    ],
    // the linear ops with the projection's LoRA check the segments the same way, and need x backward
    [
      [{ op: 'linear_forward', y, x, w: wl, segments: [seg({ b: f32(d, [OUT, 2], randn(rng, OUT * 2)) })] }],
      /segments\[0\]: argument 'b' has shape \[20,2\]/,
    ],
    [
      [{ op: 'linear_forward', y, x, w: wl, segments: [seg({ xa: y.reshape([(ROWS * OUT) / 4, 4]).rows(0, 8) })] }],
      /'xa' and 'y' overlap/,
    ],
    [
      [{ op: 'linear_backward', dx: d.alloc('f32', [ROWS, IN]), dy: y, w: wl, segments: [seg()] }],
      /argument 'x' is missing/,
    ],
    [
      [{ op: 'linear_backward', dx: d.alloc('f32', [ROWS, IN]), dy: y, w: wl, x: y, segments: [seg()] }],
      /argument 'x' has shape \[40,20\], expected \[40,24\] \(like dx\)/,
    ],
  ];
  for (const [ops, re] of cases) await expectRefused(t, d, ops, re);
});
