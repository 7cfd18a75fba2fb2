// The stage host (`mlora stage serve`): registers this machine's devices in the cluster's KV
// bucket under a lease it renews, and waits for a run to claim a device. The run that claimed
// a device is the only one it obeys (every message carries the run's identity) until that run
// releases it or stops talking for `claimLeaseMs`. On Init it checks the model fingerprint,
// then runs the ordinary stage actor (actors/stage.ts) in a worker thread on its own slab: this
// process only relays protocol messages and writes activations arriving from the network
// straight into the slab's slots (and sends the slots a stage produced back before the message
// that names them). The stage's control port (comlink, actors/rpc.ts) is relayed the same way:
// what the supervisor posts on its end arrives here as an Rpc and goes to the stage's port.
import os from 'node:os';
import { MessageChannel, Worker, type MessagePort } from 'node:worker_threads';
import type { KV } from '@nats-io/kv';
import type { NatsConnection, Subscription } from '@nats-io/transport-node';
import { ErrorCode } from '../../lib/errors.js';
import { openModelDir } from '../../lib/io/hf-model.js';
import { fingerprintMismatch, modelFingerprint, type ModelFingerprint } from '../../lib/io/fingerprint.js';
import { defaultCpuBudget, parseDeviceSpec } from '../../lib/tensor.js';
import { isStepReply, type ForwardMsg, type FromStage, type HeadMsg, type InitMsg, type ToStage } from '../protocol.js';
import { compactSnapshot, HEADER_BYTES, metaLayout, Slab } from '../shm.js';
import { clusterConnect, type ClusterAuth } from './connect.js';
import { LinkSender, listen } from './link.js';
import {
  DEFAULT_LEASE_MS,
  openRegistry,
  slotSink,
  slotWire,
  subjectToken,
  type DeviceRecord,
  type HostRecord,
} from './registry.js';

const STAGE_URL = new URL('../stage.js', import.meta.url);

/** What a supervisor sends a remote stage besides the ToStage messages. */
export type RemoteInit = Omit<InitMsg, 'slab' | 'faultFlags' | 'control'> & {
  fingerprint: ModelFingerprint;
  replyTo: string;
};
export type ToHost =
  | { type: 'claim'; leaseMs: number }
  | { type: 'remote-init'; init: RemoteInit }
  | { type: 'release' }
  | { type: 'keepalive' }
  /** Make a new channel to the neighbour on `side` (the runtime's LinkMsg, its port stays with the supervisor). */
  | { type: 'link'; id: number; side: LinkSide }
  | Relay
  | Rpc;
export type LinkSide = 'prev' | 'next';
/** A comlink message on the stage's control port (either way): relayed as it is, in order with the rest. */
export interface Rpc {
  type: 'rpc';
  m: unknown;
}
/** A stage's message (ToStage) over one of its neighbour channels; ranges: partial slot bytes sent before it. */
export interface Relay {
  type: 'relay';
  side: LinkSide;
  m: ToStage;
  ranges?: SlotRange[];
}
/** [slot, offset in the slot, bytes] */
export type SlotRange = [number, number, number];
/** Besides FromStage: the stage's thread ended; a message of the stage to a neighbour. */
export type FromHost = FromStage | { type: 'exit'; code: number; stage: number } | Relay | Rpc;

export interface StageHostOptions {
  url: string;
  auth?: ClusterAuth;
  name?: string;
  devices: string[];
  /** Byte budget per device (default: a share of 80% of RAM). */
  memory?: number;
  /** Threads per device (default: the cores shared evenly). */
  threads?: number;
  /** The model directory here (default: the path the supervisor sends). */
  model?: string;
  leaseMs?: number;
  log?: (s: string) => void;
}

class DeviceServer {
  claimedBy: string | undefined;
  claimLeaseMs = 30_000;
  lastHeard = 0;
  worker: Worker | undefined;
  slab: Slab | undefined;
  toSup: LinkSender | undefined;
  sub: Subscription | undefined;
  stage = -1;
  /** Slot bytes received and sent, and micro-batch forwards run, since the claim (logged at release). */
  bytesIn = 0;
  bytesOut = 0;
  forwardsRun = 0;
  /** The last stage's Forwards (its meta slot, with the losses, goes back with its Backward or 'done'). */
  private readonly forwards = new Map<number, ForwardMsg>();
  /** The head share's requests (its answer names part of their slots). */
  private readonly heads = new Map<number, HeadMsg>();
  /** This host's ends of the worker's neighbour channels. */
  private readonly links: { prev?: MessagePort; next?: MessagePort } = {};
  /** This host's end of the worker's control port. */
  private control: MessagePort | undefined;
  private last = false;
  private hiddenSize = 0;

