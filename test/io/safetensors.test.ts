// Our safetensors reader and writer: malformed files are Errors naming the file, the tensor
// and the problem (never a crash), every dtype round-trips, writes are atomic, and the
// reference fixtures (written by the Python safetensors library) read back right.
import t, { type Test } from 'tap';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { openSafetensors, writeSafetensors, type StArray, type StDType } from '../../lib/io/safetensors.js';
import {
  bf16BitsToF32,
  bf16ToF32,
  f16BitsToF32,
  f16ToF32,
  f32ToBf16,
  f32ToBf16Bits,
  f32ToF16,
  f32ToF16Bits,
} from '../../lib/io/dtype.js';
import { cpuDevice } from '../support/helpers.js';

const FIX = path.resolve('test/fixtures/llama-tiny');

function tmpdir(t: Test): string {
  const d = fs.mkdtempSync(path.join(os.tmpdir(), 'mlora-st-'));
  t.teardown(() => fs.rmSync(d, { recursive: true, force: true }));
  return d;
}

/** A file: 8-byte length (or `len`), the header text, then `data` bytes. */
function raw(dir: string, name: string, header: unknown, dataBytes: number, len?: bigint): string {
  const h = Buffer.isBuffer(header)
    ? header
    : Buffer.from(typeof header === 'string' ? header : JSON.stringify(header), 'utf8');
  const l = Buffer.alloc(8);
  l.writeBigUInt64LE(len ?? BigInt(h.length));
  const p = path.join(dir, name);
  fs.writeFileSync(p, Buffer.concat([l, h, Buffer.alloc(dataBytes, 7)]));
  return p;
}

t.test('malformed files are Errors naming the file, the tensor and the problem', async (t) => {
  const d = tmpdir(t);
  const ok = { w: { dtype: 'F32', shape: [2, 2], data_offsets: [0, 16] } };
  const cases: Array<[string, () => string, RegExp]> = [
    [
      'empty file',
      () => (fs.writeFileSync(path.join(d, 'empty.st'), ''), path.join(d, 'empty.st')),
      /empty\.st: file is 0 bytes, too short/,
    ],
    [
      'header length past EOF',
      () => raw(d, 'a.st', ok, 16, 4096n),
      /a\.st: header length 4096 runs past the end of the file/,
    ],
    ['absurd header length', () => raw(d, 'b.st', ok, 16, 2n ** 63n), /b\.st: header length \d+ is over the limit/],
    [
      'truncated data',
      () => raw(d, 'c.st', ok, 10),
      /c\.st: tensor 'w': data_offsets \[0, 16\] run past the end of the data section \(10 bytes\)/,
    ],
    ['bad JSON', () => raw(d, 'd.st', '{"w": {', 0), /d\.st: header is not valid JSON/],
    ['header not an object', () => raw(d, 'e.st', [1, 2], 0), /e\.st: header is not a JSON object \(got an array\)/],
    ['header null', () => raw(d, 'e2.st', 'null', 0), /e2\.st: header is not a JSON object \(got null\)/],
    ['not UTF-8', () => raw(d, 'e3.st', Buffer.from([0x7b, 0xff, 0x7d]), 0), /e3\.st: header is not valid UTF-8/],
    [
      'offsets past the end',
      () => raw(d, 'f.st', { w: { dtype: 'F32', shape: [4], data_offsets: [16, 32] } }, 16),
      /f\.st: tensor 'w': data_offsets \[16, 32\] run past the end/,
    ],
    [
      'end before begin',
      () => raw(d, 'g.st', { w: { dtype: 'F32', shape: [0], data_offsets: [8, 4] } }, 16),
      /g\.st: tensor 'w': data_offsets \[8, 4\] end before they begin/,
    ],
    [
      'overlapping tensors',
      () =>
        raw(
          d,
          'h.st',
          {
            a: { dtype: 'F32', shape: [4], data_offsets: [0, 16] },
            b: { dtype: 'F32', shape: [2], data_offsets: [8, 16] },
          },
          16,
        ),
      /h\.st: tensor 'b' \(bytes \[8, 16\)\) overlaps tensor 'a'/,
    ],
    [
      'shape/byte-length mismatch',
      () =>
        raw(
          d,
          'i.st',
          { 'model.layers.0.self_attn.q_proj.weight': { dtype: 'F32', shape: [8, 8], data_offsets: [0, 100] } },
          100,
        ),
      /i\.st: tensor 'model\.layers\.0\.self_attn\.q_proj\.weight': data_offsets \[0, 100\] hold 100 bytes but F32 \[8, 8\] needs 256/,
    ],
    [
      'unknown dtype',
      () => raw(d, 'j.st', { w: { dtype: 'F128', shape: [1], data_offsets: [0, 16] } }, 16),
      /j\.st: tensor 'w': unknown dtype "F128"/,
    ],
    [
      'negative shape',
      () => raw(d, 'k.st', { w: { dtype: 'F32', shape: [-1, 4], data_offsets: [0, 16] } }, 16),
      /k\.st: tensor 'w': shape must be a list of non-negative integers, got \[-1,4\]/,
    ],
    [
      'fractional shape',
      () => raw(d, 'l.st', { w: { dtype: 'F32', shape: [1.5], data_offsets: [0, 6] } }, 16),
      /l\.st: tensor 'w': shape must be a list of non-negative integers/,
    ],
    [
      'shape not a list',
      () => raw(d, 'm.st', { w: { dtype: 'F32', shape: '4', data_offsets: [0, 16] } }, 16),
      /m\.st: tensor 'w': shape must be a list/,
    ],
    [
      'bad data_offsets',
      () => raw(d, 'n.st', { w: { dtype: 'F32', shape: [4], data_offsets: [0] } }, 16),
      /n\.st: tensor 'w': data_offsets must be \[begin, end\]/,
    ],
    ['entry not an object', () => raw(d, 'o.st', { w: 3 }, 16), /o\.st: tensor 'w': entry must be an object/],
    [
      'metadata not strings',
      () => raw(d, 'p.st', { __metadata__: { a: 1 } }, 0),
      /p\.st: __metadata__ 'a' must be a string/,
    ],
    ['missing file', () => path.join(d, 'nope.st'), /nope\.st: cannot open/],
  ];
  for (const [label, make, re] of cases) {
    const p = make();
    t.throws(() => openSafetensors(p), re, label);
  }
  // A file truncated after it was opened: the read is a clear Error too.
  const p = raw(d, 'q.st', ok, 16);
  const st = openSafetensors(p);
  fs.truncateSync(p, fs.statSync(p).size - 4);
  t.throws(() => st.read('w'), /q\.st: tensor 'w': short read/, 'truncated after open');
  t.throws(() => st.read('zzz'), /q\.st: no tensor 'zzz'/);
});

