// The LoRA kernels read nothing outside their operands. Every operand of the call sits at the very
// end of a WebAssembly memory of its own (wrapped zero-copy): the address space after a wasm
// memory's last byte is reserved but inaccessible, so a read one byte past an operand is a
// segfault of this file's process, every time, where past a device buffer it hits whatever lies
// there and faults only when that is unmapped. The results must equal, bit for bit, the same
// calls on device tensors.
// Regression: GCC 12 vectorised the portable tile code's loop so that dB's product (xaᵀ·dy) also
// loaded dy's row after the segment's last one, and dA's and dB's with rank 2 the row after A's
// last: a crash of the fused backward where dy ended just before an unmapped page.
import t from 'tap';
import { Rng } from '../../lib/rng.js';
import type { Device, Tensor } from '../../lib/tensor.js';
import { cpuDevice, randn } from '../support/helpers.js';
import { assertBitwise, f32, KERNEL_PATHS, read, skipUnless, withKernel } from './util.js';

const WASM_PAGE = 65536;

/** A Float32Array of n elements that ends where its WebAssembly memory ends. */
function atMemoryEnd(n: number): Float32Array {
  const pages = Math.max(1, Math.ceil((n * 4) / WASM_PAGE));
  const mem = new WebAssembly.Memory({ initial: pages, maximum: pages });
  return new Float32Array(mem.buffer, pages * WASM_PAGE - n * 4, n);
}

interface Seg {
  rowStart: number;
  rowEnd: number;
  r: number;
}

interface Case {
  name: string;
  kernel: string;
  have: boolean;
  inDim: number;
  outDim: number;
  rows: number;
  segs: Seg[];
}

// in and out not multiples of 8 run the portable tile code on every CPU; out ≡ 2 (mod 4) leaves a
// last column block of 2 (the faulting micro-tile: rank 4 × 2 columns), rank 2 a tile of 2 rows.
// Each order puts the other rank on the segment that ends with the call's last row.
const CASES: Case[] = [
  ...[
    [2, 4],
    [4, 2],
  ].map(([r0, r1]) => ({
    name: `portable widths, ranks ${r0} and ${r1}`,
    kernel: 'auto',
    have: true,
    inDim: 66,
    outDim: 34,
    rows: 29,
    segs: [
      { rowStart: 0, rowEnd: 9, r: r0! },
      { rowStart: 9, rowEnd: 29, r: r1! },
    ],
  })),
  ...KERNEL_PATHS.map(([kernel, have]) => ({
    name: `MLORA_GEMM_KERNEL=${kernel}, ranks 16 and 3`,
    kernel,
    have,
    inDim: 48,
    outDim: 32,
    rows: 29,
    segs: [
      { rowStart: 0, rowEnd: 9, r: 16 },
      { rowStart: 9, rowEnd: 29, r: 3 },
    ],
  })),
];

/** Every operand's shape: x, w, dy, y, dx, then per segment a, b, xa, da, db. */
function shapes(c: Case): number[][] {
  const { inDim, outDim, rows } = c;
  const perSeg = c.segs.flatMap((s) => [
    [s.r, inDim],
    [outDim, s.r],
    [s.rowEnd - s.rowStart, s.r],
    [s.r, inDim],
    [outDim, s.r],
  ]);
  return [[rows, inDim], [outDim, inDim], [rows, outDim], [rows, outDim], [rows, inDim], ...perSeg];
}

/** linear_forward + linear_backward with segments (fused), or lora_forward + lora_backward; +=
 *  everywhere, so every operand is read. Returns every output. */
async function runOps(dev: Device, c: Case, ts: Tensor[], fused: boolean, dropout: number): Promise<Float32Array[]> {
  const [x, w, dy, y, dx, ...rest] = ts as [Tensor, Tensor, Tensor, Tensor, Tensor, ...Tensor[]];
  const segments = c.segs.map((s, k) => {
    const [a, b, xa, da, db] = rest.slice(5 * k, 5 * k + 5);
    return { rowStart: s.rowStart, rowEnd: s.rowEnd, a, b, xa, da, db, scale: 0.75, dropout, seed: 7 + k, position: 3 };
  }) as never;
  await dev.run(
    fused
      ? [
          { op: 'linear_forward', y, x, w, accumulate: true, segments },
          { op: 'linear_backward', dx, dy, w, x, accumulate: true, segments },
        ]
      : [
          { op: 'lora_forward', y, x, segments },
          { op: 'lora_backward', dx, dy, x, segments },
        ],
  );
  return [y, dx, ...rest].map(read);
}

const size = (shape: number[]) => shape.reduce((p, q) => p * q, 1);

for (const c of CASES) {
  t.test(`${c.name}: no read past an operand, results as on device memory`, skipUnless(c.kernel, c.have), async (t) => {
    const shs = shapes(c);
    const guarded = shs.map((s) => atMemoryEnd(size(s)));
    const body = async () => {
      for (const dropout of [0, 0.25])
        for (const fused of [true, false]) {
          const at = `${fused ? 'fused' : 'separate'}, dropout ${dropout}`;
          const rng = new Rng(41, 'lora-bounds', c.name, at);
          const data = shs.map((s) => randn(rng, size(s), 0.5));
          guarded.forEach((g, i) => g.set(data[i]!));
          const dev = cpuDevice(2);
          const want = await runOps(
            dev,
            c,
            data.map((v, i) => f32(dev, shs[i]!, v)),
            fused,
            dropout,
          );
          const got = await runOps(
            dev,
            c,
            guarded.map((g, i) => dev.wrap(g, 'f32', shs[i]!)),
            fused,
            dropout,
          );
          got.forEach((g, i) => assertBitwise(t, g, want[i]!, `${at}: output ${i} at a memory's end == on device`));
        }
    };
    await (c.kernel === 'auto' ? body() : withKernel(c.kernel, body));
  });
}
