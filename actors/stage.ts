// A stage actor: the entry point of one worker thread. It owns exactly one device, loads
// only its layers' base weights, and runs Forward / Backward / Step for any mix of adapters
// from a priority mailbox (control first, then the head share, then Forward before Backward
// except on the last stage: actors/mailbox.ts says why), reading and writing
// activations in the shared slab in place. It heartbeats while it computes (kernels run off
// the JS thread). Its management API (actors/rpc.ts) comes by comlink on a port of its own and
// runs in the control lane of the same mailbox. Fault injection: actors/stage-faults.ts.
import { parentPort, workerData, type MessagePort } from 'node:worker_threads';
import { openDevice, type Tensor } from '../lib/tensor.js';
import { StageProgram, type MicroBatch } from '../lib/model/stage.js';
import { loadStageWeights } from '../lib/model/weights.js';
import { openModelDir } from '../lib/io/hf-model.js';
import { metaLayout, Slab, SlotKind, snapshotBuffer, snapshotViews, type StageSnapshot } from './shm.js';
import type {
  BackwardMsg,
  DropMsg,
  ForwardMsg,
  FromStage,
  HeadedMsg,
  HeadMsg,
  InitMsg,
  LinkMsg,
  PoisonMsg,
  StepMsg,
  StepReply,
  ToStage,
} from './protocol.js';
import { clockMs } from './clock.js';
import { takeNext } from './mailbox.js';
import { serveStage, type StageApi } from './rpc.js';
import { slowDown, StageFaults } from './stage-faults.js';
import { ErrorCode, toWire } from '../lib/errors.js';
import { native } from '../lib/native.js';

const port = parentPort!;
const init = workerData as InitMsg;
const send = (m: FromStage, transfer?: ArrayBuffer[]) => port.postMessage(m, transfer);
/** The ports to the neighbouring stages (LinkMsg): activations and their gradients go straight there. */
const link: { prev?: MessagePort; next?: MessagePort } = {};

let program: StageProgram;
let slab: Slab;
let handled = 0;
let busySince = 0;
/** Messages handled and the time spent on them since the last stats reset (StageStats). */
const account = { messages: 0, busyMs: 0 };
const faults = new StageFaults(init.faults ?? [], init.faultFlags, init.stage);
/** Micro-batches between forward and backward on this stage (the last stage: between forward and its head share's answer). */
const live = new Map<number, { mb: MicroBatch; views: Tensor[]; msg?: ForwardMsg }>();

/** A StageApi call (actors/rpc.ts), queued in the control lane like the ordered requests. */
interface Call {
  type: 'call';
  /** Fault injection counts it as a message (shutdown excepted, as it always was). */
  counts: boolean;
  run: () => unknown;
  resolve: (v: unknown) => void;
  reject: (e: unknown) => void;
}
/** What the mailbox holds (a LinkMsg takes effect on arrival). */
type Queued = Exclude<ToStage, LinkMsg> | Call;
/** `backward` also holds the head share's messages (the head share goes first, the rest first in, first out: actors/mailbox.ts). */
const mailbox = {
  control: [] as Array<StepMsg | PoisonMsg | DropMsg | Call>,
  backward: [] as Array<BackwardMsg | HeadMsg | HeadedMsg>,
  forward: [] as ForwardMsg[],
};
let pumping = false;
/** Messages of an older epoch belong to an attempt the pipeline dropped during a recovery. */
let minEpoch = init.minEpoch ?? 0;

function receive(m: ToStage): void {
  if (m.type === 'forward') mailbox.forward.push(m);
  else if (m.type === 'backward' || m.type === 'head' || m.type === 'headed') mailbox.backward.push(m);
  else if (m.type === 'link') return relink(m);
  else mailbox.control.push(m);
  void pump();
}

/** Runs `run` in the control lane, between two messages: a comlink call never runs beside a kernel. */
function queued<T>(run: () => T | Promise<T>, counts = true): Promise<T> {
  return new Promise<T>((resolve, reject) => {
    mailbox.control.push({ type: 'call', counts, run, resolve: resolve as (v: unknown) => void, reject });
    void pump();
  });
}

/** Installs a neighbour's port at once (not through the mailbox: it must be in place before the pipeline replays). */
function relink(m: LinkMsg): void {
  link[m.side]?.close();
  link[m.side] = m.port;
  m.port.on('message', receive);
  send({ type: 'reply', id: m.id });
}