t.test('gaps and trailing bytes are accepted with a warning', async (t) => {
  const d = tmpdir(t);
  const p = raw(
    d,
    'gap.st',
    { a: { dtype: 'F32', shape: [1], data_offsets: [0, 4] }, b: { dtype: 'F32', shape: [1], data_offsets: [8, 12] } },
    16,
  );
  const st = openSafetensors(p);
  t.equal(st.warnings.length, 2);
  t.match(st.warnings[0]!, /4 unused bytes before tensor 'b'/);
  t.match(st.warnings[1]!, /4 unused bytes after the last tensor/);
});

const SAMPLES: Record<StDType, () => StArray> = {
  F64: () => Float64Array.from([1.5, -2.25, 1e300, -0]),
  F32: () => Float32Array.from([0.1, -3, 1e-30, 65504.5]),
  F16: () => f32ToF16([1, -2, 0.5, 65504]),
  BF16: () => f32ToBf16([1, -2, 0.1, 3e38]),
  I64: () => BigInt64Array.from([0n, -1n, 2n ** 62n, -(2n ** 63n)]),
  I32: () => Int32Array.from([0, -1, 2 ** 31 - 1, -(2 ** 31)]),
  I16: () => Int16Array.from([0, -1, 32767, -32768]),
  I8: () => Int8Array.from([0, -1, 127, -128]),
  U64: () => BigUint64Array.from([0n, 1n, 2n ** 64n - 1n, 5n]),
  U32: () => Uint32Array.from([0, 1, 2 ** 32 - 1, 5]),
  U16: () => Uint16Array.from([0, 1, 65535, 5]),
  U8: () => Uint8Array.from([0, 1, 255, 5]),
  BOOL: () => Uint8Array.from([0, 1, 1, 0]),
};

