// Admission by memory counts what a micro-batch really holds on each stage of the worker-thread
// pipeline: the bytes it keeps between its calls (saved activations) for every micro-batch in
// flight, but the bytes of a call (scratch) only once, since a stage actor runs one call at a
// time. With a budget that has room for two micro-batches that way, but not for two full
// copies, two are in flight and nothing runs out.
import t from 'tap';
import { Supervisor } from '../../actors/index.js';
import { adapters } from '../faults/harness.js';
import { tinyModel } from '../support/models.js';
import { tmpDir } from '../support/files.js';
import { faultLog } from './util.js';

const model = await tinyModel(0);
const cfg = adapters(tmpDir(t, 'admission'), ['a', 'b'], 3);
const devices = ['cpu:0', 'cpu:1'];
const spec = (i: number) => ({
  r: cfg[i]!.lora.r,
  alpha: cfg[i]!.lora.alpha,
  dropout: cfg[i]!.lora.dropout,
  targets: [...cfg[i]!.lora.targets],
  useRslora: false,
  seed: 0,
});
const N = cfg[0]!.micro_batch_size * cfg[0]!.seq_len; // the largest micro-batch of one adapter

const probe = await Supervisor.start({ model, devices, threads: 1, memory: '256MiB', maxTokens: 512 });
const rest = await probe.pipeline.memory();
const A = [0, 1].map((i) => probe.pipeline.adapterBytes(spec(i)));
const segs = [{ rows: N, spec: spec(0) }];
const all = probe.pipeline.activationBytes(N, segs);
const transient = probe.pipeline.transientBytes!(N, segs);
await probe.close();
const held = all.map((b, s) => b - transient[s]!);
t.ok(
  transient.every((b, s) => b > 0 && b <= all[s]!),
  `transient bytes per stage ${transient.join('/')} of ${all.join('/')}`,
);
// the tiny model's 2 layers cannot balance whole: stage 0 runs half the head (lib/schedule/split.ts),
// so the last stage's forward and backward are two calls, with the share's answer in between
const shared = probe.pipeline.plans[0]!.headShare;
t.ok(shared, `the split gives stage 0 a share of the head (${shared})`);
t.ok(
  held[1]! > 0 && held[1]! < all[1]!,
  "the last stage keeps its saved activations between its forward and the share's answer, not its scratch",
);

// room for both adapters and two micro-batches counted the exact way, not for two full copies
const room = (s: number) => rest[s]!.used + A[0]![s]! + A[1]![s]! + 2 * held[s]! + transient[s]!;
const budget = Math.max(room(0), room(1));
t.ok(
  [0, 1].some((s) => budget < rest[s]!.used + A[0]![s]! + A[1]![s]! + 2 * all[s]!),
  `budget ${budget}: two full copies of a micro-batch would not fit on some stage`,
);

const { faults, onFault } = faultLog();
const sup = await Supervisor.start({
  model,
  devices,
  threads: 1,
  memory: budget,
  maxTokens: 512,
  adaptersPerMicroBatch: 1,
  onFault,
});
const jobs = cfg.map((c) => sup.submit(c));
await sup.drain();
await sup.close();
t.same(
  jobs.map((j) => j.state),
  ['done', 'done'],
  `both adapters finished ${jobs.map((j) => j.error ?? '').join(' ')}`,
);
t.same(faults, [], 'no stage ran out of memory: the accounting is exact');
t.ok(sup.peakInflight >= 2, `two micro-batches were in flight at once (peak ${sup.peakInflight})`);
