// The supervisor's side of a stage on another host: an endpoint that looks to the actor runtime
// like a stage's worker thread (postMessage, 'message' / 'error' / 'exit' events, terminate),
// so the runtime's routing, heartbeats, restarts, adapter restore and replay apply unchanged.
// The channels the runtime makes between neighbouring stages (LinkMsg) end here: what the
// neighbour sends on one goes to the host (which hands it to its stage on a local channel), and
// what the stage sends its neighbour comes back from the host and goes out on it. Before a
// message goes out, the slots it names (the micro-batch's meta slot, the input hidden states,
// the incoming gradient, the head share's rows) are sent to the host; the host sends back the
// slots its stage produced before the message that names them, and they are written straight
// into the runtime's slab (so every slot crosses the supervisor: star routing). The stage's
// control port (InitMsg.control, comlink: actors/rpc.ts) ends here too: what the runtime's comlink
// posts on it goes to the host as an Rpc, in order with the rest, and the answers come back on it.
// A host is declared gone when a send finds no responders or times out, or when its lease
// vanishes from the registry; a hang shows as missing heartbeats. Either way the control port
// closes with the stage, and the runtime fails the calls still waiting on it.
import { EventEmitter } from 'node:events';
import { randomUUID } from 'node:crypto';
import type { KV } from '@nats-io/kv';
import type { NatsConnection, Subscription } from '@nats-io/transport-node';
import { ErrorCode } from '../../lib/errors.js';
import { openModelDir } from '../../lib/io/hf-model.js';
import { modelFingerprint, type ModelFingerprint } from '../../lib/io/fingerprint.js';
import type { MessagePort } from 'node:worker_threads';
import type { FromStage, InitMsg, ToStage } from '../protocol.js';
import { Slab } from '../shm.js';
import { clusterConnect, type ClusterAuth } from './connect.js';
import type { FromHost, LinkSide, Relay, RemoteInit, Rpc, SlotRange, ToHost } from './host.js';
import { LinkSender, listen, type LinkError } from './link.js';
import { DEFAULT_LEASE_MS, listDevices, openRegistry, slotSink, slotWire, type ClusterDevice } from './registry.js';

export interface ClusterOptions {
  url: string;
  auth?: ClusterAuth;
  leaseMs?: number;
  /** How long one message to a host may go unanswered before it is declared gone. */
  sendTimeoutMs?: number;
}

/** A connection to the cluster for one run: its identity, the registry, the remote stages. */
export class Cluster {
  readonly run = randomUUID();
  private fingerprints = new Map<string, ModelFingerprint>();
  /** Which device each stage runs on now. */
  readonly placement: ClusterDevice[] = [];
  /** When each device's stage was last declared gone (a host that registers after that is back). */
  readonly failed = new Map<string, number>();
  bytesSent = 0;
  bytesReceived = 0;

  private constructor(
    readonly nc: NatsConnection,
    readonly kv: KV,
    readonly o: ClusterOptions,
  ) {}

  static async connect(o: ClusterOptions): Promise<Cluster> {
    const nc = await clusterConnect(o.url, 'mlora supervisor', o.auth);
    try {
      return new Cluster(nc, await openRegistry(nc, o.leaseMs ?? DEFAULT_LEASE_MS), o);
    } catch (e) {
      await nc.close().catch(() => {});
      throw e;
    }
  }

  devices(): Promise<ClusterDevice[]> {
    return listDevices(this.nc, this.kv);
  }