  constructor(
    readonly host: StageHost,
    readonly rec: DeviceRecord,
  ) {}

  admit(run: string, claiming: boolean): string | undefined {
    const id = `${this.host.name}/${this.rec.device}`;
    if (this.claimedBy && this.claimedBy !== run) return `refused: ${id} is claimed by another run`;
    if (!this.claimedBy && !claiming) return `refused: ${id} is not claimed by run ${run} (claim it first)`;
    this.lastHeard = performance.now();
    return undefined;
  }

  onMessage(m: ToHost | ToStage, run: string): void {
    if (m.type === 'claim') {
      this.claimedBy = run;
      this.claimLeaseMs = m.leaseMs;
      this.host.log(`${this.rec.device}: claimed by run ${run}`);
      return void this.host.renew();
    }
    if (m.type === 'keepalive') return;
    if (m.type === 'release') return void this.release('released by its run');
    if (m.type === 'remote-init') {
      return void this.init(m.init, run).catch((e: Error) =>
        this.toSup
          ?.send({
            type: 'error',
            epoch: 0,
            stage: m.init.stage,
            error: {
              code: ErrorCode.Crash,
              message: `${this.host.name}/${this.rec.device} cannot start stage ${m.init.stage}: ${e.message}`,
            },
          } satisfies FromStage)
          .catch(() => {}),
      );
    }
    if (!this.worker) return;
    if (m.type === 'link') return this.relink(m.id, m.side);
    if (m.type === 'rpc') return void this.control?.postMessage(m.m);
    if (m.type === 'relay') {
      this.note(m.m);
      return void this.links[m.side]?.postMessage(m.m);
    }
    this.note(m);
    // a recovery drops the micro-batches in flight: what they would have sent back is not wanted
    if (m.type === 'drop') {
      this.forwards.clear();
      this.heads.clear();
    }
    this.worker.postMessage(m);
  }

  /** What a stage will produce goes back after it: remember where. */
  private note(m: ToStage): void {
    if (m.type === 'forward') {
      this.forwardsRun++;
      if (this.last) this.forwards.set(m.mb, m);
    }
    if (m.type === 'head') this.heads.set(m.mb, m);
  }

  /** A fresh local channel to the worker for one side; what the worker sends on it goes to the supervisor. */
  private relink(id: number, side: LinkSide): void {
    this.links[side]?.close();
    const { port1, port2 } = new MessageChannel();
    this.links[side] = port1;
    port1.on('message', (m: ToStage) => void this.fromLink(side, m));
    this.worker!.postMessage({ type: 'link', id, side, port: port2 } satisfies ToStage, [port2]);
  }

  /**
   * A stage's message to a neighbour, with the slot bytes it names sent first: the output of a
   * Forward, the gradient of a Backward (and on the last stage the meta slot with the losses,
   * for the supervisor), the final hidden states of a head request, the share's rows of the
   * gradient and losses with its answer.
   */
  private async fromLink(side: LinkSide, m: ToStage): Promise<void> {
    const tx = this.toSup;
    const slab = this.slab;
    if (!tx || !slab) return;
    const push = (slot: number, offset?: number, length?: number) => {
      const w = slotWire(slab, slot, offset === undefined ? undefined : [offset, length!]);
      this.bytesOut += w.bytes.length;
      tx.sendSlot(slot, w.offset, w.bytes).catch(() => {}); // a failure fails the send below too
    };
    let ranges: SlotRange[] | undefined;
    if (m.type === 'forward') push(m.inSlot);
    else if (m.type === 'backward') {
      const f = this.forwards.get(m.mb);
      this.forwards.delete(m.mb);
      if (f) push(f.metaSlot);
      push(m.gradSlot);
    } else if (m.type === 'head') push(m.headSlot);
    else if (m.type === 'headed') {
      const h = this.heads.get(m.mb);
      this.heads.delete(m.mb);
      if (h) {
        const n = h.numTokens - h.rowStart;
        const H = this.hiddenSize;
        const L = metaLayout(h.numTokens, h.nseq);
        ranges = [
          [h.gradSlot, HEADER_BYTES + 4 * H * h.rowStart, 4 * H * n],
          [h.metaSlot, HEADER_BYTES + L.losses + 4 * h.rowStart, 4 * n],
        ];
        for (const r of ranges) push(...r);
      }
    }
    try {
      await tx.send({ type: 'relay', side, m, ...(ranges ? { ranges } : {}) } satisfies FromHost);
    } catch {
      // the supervisor is gone: its claim lapses (checked by the host's timer)
    }
  }

