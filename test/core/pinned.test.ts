// A CPU device runs its op lists on a leader thread of its own; pinned to cores, the leader
// sits on the first (pool workers on the others), with results bitwise those of an unpinned
// device; op lists sent at once take turns on the leader; a bad 'cores' option is a clear Error;
// pinThread pins the thread that calls it and nothing else.
import { fileURLToPath } from 'node:url';
import t from 'tap';
import { native } from '../../lib/native.js';
import { openDevice, readF32 } from '../../lib/tensor.js';
import { Rng } from '../../lib/rng.js';
import { allowedCpus, processThreads } from '../support/threads.js';

/** The CPU lists of this process's threads. */
const threadCpuLists = () => processThreads().map((th) => th.cpus);

async function gemm(threads: number, cores?: number[]): Promise<Float32Array> {
  const d = openDevice('cpu:0', { threads, budget: 2 ** 26, ...(cores ? { cores } : {}) });
  const rng = new Rng(11);
  const [m, n, k] = [67, 129, 93];
  const a = d.fromArray('f32', [m, k], rng.fillNormal(new Float32Array(m * k)));
  const b = d.fromArray('f32', [k, n], rng.fillNormal(new Float32Array(k * n)));
  const c = d.alloc('f32', [m, n]);
  await d.run([{ op: 'gemm', c, a, b }]);
  const out = readF32(c);
  for (const x of [a, b, c]) x.free();
  return out;
}

t.test('the allowed cores are reported', async (t) => {
  const cores = native().info().cpu.allowedCores;
  t.ok(cores.length >= 1, `allowed: ${cores.join(',')}`);
  t.same(
    [...cores].sort((x, y) => x - y),
    cores,
    'ascending',
  );
});

t.test('a pinned device computes bitwise what an unpinned one does, on a thread pinned to its core', async (t) => {
  const allowed = native().info().cpu.allowedCores;
  const core = allowed[allowed.length - 1]!;
  const before = threadCpuLists().filter((l) => l === String(core)).length;
  const pinned = await gemm(1, [core]);
  t.ok(
    threadCpuLists().filter((l) => l === String(core)).length > before,
    `a thread of this process is pinned to CPU ${core}`,
  );
  t.same(pinned, await gemm(1), 'same bits as unpinned, 1 thread');
  if (allowed.length >= 2)
    t.same(await gemm(2, allowed.slice(0, 2)), await gemm(2), 'same bits as unpinned, 2 threads');
});

t.test('op lists sent without waiting take turns on the leader thread: every one runs', async (t) => {
  // lists long enough (8 fills of 16 MiB) that the others arrive while one runs
  const d = openDevice('cpu:0', { threads: 1, budget: 2 ** 28 });
  const n = 2 ** 22;
  const xs = Array.from({ length: 6 }, () => d.alloc('f32', [n]));
  await Promise.all(xs.map((x, i) => d.run(Array.from({ length: 8 }, () => ({ op: 'fill', y: x, value: i + 1 })))));
  t.same(
    xs.map((x) => readF32(x)[n - 1]),
    [1, 2, 3, 4, 5, 6],
  );
  for (const x of xs) x.free();
});

t.test("a bad 'cores' option is a clear Error", async (t) => {
  const Device = native().Device;
  t.throws(
    () => new Device({ kind: 'cpu', index: 0, threads: 2, cores: [0] } as never),
    /'cores' has 1 CPU ids for 2 threads/,
  );
  t.throws(
    () => new Device({ kind: 'cpu', index: 0, threads: 1, cores: 3 } as never),
    /'cores' must be an array of CPU ids/,
  );
  t.throws(() => new Device({ kind: 'cpu', index: 0, threads: 1, cores: [-1] } as never), /cores\[0\]/);
  t.throws(() => new Device({ kind: 'cpu', index: 0, threads: 1, cores: [1 << 20] } as never), /out of range/);
});

t.test('pinThread pins the calling thread only (a worker here), and bad CPU lists are clear Errors', async (t) => {
  const allowed = native().info().cpu.allowedCores;
  const core = allowed[allowed.length - 1]!;
  const mine = () => allowedCpus('/proc/thread-self/status');
  const before = mine();
  const { Worker } = await import('node:worker_threads');
  const addon = fileURLToPath(new URL('../../lib/native.js', import.meta.url));
  const w = new Worker(
    `const { parentPort } = require('node:worker_threads');
     import(${JSON.stringify(addon)}).then(({ native }) => {
       const ok = native().pinThread([${core}]);
       const fs = require('node:fs');
       parentPort.postMessage({ ok, list: /Cpus_allowed_list:\\s*(\\S+)/.exec(fs.readFileSync('/proc/thread-self/status', 'utf8'))[1] });
     });`,
    { eval: true },
  );
  const got = await new Promise<{ ok: boolean; list: string }>((resolve, reject) => {
    w.once('message', resolve);
    w.once('error', reject);
  });
  await w.terminate();
  t.same(got, { ok: true, list: String(core) }, `the worker's thread runs only on CPU ${core}`);
  t.equal(mine(), before, 'the main thread keeps its CPUs');
  const pin = native().pinThread as (x: unknown) => boolean;
  t.throws(() => pin(3), /pinThread\(cores\): cores must be a non-empty array/);
  t.throws(() => pin([]), /non-empty array/);
  t.throws(() => pin([-1]), /cores\[0\]/);
  t.throws(() => pin([0, 1.5]), /cores\[1\]/);
  t.throws(() => pin([1 << 20]), /cores\[0\] must be below/);
  t.equal(mine(), before, 'a refused list changes nothing');
});
