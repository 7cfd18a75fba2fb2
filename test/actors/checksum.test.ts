// The activation slots' checksum (actors/shm.ts Slab.seal / verify, native/src/cpu/checksum.h):
// the native 32-lane FNV-1a against a plain JavaScript statement of it, on every instruction set
// the CPU has, for word counts around the lane count and seeds at the int32 extremes; a slot that
// changes by one bit, or that holds another micro-batch's sequence, fails verification; bad
// arguments are clear Errors.
import t from 'tap';
import { native } from '../../lib/native.js';
import { Rng } from '../../lib/rng.js';
import { Slab, SlotCorruption, SlotKind } from '../../actors/shm.js';
import { CPU_KERNELS, withKernel } from '../kernels/util.js';

/** The definition, one word at a time. */
function reference(w: Int32Array, seed: number): number {
  const P = 0x01000193;
  const lanes = Array.from({ length: 32 }, (_, j) => seed ^ j);
  const whole = w.length - (w.length % 32);
  for (let i = 0; i < whole; i++) lanes[i % 32] = Math.imul(lanes[i % 32]! ^ w[i]!, P);
  let h = seed;
  for (const x of lanes) h = Math.imul(h ^ x, P);
  for (let i = whole; i < w.length; i++) h = Math.imul(h ^ w[i]!, P);
  return h | 0;
}

const rng = new Rng(41, 'checksum');
const words = (n: number) => Int32Array.from({ length: n }, () => rng.int(2 ** 31) * (rng.int(2) ? 1 : -1));

for (const kernel of CPU_KERNELS)
  t.test(`native checksum = the reference (MLORA_GEMM_KERNEL=${kernel})`, (t) =>
    withKernel(kernel, async () => {
      for (const n of [0, 1, 7, 31, 32, 33, 63, 64, 65, 1000, 131072 + 5])
        for (const seed of [0, 1, -1, 0x7fffffff, -0x80000000, 0x811c9dc5 | 0]) {
          const w = words(n);
          t.equal(native().checksum(w, seed), reference(w, seed), `${n} words, seed ${seed}`);
        }
      // a view at an offset into a shared buffer, as the slots are
      const sab = new SharedArrayBuffer(4 * 1000);
      const all = new Int32Array(sab);
      all.set(words(1000));
      const view = new Int32Array(sab, 4 * 13, 500);
      t.equal(native().checksum(view, 5), reference(Int32Array.from(view), 5), 'a view into a SharedArrayBuffer');
    }),
  );

t.test('a sealed slot verifies; one flipped bit, another micro-batch or another sequence does not', async (t) => {
  const slotBytes = 64 + 4 * 4112; // a multiple of 64
  const slab = new Slab(new SharedArrayBuffer(3 * slotBytes), 3, slotBytes);
  const data = new Int32Array(slab.sab, slab.dataOffset(1), 4099);
  data.set(words(4099));
  const bytes = 4 * 4099;
  slab.seal(1, 7, SlotKind.HIDDEN, bytes, 3);
  t.doesNotThrow(() => slab.verify(1, 7, SlotKind.HIDDEN), 'as sealed');
  t.throws(() => slab.verify(1, 8, SlotKind.HIDDEN), SlotCorruption, 'another micro-batch');
  t.not(slab.checksum(1, bytes, 7, 4), slab.checksum(1, bytes, 7, 3), 'the sequence number is in the seed');
  for (let k = 0; k < 20; k++) {
    const i = rng.int(4099),
      bit = rng.int(32);
    data[i]! ^= 1 << bit;
    t.throws(() => slab.verify(1, 7, SlotKind.HIDDEN), SlotCorruption, `word ${i} bit ${bit} flipped`);
    data[i]! ^= 1 << bit;
  }
  t.doesNotThrow(() => slab.verify(1, 7, SlotKind.HIDDEN), 'restored');
});

t.test('bad arguments are clear Errors', async (t) => {
  const ck = native().checksum as (w: unknown, s: unknown) => number;
  t.throws(() => ck(new Float32Array(4), 0), /words must be an Int32Array/);
  t.throws(() => ck([1, 2], 0), /words must be an Int32Array/);
  t.throws(() => ck(undefined, 0), /words must be an Int32Array/);
  t.throws(() => ck(new Int32Array(4), 1.5), /seed must be an integer/);
  t.throws(() => ck(new Int32Array(4), 2 ** 31), /seed must be an int32/);
  t.throws(() => ck(new Int32Array(4), -(2 ** 31) - 1), /seed must be an integer >= -2147483648/);
  t.throws(() => ck(new Int32Array(4), 'x'), /seed must be a number/);
});