port.on('message', receive);

const heartbeat = setInterval(() => {
  send({ type: 'heartbeat', stage: init.stage, handled, busyMs: busySince ? performance.now() - busySince : 0 });
}, init.heartbeatMs);
heartbeat.unref();

function versionsReady(m: ForwardMsg): boolean {
  for (const [id, v] of Object.entries(m.versions)) {
    const a = program.adapters.get(Number(id));
    if (!a || a.version < v) return false;
  }
  return true;
}

function nextMessage(): Queued | undefined {
  if (mailbox.control.length) return mailbox.control.shift();
  mailbox.backward = mailbox.backward.filter((m) => m.epoch >= minEpoch);
  mailbox.forward = mailbox.forward.filter((m) => m.epoch >= minEpoch);
  return takeNext(mailbox, program.plan.last, versionsReady);
}

async function pump(): Promise<void> {
  if (pumping || !program) return;
  pumping = true;
  try {
    for (let m = nextMessage(); m; m = nextMessage()) {
      busySince = performance.now();
      await handle(m);
      account.busyMs += performance.now() - busySince;
      account.messages++;
      busySince = 0;
      handled++;
    }
  } finally {
    pumping = false;
  }
}

/** Records work that began at `start` (clockMs()), relative to the pipeline's time origin: one time base for all stages. */
function record(kind: 'F' | 'B' | 'H' | 'S' | 'E', mb: number, adapters: number[], start: number) {
  send({
    type: 'record',
    rec: { stage: init.stage, kind, mb, adapters, start: start - init.originMs, end: clockMs() - init.originMs },
  });
}

function injectFaults(microBatch: boolean): number {
  return faults.inject(handled, microBatch, program.device.name);
}

function corruptAfter(slot: number): void {
  faults.corruptAfter(handled, slab, slot);
}

function metaTensors(m: ForwardMsg, views: Tensor[]): MicroBatch['tensors'] & { tokens: Tensor; losses: Float32Array } {
  const N = m.numTokens;
  const L = metaLayout(N, m.nseq);
  const d = program.device;
  const w = <T extends Tensor>(t: T) => (views.push(t), t);
  return {
    tokens: w(d.wrap(slab.i32(m.metaSlot, L.tokens, N), 'i32', [N])),
    positions: w(d.wrap(slab.i32(m.metaSlot, L.positions, N), 'i32', [N])),
    cuSeqlens: w(d.wrap(slab.i32(m.metaSlot, L.cuSeqlens, m.nseq + 1), 'i32', [m.nseq + 1])),
    targets: w(d.wrap(slab.i32(m.metaSlot, L.targets, N), 'i32', [N])),
    weights: w(d.wrap(slab.f32(m.metaSlot, L.weights, N), 'f32', [N])),
    losses: slab.f32(m.metaSlot, L.losses, N),
  };
}

function hidden(slot: number, N: number, views: Tensor[]): Tensor {
  const t = program.device.wrap(slab.f32(slot, 0, N * program.config.hiddenSize), 'f32', [
    N,
    program.config.hiddenSize,
  ]);
  views.push(t);
  return t;
}

async function handle(m: Queued): Promise<void> {
  try {
    if (m.type === 'forward') return await forward(m);
    if (m.type === 'backward') return await backward(m);
    if (m.type === 'head') return await headShare(m);
    if (m.type === 'headed') return await afterHeadShare(m);
    if (m.type === 'step') {
      const t = clockMs();
      injectFaults(false);
      const sumsq = await program.step(m.adapter, m.params, !!m.measure);
      record('S', -1, [m.adapter], t);
      // the reply names the new state: the runtime's snapshot for recovery, without another round
      // trip, in shared memory reused from step to step (StageSnapshot)
      return send({
        type: 'reply',
        id: m.id,
        value: { sumsq, snapshot: writeSnapshot(m.adapter) } satisfies StepReply,
      });
    }
    if (m.type === 'call') {
      if (m.counts) injectFaults(false);
      return m.resolve(await m.run());
    }
    return control(m);
  } catch (e) {
    const err = e as Error;
    if (m.type === 'call') return m.reject(err);
    if (m.type === 'step' || m.type === 'poison' || m.type === 'drop')
      return send({ type: 'reply', id: m.id, error: toWire(err) });
    dropLive(m.mb);
    // the pipeline answers every error of its current epoch with a new attempt, so the rest of
    // this epoch's micro-batches here are wasted work (and an injected fault must not be spent on them)
    minEpoch = Math.max(minEpoch, m.epoch + 1);
    send({ type: 'error', epoch: m.epoch, stage: init.stage, mb: m.mb, error: toWire(err) });
  }
}

