// The device: budgets, allocation, freeing, zero-copy wrapping, and the addon's refusal to
// crash on misuse.
import fs from 'node:fs';
import { once } from 'node:events';
import { Worker } from 'node:worker_threads';
import t from 'tap';
import { addonPath, native } from '../../lib/native.js';
import { openDevice } from '../../lib/tensor.js';
import { ErrorCode, errorCode } from '../../lib/errors.js';

t.test('info reports the CPU features and the CUDA state', async (t) => {
  const info = native().info();
  t.type(info.cpu.avx2, 'boolean');
  t.type(info.cuda.compiled, 'boolean');
  if (info.cuda.devices === 0) t.match(info.cuda.reason, /\w/, 'a reason is given when no CUDA device is usable');
  t.ok(info.ops.includes('gemm'));
});

t.test('allocation past the budget is a clear Error; freeing returns the bytes', async (t) => {
  const d = openDevice('cpu:1', { budget: 4 * 2 ** 20 });
  const a = d.alloc('f32', [256, 1024]); // 1 MiB
  t.equal(d.memory().used, 2 ** 20);
  t.throws(() => d.alloc('f32', [1024, 1024]), /device cpu:1: out of memory: asked 4 MiB, 3 MiB free of 4 MiB/);
  a.free();
  t.equal(d.memory().used, 0, 'bytes are back');
  const b = d.alloc('f32', [1024, 1024]);
  t.equal(d.memory().used, 4 * 2 ** 20, 'the whole budget is usable after the free');
  b.free();
});

t.test('an allocation failure carries the out-of-memory code, whichever call allocates', async (t) => {
  const d = openDevice('cpu:1', { budget: 2 ** 20 });
  const codeOf = (f: () => unknown) => {
    try {
      f();
    } catch (e) {
      return [errorCode(e), (e as Error).message] as const;
    }
    return [undefined, 'no error'] as const;
  };
  for (const [what, f] of [
    ['alloc', () => d.alloc('f32', [512, 1024])],
    ['fromArray', () => d.fromArray('f32', [512, 1024], new Float32Array(512 * 1024))],
  ] as const) {
    const [code, message] = codeOf(f);
    t.equal(code, ErrorCode.OutOfMemory, `${what}: err.code is ${ErrorCode.OutOfMemory} (${message})`);
  }
  const [code] = codeOf(() => d.alloc('f32', [0.5]));
  t.not(code, ErrorCode.OutOfMemory, 'a bad argument is not reported as out of memory');
  t.equal(d.memory().used, 0);
});

t.test('views share storage and keep it alive', async (t) => {
  const d = openDevice('cpu:0', { budget: 2 ** 20 });
  const a = d.fromArray('f32', [4, 2], new Float32Array([1, 2, 3, 4, 5, 6, 7, 8]));
  const r = a.rows(1, 3);
  t.same(Array.from(r.read()), [3, 4, 5, 6]);
  t.same(r.shape, [2, 2]);
  a.free();
  t.same(Array.from(r.read()), [3, 4, 5, 6], 'the view still reads after the parent handle is freed');
  t.ok(d.memory().used > 0);
  r.free();
  t.equal(d.memory().used, 0);
  t.throws(() => a.read(), /freed/);
  t.throws(() => a.rows(0, 5), /freed/);
});

t.test('wrap is zero-copy over a SharedArrayBuffer', async (t) => {
  const d = openDevice('cpu:0', { budget: 2 ** 20 });
  const sab = new SharedArrayBuffer(64);
  const view = new Float32Array(sab, 16, 4);
  const w = d.wrap(view, 'f32', [4]);
  t.equal(w.borrowed, true);
  await d.run([{ op: 'fill', y: w, value: 2.5 }]);
  t.same(Array.from(new Float32Array(sab)).slice(4, 8), [2.5, 2.5, 2.5, 2.5]);
  t.same(Array.from(new Float32Array(sab)).slice(0, 4), [0, 0, 0, 0], 'nothing outside the view is touched');
  t.equal(d.memory().used, 0, 'borrowed memory is not counted');
});