  private async init(ri: RemoteInit, run: string): Promise<void> {
    this.stopWorker();
    this.toSup = new LinkSender(this.host.nc, { to: ri.replyTo, run });
    this.stage = ri.stage;
    this.last = ri.plan.last;
    const fail = (message: string) =>
      void this.toSup!.send({
        type: 'error',
        epoch: 0,
        stage: ri.stage,
        error: { code: ErrorCode.Crash, message },
      } satisfies FromStage).catch(() => {});
    const modelDir = this.host.o.model ?? ri.modelDir;
    try {
      const dir = openModelDir(modelDir);
      this.hiddenSize = dir.config.hiddenSize;
      const mismatch = fingerprintMismatch(modelFingerprint(dir), ri.fingerprint);
      if (mismatch)
        return fail(
          `${this.host.name}/${this.rec.device} refuses the run's model: the model at ${modelDir} is not the supervisor's: ${mismatch}`,
        );
    } catch (e) {
      return fail(
        `${this.host.name}/${this.rec.device} cannot open the model directory ${modelDir}: ${(e as Error).message}`,
      );
    }
    this.slab = Slab.create(ri.slotCount, ri.slotBytes);
    const { port1, port2 } = new MessageChannel();
    this.control = port1;
    port1.on('message', (m: unknown) => void this.toSup?.send({ type: 'rpc', m } satisfies Rpc).catch(() => {}));
    const init: InitMsg = {
      ...ri,
      control: port2,
      modelDir,
      device: this.rec.device,
      threads: this.rec.threads,
      budget: Math.min(ri.budget || this.rec.memory, this.rec.memory),
      slab: this.slab.sab,
      faults: [],
      faultFlags: new SharedArrayBuffer(4),
    };
    delete (init as Partial<RemoteInit>).fingerprint;
    const w = new Worker(STAGE_URL, { workerData: init, transferList: [port2] });
    this.worker = w;
    this.host.log(`${this.rec.device}: stage ${ri.stage} (layers ${ri.plan.lo}..${ri.plan.hi}) of run ${run}`);
    w.on('message', (m: FromStage) => void this.fromStage(m));
    w.on('error', (e) => fail(`stage ${ri.stage} on ${this.host.name}: uncaught error: ${e.message}`));
    w.on('exit', (code) => {
      if (this.worker !== w) return;
      this.worker = undefined;
      void this.toSup?.send({ type: 'exit', code, stage: ri.stage } satisfies FromHost).catch(() => {});
    });
  }

  private async fromStage(m: FromStage): Promise<void> {
    const tx = this.toSup!;
    const slab = this.slab!;
    const push = (slot: number) => {
      const w = slotWire(slab, slot);
      this.bytesOut += w.bytes.length;
      tx.sendSlot(slot, w.offset, w.bytes).catch(() => {}); // a failure fails the send below too
    };
    try {
      if (m.type === 'heartbeat') return tx.notify(m);
      // the last stage's losses go back before the 'done' that says they are there (one ordered link)
      if (m.type === 'done') {
        const f = this.forwards.get(m.mb);
        this.forwards.delete(m.mb);
        if (f) push(f.metaSlot);
      }
      // a step's snapshot lives in this host's shared memory: the supervisor gets a copy of its side
      if (m.type === 'reply' && isStepReply(m.value))
        return await tx.send({ ...m, value: { ...m.value, snapshot: compactSnapshot(m.value.snapshot) } });
      await tx.send(m);
    } catch {
      // the supervisor is gone: its claim lapses (checked by the host's timer)
    }
  }

  stopWorker(): void {
    const w = this.worker;
    this.worker = undefined;
    this.forwards.clear();
    this.heads.clear();
    this.links.prev?.close();
    this.links.next?.close();
    delete this.links.prev;
    delete this.links.next;
    this.control?.close();
    this.control = undefined;
    if (w) void w.terminate();
  }