/**
 * Per adapter on this stage, the shared buffer its snapshots go to. Made when the adapter joins
 * and written through once: a page fault costs these VMs ~15 µs, so a first touch inside the
 * step (a few MB) would hold up the pipeline for tens of milliseconds.
 */
const snapshots = new Map<number, SharedArrayBuffer>();

function newSnapshotBuffer(adapter: number): SharedArrayBuffer {
  const buffer = snapshotBuffer(program.adapter(adapter).size);
  new Uint8Array(buffer).fill(0);
  snapshots.set(adapter, buffer);
  return buffer;
}

/** Writes the adapter's slice into the side of its snapshot buffer that its new version takes. */
function writeSnapshot(adapter: number): StageSnapshot {
  const a = program.adapter(adapter);
  const buffer = snapshots.get(adapter) ?? newSnapshotBuffer(adapter);
  const snap: StageSnapshot = { buffer, size: a.size, side: a.version % 2, version: a.version };
  a.exportStateInto(snapshotViews(snap));
  return snap;
}

function dropLive(mb: number) {
  const l = live.get(mb);
  if (!l) return;
  program.drop(mb);
  for (const v of l.views) v.free();
  live.delete(mb);
}

async function forward(m: ForwardMsg): Promise<void> {
  const start = clockMs();
  const factor = injectFaults(true);
  const views: Tensor[] = [];
  slab.verify(m.metaSlot, m.mb, SlotKind.META);
  if (!program.plan.first) slab.verify(m.inSlot, m.mb, SlotKind.HIDDEN);
  const meta = metaTensors(m, views);
  const mb: MicroBatch = { id: m.mb, numTokens: m.numTokens, segments: m.segments, tensors: meta };
  const input = program.plan.first ? meta.tokens : hidden(m.inSlot, m.numTokens, views);
  const adapters = m.segments.map((s) => s.adapter);
  if (!m.train) {
    const out = program.plan.last ? undefined : hidden(m.outSlot, m.numTokens, views);
    const losses = await program.evaluate(mb, input, out);
    if (losses) meta.losses.set(losses);
    else slab.seal(m.outSlot, m.mb, SlotKind.HIDDEN, m.numTokens * program.config.hiddenSize * 4, init.stage);
    for (const v of views) v.free();
    record('E', m.mb, adapters, start);
    if (program.plan.last) return send({ type: 'done', epoch: m.epoch, stage: init.stage, mb: m.mb });
    corruptAfter(m.outSlot);
    return forwardNext(m);
  }
  if (program.plan.last && m.headSlot >= 0) {
    // the head is shared: the final hidden states go to the stage before, backward waits for its answer
    const out = hidden(m.headSlot, m.numTokens, views);
    live.set(m.mb, { mb, views, msg: m });
    await program.forward(mb, input, out);
    await slowDown(start, factor);
    slab.seal(m.headSlot, m.mb, SlotKind.HIDDEN, m.numTokens * program.config.hiddenSize * 4, init.stage + 2000);
    record('F', m.mb, adapters, start);
    corruptAfter(m.headSlot);
    const head: HeadMsg = {
      type: 'head',
      epoch: m.epoch,
      mb: m.mb,
      numTokens: m.numTokens,
      nseq: m.nseq,
      rowStart: m.headRow,
      metaSlot: m.metaSlot,
      headSlot: m.headSlot,
      gradSlot: m.outSlot,
    };
    return void link.prev!.postMessage(head);
  }
  if (program.plan.last) {
    const grad = program.plan.first ? undefined : hidden(m.outSlot, m.numTokens, views);
    const losses = await program.trainLast(mb, input, grad);
    meta.losses.set(losses);
    await slowDown(start, factor);
    if (grad) slab.seal(m.outSlot, m.mb, SlotKind.GRAD, m.numTokens * program.config.hiddenSize * 4, init.stage);
    for (const v of views) v.free();
    record('F', m.mb, adapters, start);
    if (!grad) return send({ type: 'done', epoch: m.epoch, stage: init.stage, mb: m.mb });
    corruptAfter(m.outSlot);
    return backwardPrev({ type: 'backward', epoch: m.epoch, mb: m.mb, gradSlot: m.outSlot });
  }
  const out = hidden(m.outSlot, m.numTokens, views);
  live.set(m.mb, { mb, views });
  await program.forward(mb, input, out);
  await slowDown(start, factor);
  slab.seal(m.outSlot, m.mb, SlotKind.HIDDEN, m.numTokens * program.config.hiddenSize * 4, init.stage);
  record('F', m.mb, adapters, start);
  corruptAfter(m.outSlot);
  forwardNext(m);
}