t.test('bad arguments are Errors naming the op and argument, never crashes', async (t) => {
  const d = openDevice('cpu:0', { budget: 2 ** 20 });
  const other = openDevice('cpu:1', { budget: 2 ** 20 });
  const a = d.alloc('f32', [2, 3]);
  const b = d.alloc('f32', [3, 2]);
  const c = d.alloc('f32', [2, 2]);
  const i = d.alloc('i32', [4]);
  const bad: Array<[unknown, RegExp]> = [
    [[{ op: 'nope' }], /op 0: unknown op 'nope'/],
    [[{}], /op 0: missing 'op'/],
    [[{ op: 'gemm', c, a }], /op 0 \(gemm\): argument 'b' is missing/],
    [[{ op: 'gemm', c, a: b, b }], /inner dimensions differ/],
    [[{ op: 'gemm', c: i, a, b }], /argument 'c' has dtype i32, expected f32/],
    [[{ op: 'gemm', c, a: {}, b }], /argument 'a' is not a Tensor/],
    // a Tensor's prototype makes no Tensor (the addon tags the objects it makes)
    [[{ op: 'gemm', c, a: Object.create(Object.getPrototypeOf(a) as object), b }], /argument 'a' is not a Tensor/],
    [[{ op: 'gemm', c, a: new (a.constructor as new () => object)(), b }], /argument 'a' is a freed tensor/],
    [[{ op: 'gemm', c, a: other.alloc('f32', [2, 3]), b }], /argument 'a' lives on cpu:1, not on cpu:0/],
    [[{ op: 'scale', y: c, alpha: NaN }], /must be finite/],
    [
      [
        { op: 'fill', y: c },
        { op: 'scale', y: c },
      ],
      /op 1 \(scale\): argument 'alpha' must be a number/,
    ],
    ['not an array', /ops must be an array/],
  ];
  for (const [ops, re] of bad) {
    t.throws(() => d.runSync(ops as never), re, String(re));
    await t.rejects(async () => d.run(ops as never), re);
  }
  t.throws(() => d.alloc('f64' as never, [2]), /unknown dtype 'f64'/);
  t.throws(() => d.alloc('f32', [-1]), /non-negative integer/);
  t.throws(() => d.fromArray('f32', [3], new Float32Array(2)), /has 2 elements, shape \[3\] needs 3/);
  t.throws(() => d.fromArray('f32', [2], new Int32Array(2) as never), /does not hold f32/);
  t.throws(() => a.write(new Float32Array(7)), /do not fit/);
  t.throws(() => a.reshape([5]), /has 5 elements/);
  t.throws(() => new (native().Device)({ kind: 'tpu' as never }), /unknown kind 'tpu'/);
  const x = d.alloc('f32', [2]);
  x.free();
  t.throws(() => d.runSync([{ op: 'fill', y: x }]), /freed tensor/);
});

t.test('loadFile reads a byte range of a file into a tensor', async (t) => {
  const { mkdtempSync, writeFileSync } = await import('node:fs');
  const { tmpdir } = await import('node:os');
  const path = await import('node:path');
  const dir = mkdtempSync(path.join(tmpdir(), 'mlora-'));
  const f = path.join(dir, 'x.bin');
  const data = new Float32Array([9, 1, 2, 3, 4]);
  writeFileSync(f, Buffer.from(data.buffer));
  const d = openDevice('cpu:0', { budget: 2 ** 20 });
  const tns = await d.loadFile(f, 4, 'f32', [2, 2]);
  t.same(Array.from(tns.read()), [1, 2, 3, 4]);
  await t.rejects(d.loadFile(f, 8, 'f32', [2, 2]), /short read/);
  await t.rejects(d.loadFile(path.join(dir, 'missing'), 0, 'f32', [1]), /missing: No such file/);
});