  /**
   * The devices for a run's stages: 'cluster' (every registered device the registry shows free,
   * in host/device order) or a list of host/device names, each of which must be registered.
   */
  async resolve(spec: string[] | 'cluster'): Promise<ClusterDevice[]> {
    const all = await this.devices();
    if (!all.length)
      throw new Error(
        `no stage host is registered at ${this.o.url.replace(/\/\/[^@]*@/, '//')} (start one: mlora stage serve --cluster URL)`,
      );
    if (spec === 'cluster') {
      const free = all.filter((d) => !d.claimedBy);
      if (!free.length)
        throw new Error(`every registered device is claimed by another run: ${all.map((d) => d.id).join(', ')}`);
      return free;
    }
    return spec.map((s) => {
      const d = all.find((x) => x.id === s);
      if (!d)
        throw new Error(
          `device '${s}' is not registered in the cluster (registered: ${all.map((x) => x.id).join(', ')})`,
        );
      // the registry's claimedBy may be a renewal behind: the claim itself decides (the host refuses a device another run holds)
      return d;
    });
  }

  fingerprint(modelDir: string): ModelFingerprint {
    let f = this.fingerprints.get(modelDir);
    if (!f) this.fingerprints.set(modelDir, (f = modelFingerprint(openModelDir(modelDir))));
    return f;
  }

  /**
   * Where a stage may go when it starts again, best first: its own device if its host is
   * registered (it came back), then every free registered device no other stage of this run uses.
   */
  async replacements(stage: number): Promise<ClusterDevice[]> {
    // a record renewed before the failure may only be the lease not yet expired: not back yet
    const all = (await this.devices()).filter((d) => d.renewed > (this.failed.get(d.id) ?? 0));
    const mine = this.placement[stage]!;
    const back = all.filter((d) => d.id === mine.id && (!d.claimedBy || d.claimedBy === this.run));
    const used = new Set(this.placement.filter((_, s) => s !== stage).map((d) => d.id));
    const free = all.filter((d) => d.id !== mine.id && !used.has(d.id) && !d.claimedBy);
    const out = [...back, ...free];
    if (!out.length)
      throw new Error(`stage ${stage}: its host ${mine.host} is gone and no free registered device is left`);
    return out;
  }

  /** The runtime's stage factory: a RemoteStage for stage `index` (on first start, the planned device). */
  endpoint(init: InitMsg, started: boolean): RemoteStage {
    return new RemoteStage(this, init, started);
  }

  /** Releases of devices not yet acknowledged: close() waits for them (bounded), so no claim outlives its run. */
  readonly releases = new Set<Promise<void>>();

  async close(): Promise<void> {
    await Promise.all(this.releases);
    await this.nc.drain().catch(() => {});
  }
}

let incarnation = 0;

/**
 * A host frees a device whose run sent nothing for this long (the run's keepalives come every
 * second): a run that died or lost its link does not hold its devices for long.
 */
export const CLAIM_LEASE_MS = 10_000;

export class RemoteStage extends EventEmitter {
  private tx: LinkSender | undefined;
  private sub: Subscription | undefined;
  private readonly slab: Slab;
  private exited = false;
  private ready = false;
  private keepalive: NodeJS.Timeout | undefined;
  private leaseCheck: NodeJS.Timeout | undefined;
  private device: ClusterDevice | undefined;
  private readonly queue: Array<ToStage | Rpc> = [];
  /** The runtime's ends of the channels to the neighbouring stages. */
  private readonly links: { prev?: MessagePort; next?: MessagePort } = {};
  private starting: Promise<void>;

  constructor(
    readonly cluster: Cluster,
    readonly init: InitMsg,
    restart: boolean,
  ) {
    super();
    this.slab = new Slab(init.slab, init.slotCount, init.slotBytes);
    init.control.on('message', (m: unknown) => this.postMessage({ type: 'rpc', m }));
    init.control.unref(); // the NATS connection keeps the process alive, not this port
    this.starting = this.start(restart).catch((e) => this.die((e as Error).message));
  }

  /** Like a Worker's: -1 once the stage is gone. */
  get threadId(): number {
    return this.exited ? -1 : 1;
  }