t.test('every dtype round-trips; layout and header are as HF writes them', async (t) => {
  const d = tmpdir(t);
  const p = path.join(d, 'all.safetensors');
  const src = Object.fromEntries(
    Object.entries(SAMPLES).map(([k, f]) => [`t_${k}`, { dtype: k as StDType, shape: [2, 2], data: f() }]),
  );
  src.scalar = { dtype: 'F32', shape: [], data: Float32Array.from([42]) };
  src.empty = { dtype: 'F32', shape: [0, 3], data: new Float32Array(0) };
  writeSafetensors(p, src, { format: 'pt' });
  const st = openSafetensors(p);
  t.same(st.metadata, { format: 'pt' });
  t.equal(st.headerSize % 8, 0, 'header padded to 8 bytes');
  t.same(st.warnings, [], 'contiguous');
  for (const [name, s] of Object.entries(src)) {
    const got = st.read(name);
    t.equal(got.constructor.name, (s.data as StArray).constructor.name, `${name}: array type`);
    t.same(Array.from(got as ArrayLike<unknown>), Array.from(s.data as ArrayLike<unknown>), `${name}: values`);
    t.same(st.info(name).shape, s.shape);
    const info = st.info(name);
    t.equal((st.dataStart + info.begin) % (s.data as StArray).BYTES_PER_ELEMENT, 0, `${name}: aligned`);
  }
  // Rust safetensors order: larger dtypes first, then by name.
  const order = [...st.tensors.entries()].sort((a, b) => a[1].begin - b[1].begin).map(([n]) => n);
  t.same(order.slice(0, 3), ['t_F64', 't_I64', 't_U64']);
  // readF32 converts the float dtypes
  t.same(Array.from(st.readF32('t_F16')), [1, -2, 0.5, 65504]);
  t.same(Array.from(st.readF32('t_BF16')), Array.from(bf16ToF32(f32ToBf16([1, -2, 0.1, 3e38]))));
  t.same(Array.from(st.readF32('t_F64')), Array.from(Float32Array.from([1.5, -2.25, Infinity, -0])));
  t.throws(() => st.readF32('t_I32'), /all\.safetensors: tensor 't_I32' is I32, not a floating-point dtype/);
});

t.test('writes are atomic: no temp files left, bad data leaves the old file alone', async (t) => {
  const d = tmpdir(t);
  const p = path.join(d, 'x.safetensors');
  writeSafetensors(p, { a: { dtype: 'F32', shape: [2], data: Float32Array.from([1, 2]) } });
  t.same(fs.readdirSync(d), ['x.safetensors']);
  t.throws(
    () => writeSafetensors(p, { a: { dtype: 'F32', shape: [3], data: Float32Array.from([1, 2]) } }),
    /x\.safetensors: tensor 'a': F32 \[3\] needs 3 elements, got 2/,
  );
  t.throws(
    () => writeSafetensors(p, { a: { dtype: 'F32', shape: [2], data: Int32Array.from([1, 2]) } }),
    /F32 data must be a Float32Array, got Int32Array/,
  );
  t.same(fs.readdirSync(d), ['x.safetensors'], 'failed writes leave no temp file');
  t.same(Array.from(openSafetensors(p).readF32('a')), [1, 2], 'the old file is intact');
});

t.test('reference fixtures written by Python read right (F64 as Float64Array, I64 as BigInt64Array)', async (t) => {
  const ref = JSON.parse(fs.readFileSync(path.join(FIX, 'ref.json'), 'utf8')) as {
    loss: number;
    input_ids: number[][];
    logits_first4: number[][][];
  };
  const st = openSafetensors(path.join(FIX, 'ref.safetensors'));
  t.equal(st.metadata.seed, '99');
  const loss = st.read('loss');
  t.ok(loss instanceof Float64Array);
  t.equal((loss as Float64Array)[0], ref.loss, 'loss is bit-identical to ref.json');
  const ids = st.read('input_ids');
  t.ok(ids instanceof BigInt64Array);
  t.same(Array.from(ids as BigInt64Array, Number), ref.input_ids.flat());
  const logits = st.read('logits_first4') as Float64Array;
  t.same(Array.from(logits.subarray(0, 8)), ref.logits_first4[0]![0]!.slice(0, 8));
  const g = openSafetensors(path.join(FIX, 'grads.safetensors'));
  t.equal(g.tensors.size, 28);
  t.same(g.warnings, []);
});