t.test('MLORA_PROFILE_OPS: a device opened with it sums time per op kind; without it, nothing', async (t) => {
  const plain = openDevice('cpu:0', { threads: 1, budget: 1 << 24 });
  process.env.MLORA_PROFILE_OPS = '1';
  const prof = openDevice('cpu:0', { threads: 2, budget: 1 << 24 });
  delete process.env.MLORA_PROFILE_OPS;
  const run = (d: typeof plain) => {
    const x = d.fromArray('f32', [8, 4], new Float32Array(32).fill(0.5));
    const w = d.fromArray('f32', [6, 4], new Float32Array(24).fill(0.25));
    const y = d.alloc('f32', [8, 6]);
    d.runSync([
      { op: 'linear_forward', y, x, w },
      { op: 'linear_forward', y, x, w, accumulate: true },
      { op: 'fill', y, value: 0 },
    ]);
  };
  run(plain);
  run(prof);
  t.same(plain.opProfile(), [], 'off by default');
  const p = prof.opProfile(true);
  t.same(
    p.map((r) => [r.op, r.calls]),
    [
      ['fill', 1],
      ['linear_forward w[6x4]', 2],
    ],
  );
  t.ok(
    p.every((r) => r.ms >= 0 && Number.isFinite(r.ms)),
    'times are finite',
  );
  t.same(prof.opProfile(), [], 'reset');
});

t.test('runStats counts each run() call and its time; reset starts anew', async (t) => {
  const d = openDevice('cpu:0', { threads: 1, budget: 1 << 24 });
  const y = d.alloc('f32', [64]);
  t.same(d.runStats(), { runs: 0, toLeaderMs: 0, wallMs: 0, cpuMs: 0, backMs: 0 }, 'nothing before the first run');
  await d.run([{ op: 'fill', y, value: 1 }]);
  await d.run([{ op: 'fill', y, value: 2 }]);
  d.runSync([{ op: 'fill', y, value: 3 }]); // on the calling thread: no hand-off to time
  const s = d.runStats(true);
  t.equal(s.runs, 2, 'the two run() calls, not runSync');
  t.ok(
    [s.toLeaderMs, s.wallMs, s.cpuMs, s.backMs].every((x) => Number.isFinite(x) && x >= 0),
    'times are finite and not negative',
  );
  t.equal(d.runStats().runs, 0, 'reset');
  y.free();
});

const noProc = !fs.existsSync('/proc/self/task') && 'no /proc/self/task here';
t.test(
  "a device's compute threads and a named JavaScript thread show their names in /proc",
  { skip: noProc },
  async (t) => {
    const names = () =>
      fs.readdirSync('/proc/self/task').map((x) => fs.readFileSync(`/proc/self/task/${x}/comm`, 'utf8').trim());
    openDevice('cpu:3', { threads: 2, budget: 1 << 24 });
    t.ok(names().includes('mlora cpu:3'), 'the leader');
    t.ok(names().includes('mlora cpu:3/1'), 'its helper');
    const w = new Worker(
      `const { parentPort, workerData } = require('node:worker_threads');
     require(workerData).nameThread('mlora test js');
     parentPort.postMessage('named');
     setTimeout(() => {}, 2000);`,
      { eval: true, workerData: addonPath() },
    );
    await once(w, 'message');
    t.ok(names().includes('mlora test js'), 'the worker named itself');
    t.throws(() => native().nameThread(3 as unknown as string), /nameThread\(name\): name must be a string/);
    await w.terminate();
  },
);