  private async start(restart: boolean): Promise<void> {
    const c = this.cluster;
    const replyTo = `mlora.run.${c.run}.s${this.init.stage}.${++incarnation}`;
    this.sub = listen(c.nc, {
      subject: replyTo,
      admit: (run) => (run === c.run ? undefined : `refused: not run ${c.run}`),
      onMessage: (m) => this.fromHost(m as FromHost),
      sink: (slot, off, len) => {
        c.bytesReceived += len;
        return slotSink(() => this.slab)(slot, off, len);
      },
    });
    await c.nc.flush();
    const leaseMs = c.o.leaseMs ?? DEFAULT_LEASE_MS;
    // a restart tries the candidates in turn: one that cannot be claimed (gone since the
    // registry was read, claimed meanwhile) costs a message, not a failed recovery
    const candidates = restart ? await c.replacements(this.init.stage) : [c.placement[this.init.stage]!];
    let dev: ClusterDevice | undefined;
    let link: LinkSender | undefined;
    let why = '';
    for (const d of candidates) {
      const tx = new LinkSender(c.nc, {
        to: d.subject,
        run: c.run,
        ...(c.o.sendTimeoutMs ? { timeoutMs: c.o.sendTimeoutMs } : {}),
      });
      try {
        await tx.send({ type: 'claim', leaseMs: CLAIM_LEASE_MS } satisfies ToHost, { 'm-claim': '1' });
        [dev, link] = [d, tx];
        break;
      } catch (e) {
        why += `${why ? '; ' : ''}${d.id}: ${(e as Error).message}`;
        if (restart) c.failed.set(d.id, Date.now());
      }
    }
    if (!dev || !link) throw new Error(`stage ${this.init.stage}: no device could be claimed (${why})`);
    c.placement[this.init.stage] = dev;
    this.device = dev;
    this.tx = link;
    const { slab: _s, faultFlags: _f, control: _c, ...rest } = this.init;
    const ri: RemoteInit = {
      ...rest,
      device: dev.id,
      faults: [],
      fingerprint: c.fingerprint(this.init.modelDir),
      replyTo,
    };
    await link.send({ type: 'remote-init', init: ri } satisfies ToHost);
    // answered keepalives, outside the queue: a host that died (its connection closed) answers
    // the next one with "no responders" within a second, long before its lease runs out, even
    // while a transfer to it waits for its timeout. A slow answer is no verdict (heartbeats and
    // the lease judge hangs).
    this.keepalive = setInterval(
      () => {
        if (this.exited) return;
        this.tx!.probe({ type: 'keepalive' } satisfies ToHost).catch((e: LinkError) => {
          if (e.kind === 'gone') this.die(`${dev.id}: ${e.message}`);
        });
      },
      Math.min(1_000, Math.max(200, leaseMs / 6)),
    );
    this.keepalive.unref();
    this.leaseCheck = setInterval(() => void this.checkLease(), Math.max(200, leaseMs / 3));
    this.leaseCheck.unref();
    for (const m of this.queue.splice(0)) this.send(m);
  }

  private async checkLease(): Promise<void> {
    if (this.exited || !this.device) return;
    const e = await this.cluster.kv.get(this.device.host).catch(() => undefined);
    if (this.exited) return;
    if (!e || e.operation !== 'PUT')
      this.die(`the lease of stage host ${this.device.host} expired (no renewal within the lease)`);
  }

  private fromHost(m: FromHost): void {
    if (this.exited) return;
    if (m.type === 'exit') return this.die(`the stage's thread on ${this.device?.id} exited with code ${m.code}`);
    if (m.type === 'relay') {
      // the stage's message to its neighbour; the partial slot bytes it names travel on with it
      return void this.links[m.side]?.postMessage({ ...m.m, ...(m.ranges ? { ranges: m.ranges } : {}) });
    }
    if (m.type === 'rpc') return void this.init.control.postMessage(m.m);
    if (m.type === 'ready') this.ready = true;
    // a device that refuses to start this run's stage (another model, no model directory) is
    // not tried again by this run
    if (m.type === 'error' && !this.ready && this.device) this.cluster.failed.set(this.device.id, Infinity);
    this.emit('message', m);
  }