/** The Forward of the next stage: it reads this stage's output and writes the next hidden slot (the gradient slot on the last stage). */
function forwardNext(m: ForwardMsg): void {
  const s = init.stage + 1;
  const outSlot = s < init.stages - 1 ? m.hidden[s]! : m.train ? m.gradSlot : -1;
  link.next!.postMessage({ ...m, inSlot: m.outSlot, outSlot } satisfies ForwardMsg);
}

function backwardPrev(m: BackwardMsg): void {
  link.prev!.postMessage(m);
}

/**
 * Norm, head and loss (forward and backward) of rows [r0, r1) of a micro-batch: their final
 * hidden states from `headSlot`, dL/d(final hidden) into `gradSlot`, losses into the meta slot.
 */
async function headRows(
  m: { mb: number; numTokens: number; nseq: number; metaSlot: number; headSlot: number },
  gradSlot: number,
  r0: number,
  r1: number,
): Promise<void> {
  if (r1 <= r0) return;
  const n = r1 - r0;
  const H = program.config.hiddenSize;
  const L = metaLayout(m.numTokens, m.nseq);
  const d = program.device;
  const views: Tensor[] = [];
  const w = <T extends Tensor>(t: T) => (views.push(t), t);
  try {
    const targets = w(d.wrap(slab.i32(m.metaSlot, L.targets + 4 * r0, n), 'i32', [n]));
    const weights = w(d.wrap(slab.f32(m.metaSlot, L.weights + 4 * r0, n), 'f32', [n]));
    const x = w(d.wrap(slab.f32(m.headSlot, 4 * H * r0, n * H), 'f32', [n, H]));
    const dx = w(d.wrap(slab.f32(gradSlot, 4 * H * r0, n * H), 'f32', [n, H]));
    const mb = { id: m.mb, numTokens: n, segments: [], tensors: { targets, weights } } as unknown as MicroBatch;
    slab.f32(m.metaSlot, L.losses + 4 * r0, n).set(await program.runHead(mb, x, dx));
  } finally {
    for (const v of views) v.free();
  }
}

/** The stage before the last: its share of the head (rows [rowStart, N)). */
async function headShare(m: HeadMsg): Promise<void> {
  const start = clockMs();
  const factor = injectFaults(true);
  slab.verify(m.headSlot, m.mb, SlotKind.HIDDEN);
  await headRows(m, m.gradSlot, m.rowStart, m.numTokens);
  await slowDown(start, factor);
  record('H', m.mb, [], start);
  link.next!.postMessage({ type: 'headed', epoch: m.epoch, mb: m.mb } satisfies HeadedMsg);
}

/** The last stage, once its head share is back: the head of the other rows, then backward. */
async function afterHeadShare(m: HeadedMsg): Promise<void> {
  const start = clockMs();
  const factor = injectFaults(true);
  const l = live.get(m.mb);
  if (!l?.msg)
    throw new Error(
      `head share of micro-batch ${m.mb} came back, but stage ${init.stage} holds no forward state for it`,
    );
  const f = l.msg;
  await headRows(f, f.outSlot, 0, f.headRow);
  await program.backward(l.mb, hidden(f.outSlot, f.numTokens, l.views));
  await slowDown(start, factor);
  slab.seal(f.outSlot, m.mb, SlotKind.GRAD, f.numTokens * program.config.hiddenSize * 4, init.stage);
  endBackward(m.mb, l, start);
  corruptAfter(f.outSlot);
  backwardPrev({ type: 'backward', epoch: m.epoch, mb: m.mb, gradSlot: f.outSlot });
}

