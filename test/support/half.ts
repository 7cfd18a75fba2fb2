// f16 and bf16 bit patterns made in JavaScript, for tests that feed half-precision weights to
// the native core. Encoding rounds to nearest-even; decoding is exact, so a float64 reference
// computed from decode(encode(x)) sees exactly the values the kernel sees.
const f32 = new Float32Array(1);
const u32 = new Uint32Array(f32.buffer);

export function f32ToBf16(x: number): number {
  f32[0] = x;
  const u = u32[0]!;
  if ((u & 0x7fffffff) > 0x7f800000) return ((u >>> 16) | 0x40) & 0xffff; // NaN stays quiet
  return ((u + 0x7fff + ((u >>> 16) & 1)) >>> 16) & 0xffff;
}

export function bf16ToF32(h: number): number {
  u32[0] = (h & 0xffff) << 16;
  return f32[0]!;
}

export function f32ToF16(x: number): number {
  f32[0] = x;
  const v = f32[0]!; // the f32 value (the core converts from f32 as well)
  const sign = v < 0 || Object.is(v, -0) ? 0x8000 : 0;
  const a = Math.abs(v);
  if (Number.isNaN(a)) return 0x7e00;
  if (a >= 65520) return sign | 0x7c00; // rounds to infinity
  if (a < 2 ** -14) {
    // subnormal: units of 2^-24, round half to even
    const q = a / 2 ** -24;
    let r = Math.floor(q);
    const frac = q - r;
    if (frac > 0.5 || (frac === 0.5 && r % 2 === 1)) r++;
    return sign | r; // r may reach 0x400, which is exactly the smallest normal
  }
  let e = Math.floor(Math.log2(a));
  if (2 ** e > a) e--;
  if (2 ** (e + 1) <= a) e++;
  const q = (a / 2 ** e - 1) * 1024;
  let mant = Math.floor(q);
  const frac = q - mant;
  if (frac > 0.5 || (frac === 0.5 && mant % 2 === 1)) mant++;
  if (mant === 1024) {
    mant = 0;
    e++;
  }
  return sign | ((e + 15) << 10) | mant;
}

export function f16ToF32(h: number): number {
  const sign = h & 0x8000 ? -1 : 1;
  const e = (h >>> 10) & 0x1f;
  const m = h & 0x3ff;
  if (e === 0) return sign * m * 2 ** -24;
  if (e === 31) return m ? NaN : sign * Infinity;
  return sign * (1 + m / 1024) * 2 ** (e - 15);
}

/** Encodes values as `dtype` bits; returns the bits and the exact values they hold. */
export function toHalf(x: ArrayLike<number>, dtype: 'f16' | 'bf16'): { bits: Uint16Array; values: Float64Array } {
  const bits = new Uint16Array(x.length);
  const values = new Float64Array(x.length);
  for (let i = 0; i < x.length; i++) {
    bits[i] = dtype === 'bf16' ? f32ToBf16(x[i]!) : f32ToF16(x[i]!);
    values[i] = dtype === 'bf16' ? bf16ToF32(bits[i]!) : f16ToF32(bits[i]!);
  }
  return { bits, values };
}