  /** Like a Worker's; a LinkMsg's port (in `transfer` for a Worker) stays in this thread. */
  postMessage(m: ToStage | Rpc, _transfer?: readonly unknown[]): void {
    if (this.exited) return;
    if (!this.tx) return void this.queue.push(m);
    this.send(m);
  }

  private send(m: ToStage | Rpc): void {
    if (m.type === 'link') {
      const { port, ...rest } = m;
      this.links[m.side]?.close();
      this.links[m.side] = port;
      port.on('message', (x: ToStage & { ranges?: SlotRange[] }) => this.fromNeighbour(m.side, x));
      return this.forward(rest satisfies ToHost);
    }
    this.forward(m);
  }

  /** A neighbour's message for this stage: on to the host over the link of `side`. */
  private fromNeighbour(side: LinkSide, x: ToStage & { ranges?: SlotRange[] }): void {
    if (this.exited) return;
    const { ranges, ...m } = x;
    this.forward({ type: 'relay', side, m } satisfies Relay, ranges);
  }

  /** Sends a message to the host, the slots it names first. */
  private forward(msg: ToHost | ToStage, ranges?: SlotRange[]): void {
    const tx = this.tx!;
    const push = (slot: number, offset?: number, length?: number) => {
      const w = slotWire(this.slab, slot, offset === undefined ? undefined : [offset, length!]);
      this.cluster.bytesSent += w.bytes.length;
      tx.sendSlot(slot, w.offset, w.bytes).catch(() => {}); // a failure fails the message below too
    };
    const m = msg.type === 'relay' ? msg.m : msg;
    if (m.type === 'forward') {
      push(m.metaSlot);
      if (m.inSlot >= 0) push(m.inSlot);
    } else if (m.type === 'backward') push(m.gradSlot);
    else if (m.type === 'head') push(m.headSlot);
    for (const r of ranges ?? []) push(...r);
    tx.send(msg).catch((e: Error) => this.die(`${this.device?.id}: ${e.message}`));
  }

  private closeLinks(): void {
    this.init.control.close();
    this.links.prev?.close();
    this.links.next?.close();
    delete this.links.prev;
    delete this.links.next;
  }

  /** The stage is gone: the runtime restarts it (as it does a worker thread that died). */
  private die(reason: string): void {
    if (this.exited) return;
    this.exited = true;
    if (this.device) this.cluster.failed.set(this.device.id, Date.now());
    this.stopTimers();
    this.closeLinks();
    this.release(); // a host still there is free for the restart
    if (!this.ready)
      this.emit('message', {
        type: 'error',
        epoch: 0,
        stage: this.init.stage,
        error: { code: ErrorCode.Crash, message: reason },
      } satisfies FromStage);
    else this.emit('error', new Error(reason));
    this.emit('exit', 1);
  }

  /** Best effort, bounded: a host that is gone frees itself when this run's keepalives stop. */
  private release(): Promise<void> {
    if (!this.tx) return Promise.resolve();
    let timer: NodeJS.Timeout | undefined;
    const p = Promise.race([
      this.tx.send({ type: 'release' } satisfies ToHost).catch(() => {}),
      new Promise<void>((r) => (timer = setTimeout(r, 2_000))),
    ]).finally(() => {
      clearTimeout(timer);
      this.cluster.releases.delete(p);
    });
    this.cluster.releases.add(p);
    return p;
  }

  private stopTimers(): void {
    clearInterval(this.keepalive);
    clearInterval(this.leaseCheck);
  }

  async terminate(): Promise<number> {
    await this.starting;
    if (!this.exited) {
      this.exited = true;
      this.stopTimers();
      this.closeLinks();
      await this.release();
      this.emit('exit', 1);
    }
    this.sub?.unsubscribe();
    return 1;
  }
}