/** A micro-batch's backward on this stage is through: its saved state goes, the work is recorded. */
function endBackward(mb: number, l: { mb: MicroBatch; views: Tensor[] }, start: number): void {
  for (const v of l.views) v.free();
  live.delete(mb);
  record(
    'B',
    mb,
    l.mb.segments.map((s) => s.adapter),
    start,
  );
}

async function backward(m: BackwardMsg): Promise<void> {
  const start = clockMs();
  const factor = injectFaults(true);
  const l = live.get(m.mb);
  if (!l) throw new Error(`backward of micro-batch ${m.mb}: no forward state on stage ${init.stage}`);
  slab.verify(m.gradSlot, m.mb, SlotKind.GRAD);
  const grad = hidden(m.gradSlot, l.mb.numTokens, l.views);
  await program.backward(l.mb, grad);
  await slowDown(start, factor);
  slab.seal(m.gradSlot, m.mb, SlotKind.GRAD, l.mb.numTokens * program.config.hiddenSize * 4, init.stage + 1000);
  endBackward(m.mb, l, start);
  if (program.plan.first) return send({ type: 'done', epoch: m.epoch, stage: init.stage, mb: m.mb });
  corruptAfter(m.gradSlot);
  backwardPrev(m);
}

/** The ordered requests besides Step (actors/rpc.ts says why they are not comlink calls). */
function control(m: PoisonMsg | DropMsg): void {
  injectFaults(false);
  if (m.type === 'poison') {
    const a = program.adapter(m.adapter);
    a.params.write(new Float32Array(a.params.shape[0]!).fill(NaN));
  } else {
    for (const id of [...live.keys()]) dropLive(id);
    for (const id of program.inFlight()) program.drop(id); // saved blocks with no entry in `live`
    minEpoch = Math.max(minEpoch, m.epoch);
  }
  send({ type: 'reply', id: m.id });
}

/** The management API; each call waits for its turn in the control lane. */
const api: StageApi = {
  addAdapter: (adapter, spec, state) =>
    queued(() => {
      program.addAdapterState(adapter, spec, state);
      newSnapshotBuffer(adapter); // the supervisor may still hold the old one
    }),
  removeAdapter: (adapter) =>
    queued(() => {
      program.removeAdapter(adapter);
      snapshots.delete(adapter);
    }),
  exportAdapter: (adapter) => queued(() => program.adapter(adapter).exportState()),
  gradSumsq: (adapter) => queued(() => program.gradSumsq(adapter)),
  memory: () => queued(() => ({ device: program.device.name, ...program.device.memory() })),
  stats: (reset) =>
    queued(() => {
      const s = { ...program.device.runStats(reset), ...account };
      if (reset) Object.assign(account, { messages: 0, busyMs: 0 });
      return s;
    }, false),
  shutdown: () =>
    queued(() => {
      for (const id of [...live.keys()]) dropLive(id);
      program.free();
      clearInterval(heartbeat);
      // after comlink has posted the answer: then nothing keeps this thread's event loop alive
      setImmediate(() => {
        link.prev?.close();
        link.next?.close();
        init.control.close();
        port.close();
      });
    }, false),
};
serveStage(api, init.control);

async function start(): Promise<void> {
  try {
    native().nameThread(`mlora stage ${init.stage}`);
    // with its compute thread: this thread's work falls between the stage's own op lists
    if (init.cores?.length) native().pinThread(init.cores);
    slab = new Slab(init.slab, init.slotCount, init.slotBytes);
    const device = openDevice(init.device, {
      threads: init.threads,
      budget: init.budget,
      ...(init.cores ? { cores: init.cores } : {}),
    });
    const dir = openModelDir(init.modelDir);
    const weights = await loadStageWeights(device, dir, init.plan, init.base ?? {});
    program = new StageProgram(device, dir.config, init.plan, weights, {
      recompute: !!init.recompute,
      ...(init.base?.computeDtype ? { computeDtype: init.base.computeDtype } : {}),
    });
    send({ type: 'ready', id: init.id, stage: init.stage });
    void pump();
  } catch (e) {
    send({
      type: 'error',
      epoch: 0,
      stage: init.stage,
      error: { ...toWire(e, `stage ${init.stage} failed to start: `), code: ErrorCode.Crash },
    });
  }
}

void start();