t.test('toDevice: straight from the file, or converted', async (t) => {
  const dev = cpuDevice();
  const d = tmpdir(t);
  const p = path.join(d, 'dev.safetensors');
  const f = Float32Array.from([1, -2, 3.5, 0.25, 7, -8]);
  writeSafetensors(p, {
    f32: { dtype: 'F32', shape: [2, 3], data: f },
    bf16: { dtype: 'BF16', shape: [2, 3], data: f32ToBf16(f) },
    f64: { dtype: 'F64', shape: [2, 3], data: Float64Array.from(f) },
    i64: { dtype: 'I64', shape: [3], data: BigInt64Array.from([1n, 2n, 3n]) },
    big: { dtype: 'I64', shape: [1], data: BigInt64Array.from([2n ** 40n]) },
  });
  const st = openSafetensors(p);
  const a = await st.toDevice(dev, 'f32');
  t.same(a.shape, [2, 3]);
  t.same(Array.from(a.read()), Array.from(f));
  const b = await st.toDevice(dev, 'bf16');
  t.equal(b.dtype, 'bf16');
  t.same(Array.from(bf16ToF32(b.read() as Uint16Array)), Array.from(f));
  const c = await st.toDevice(dev, 'bf16', { dtype: 'f32' });
  t.same(Array.from(c.read()), Array.from(f));
  const e = await st.toDevice(dev, 'f64', { dtype: 'f32' });
  t.same(Array.from(e.read()), Array.from(f));
  await t.rejects(
    st.toDevice(dev, 'f64'),
    /dev\.safetensors: tensor 'f64' is F64, which the native core does not hold; pass \{dtype\}/,
  );
  const i = await st.toDevice(dev, 'i64', { dtype: 'i32' });
  t.same(Array.from(i.read()), [1, 2, 3]);
  await t.rejects(st.toDevice(dev, 'big', { dtype: 'i32' }), /element 0 \(1099511627776\) does not fit in i32/);
  for (const x of [a, b, c, e, i]) x.free();
});

t.test('half conversions: round to nearest even, specials, subnormals', async (t) => {
  // bf16
  t.equal(f32ToBf16Bits(1), 0x3f80);
  t.equal(f32ToBf16Bits(bf16BitsToF32(0x3f80) + 2 ** -8), 0x3f80, 'tie goes to even (down)');
  t.equal(f32ToBf16Bits(bf16BitsToF32(0x3f81) + 2 ** -8), 0x3f82, 'tie goes to even (up)');
  t.equal(f32ToBf16Bits(1 + 2 ** -8 + 2 ** -20), 0x3f81, 'above the tie rounds up');
  t.ok(Number.isNaN(bf16BitsToF32(f32ToBf16Bits(NaN))));
  t.equal(bf16BitsToF32(f32ToBf16Bits(-Infinity)), -Infinity);
  t.equal(f32ToBf16Bits(3.4028234663852886e38), 0x7f80, 'FLT_MAX rounds to Inf in bf16');
  // f16
  t.equal(f32ToF16Bits(1), 0x3c00);
  t.equal(f32ToF16Bits(65504), 0x7bff);
  t.equal(f32ToF16Bits(65520), 0x7c00, '65520 rounds to Inf');
  t.equal(f32ToF16Bits(65519), 0x7bff);
  t.equal(f32ToF16Bits(2 ** -24), 0x0001, 'smallest subnormal');
  t.equal(f32ToF16Bits(2 ** -25), 0x0000, 'half the smallest subnormal: tie to even (0)');
  t.equal(f32ToF16Bits(3 * 2 ** -25), 0x0002, '1.5 subnormal steps: tie to even (2)');
  t.equal(f32ToF16Bits(-(2 ** -14)), 0x8400, 'smallest normal, negative');
  t.equal(f32ToF16Bits(1 + 2 ** -11), 0x3c00, 'tie to even (down)');
  t.equal(f32ToF16Bits(1 + 3 * 2 ** -11), 0x3c02, 'tie to even (up)');
  t.equal(f32ToF16Bits(1e-10), 0);
  t.ok(Number.isNaN(f16BitsToF32(f32ToF16Bits(NaN))));
  t.equal(f16BitsToF32(f32ToF16Bits(-Infinity)), -Infinity);
  // every f16 value round-trips exactly through f32
  let bad = 0;
  for (let h = 0; h < 65536; h++) {
    const v = f16BitsToF32(h);
    if (Number.isNaN(v)) continue;
    if (f32ToF16Bits(v) !== h) bad++;
  }
  t.equal(bad, 0, 'all 63488 non-NaN f16 values round-trip');
  t.same(Array.from(f16ToF32(f32ToF16([0.1]))), [f16BitsToF32(0x2e66)]);
});