  release(why: string): void {
    if (!this.claimedBy) return;
    this.host.log(
      `${this.rec.device}: free again (${why}); slot bytes in ${this.bytesIn}, out ${this.bytesOut}, over ${this.forwardsRun} forward messages`,
    );
    this.bytesIn = this.bytesOut = this.forwardsRun = 0;
    this.stopWorker();
    this.claimedBy = undefined;
    this.slab = undefined;
    this.toSup = undefined;
    void this.host.renew();
  }
}

export class StageHost {
  readonly name: string;
  readonly servers: DeviceServer[] = [];
  private timer: NodeJS.Timeout | undefined;
  private closed = false;

  private constructor(
    readonly nc: NatsConnection,
    readonly kv: KV,
    readonly o: StageHostOptions,
  ) {
    this.name = o.name ?? os.hostname();
    if (!/^[A-Za-z0-9_-]{1,64}$/.test(this.name))
      throw new Error(
        `--name '${this.name}': use letters, digits, '-' or '_' (it becomes a KV key and a NATS subject)`,
      );
  }

  log(s: string): void {
    this.o.log?.(`[${this.name}] ${s}`);
  }

  static async start(o: StageHostOptions): Promise<StageHost> {
    if (!o.devices.length) throw new Error('--devices: give at least one device (e.g. cpu:0)');
    const nc = await clusterConnect(o.url, `mlora-stage-host ${o.name ?? os.hostname()}`, o.auth, true);
    try {
      const lease = o.leaseMs ?? DEFAULT_LEASE_MS;
      const kv = await openRegistry(nc, lease);
      const h = new StageHost(nc, kv, o);
      const cpus = o.devices.filter((d) => parseDeviceSpec(d).kind === 'cpu').length;
      const threads = o.threads ?? Math.max(1, Math.floor(os.availableParallelism() / Math.max(1, cpus)));
      for (const d of o.devices) {
        const spec = parseDeviceSpec(d);
        const device = `${spec.kind}:${spec.index}`;
        const rec: DeviceRecord = {
          device,
          kind: spec.kind,
          memory: o.memory ?? defaultCpuBudget(cpus),
          threads: spec.kind === 'cpu' ? threads : 1,
          subject: `mlora.stage.${subjectToken(h.name)}.${subjectToken(device)}`,
        };
        const srv = new DeviceServer(h, rec);
        srv.sub = listen(nc, {
          subject: rec.subject,
          admit: (run, m) => srv.admit(run, m.headers?.get('m-claim') === '1'),
          onMessage: (m, run) => srv.onMessage(m as ToHost, run),
          sink: (slot, off, len) => {
            const view = slotSink(() => srv.slab)(slot, off, len);
            srv.bytesIn += len;
            return view;
          },
        });
        h.servers.push(srv);
      }
      await nc.flush();
      await h.renew();
      h.timer = setInterval(() => h.tick(), Math.max(200, Math.floor(lease / 3)));
      void h.watchStatus();
      h.log(`registered ${h.servers.map((s) => s.rec.device).join(', ')} (lease ${lease} ms)`);
      return h;
    } catch (e) {
      await nc.close().catch(() => {});
      throw e;
    }
  }

  /** Logs losing and regaining the server, and registers again at once when back. */
  private async watchStatus(): Promise<void> {
    for await (const st of this.nc.status()) {
      if (st.type === 'disconnect') this.log('lost the cluster server; reconnecting');
      if (st.type === 'reconnect') {
        this.log('reconnected to the cluster server');
        void this.renew();
      }
    }
  }

  private tick(): void {
    const now = performance.now();
    for (const s of this.servers)
      if (s.claimedBy && now - s.lastHeard > s.claimLeaseMs)
        s.release(`its run was silent for ${Math.round(now - s.lastHeard)} ms`);
    void this.renew();
  }

  /** Puts this host's record again (the lease renewal; also publishes claim changes). */
  async renew(): Promise<void> {
    if (this.closed) return;
    const rec: HostRecord = {
      name: this.name,
      renewed: Date.now(),
      version: '1',
      devices: this.servers.map((s) => ({ ...s.rec, ...(s.claimedBy ? { claimedBy: s.claimedBy } : {}) })),
    };
    await this.kv
      .put(this.name, JSON.stringify(rec))
      .catch((e: Error) => this.log(`lease renewal failed: ${e.message}`));
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    clearInterval(this.timer);
    for (const s of this.servers) {
      s.stopWorker();
      s.sub?.unsubscribe();
    }
    await this.kv.delete(this.name).catch(() => {});
    await this.nc.drain().catch(() => {});
  }
}