t.test('read(into, offset) copies into memory the caller reuses; bad destinations are Errors', async (t) => {
  const d = openDevice('cpu:0', { budget: 2 ** 20 });
  const a = d.fromArray('f32', [2, 3], new Float32Array([1, 2, 3, 4, 5, 6]));
  const sab = new SharedArrayBuffer(5 * 4);
  const into = new Float32Array(sab, 4, 3);
  t.equal(a.read(into, 2), into, 'the destination comes back');
  t.same(Array.from(new Float32Array(sab)), [0, 3, 4, 5, 0], 'elements 2..4, and nothing outside the view');
  t.same(Array.from(a.read(new Float32Array(6))), [1, 2, 3, 4, 5, 6], 'offset 0 by default');
  const i = d.fromArray('i32', [2], new Int32Array([7, -8]));
  t.same(Array.from(i.read(new Int32Array(2))), [7, -8]);
  t.throws(
    () => a.read(new Float32Array(3), 4),
    /Tensor.read: 3 elements at offset 4 do not fit in a tensor of 6 elements \[2,3\]/,
  );
  t.throws(() => a.read(new Int32Array(2)), /Tensor.read: a f32 tensor takes a Float32Array/);
  t.throws(() => a.read({} as Float32Array), /Tensor.read: expected a typed array/);
  t.throws(() => a.read(new Float32Array(1), -1), /Tensor.read: offset must be a non-negative integer/);
  const q = d.alloc('int8', [2, 64]);
  t.throws(() => q.read(new Float32Array(1)), /a int8 tensor is read whole, by read\(\)/);
  a.free();
  t.throws(() => a.read(new Float32Array(1)), /freed/);
  i.free();
  q.free();
});

t.test('op lists issued without waiting run in the order they were issued, each promise in turn', async (t) => {
  const d = openDevice('cpu:0', { budget: 2 ** 20 });
  const y = d.fromArray('f32', [4], new Float32Array(4).fill(1));
  const one = d.fromArray('f32', [4], new Float32Array(4).fill(1));
  const order: number[] = [];
  let expect = 1;
  const runs = [];
  for (let k = 0; k < 64; k++) {
    // y = 0.5 y + k: any other order gives another number
    runs.push(
      d
        .run([
          { op: 'scale', y, alpha: 0.5 },
          { op: 'axpy', y, x: one, alpha: k },
        ])
        .then(() => order.push(k)),
    );
    expect = Math.fround(Math.fround(0.5 * expect) + k);
  }
  await Promise.all(runs);
  t.same(order, [...Array(64).keys()], 'settled in issue order');
  t.same(Array.from(y.read()), [expect, expect, expect, expect]);
  y.free();
  one.free();
});

t.test('a run in flight keeps the process alive until it settles; a worker ends with runs still queued', async (t) => {
  const { execFileSync } = await import('node:child_process');
  const script = `const { native } = await import(${JSON.stringify(new URL('../../lib/native.js', import.meta.url).href)});
    const d = new (native().Device)({ kind: 'cpu', index: 0, threads: 1, budget: 1 << 26 });
    const a = d.alloc('f32', [512, 512]), c = d.alloc('f32', [512, 512]);
    d.run(Array.from({ length: 20 }, () => ({ op: 'gemm', c, a, b: a }))).then(() => console.log('settled'));`;
  const out = execFileSync(process.execPath, ['--input-type=module', '-e', script], { encoding: 'utf8' });
  t.match(out, /settled/, 'nothing but the run held the event loop');
  // a worker terminated while its device still has op lists queued: the thread ends, the process goes on
  const w = new Worker(
    `const { parentPort, workerData } = require('node:worker_threads');
     const n = require(workerData);
     const d = new n.Device({ kind: 'cpu', index: 0, threads: 1, budget: 1 << 26 });
     const a = d.alloc('f32', [512, 512]), c = d.alloc('f32', [512, 512]);
     for (let i = 0; i < 8; i++) d.run(Array.from({ length: 10 }, () => ({ op: 'gemm', c, a, b: a })));
     parentPort.postMessage('queued');`,
    { eval: true, workerData: addonPath() },
  );
  await once(w, 'message');
  t.equal(await w.terminate(), 1, 'terminated');
  const d = openDevice('cpu:0', { budget: 2 ** 20 });
  const x = d.fromArray('f32', [2], new Float32Array([1, 2]));
  await d.run([{ op: 'scale', y: x, alpha: 3 }]);
  t.same(Array.from(x.read()), [3, 6], 'devices still run afterwards');
  x.free();
});
