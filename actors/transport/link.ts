// One direction of talk between a supervisor and a remote stage over NATS, in order:
// - control messages (actors/protocol.ts's ToStage / FromStage, msgpack-encoded, typed arrays
//   kept as such), split in parts when larger than the server's max_payload;
// - a slot's bytes (the data plane): chunks under max_payload, each a NATS request that the
//   receiver answers once it has written the chunk straight into its own SharedArrayBuffer slot.
// At most `window` chunks are unanswered at once (flow control: a slow receiver slows the sender
// instead of queueing without bound), and a chunk that gets no answer (no responders: the peer is
// gone; or a timeout: it hangs or the link is cut) fails the link. NATS delivers one connection's
// messages to one subscription in order, so a control message sent after a slot's chunks arrives
// after them: a Forward never overtakes its activations.
//
// The data plane is the one small interface below (send a slot's bytes; the receiver writes
// them into the slot): NCCL or UCX endpoints would implement the same.
import {
  headers as natsHeaders,
  type Msg,
  type MsgHdrs,
  type NatsConnection,
  type Subscription,
} from '@nats-io/transport-node';
import { Packr } from 'msgpackr';

const packr = new Packr({ moreTypes: true });

/** Moves a slot's bytes to the peer's slot of the same index. */
export interface SlotSender {
  /** Resolves once the peer holds `bytes` at `offset` of its slot `slot`. */
  sendSlot(slot: number, offset: number, bytes: Uint8Array): Promise<void>;
}

/** Where the receiving side writes slot bytes: a view of its own slab. */
export type SlotSink = (slot: number, offset: number, length: number) => Uint8Array;

export class LinkError extends Error {
  override name = 'LinkError';
  constructor(
    message: string,
    readonly kind: 'gone' | 'timeout' | 'refused',
  ) {
    super(message);
  }
}

export interface LinkOptions {
  /** The peer's subject (where this side's requests go). */
  to: string;
  /** Identity of the run: every message carries it, the stage host obeys only its claimer. */
  run: string;
  /** Chunks in flight at most. */
  window?: number;
  /** How long one chunk may go unanswered. */
  timeoutMs?: number;
  /** Bytes of a chunk at most (default: the server's max_payload less room for headers). */
  chunkBytes?: number;
}

/** The sending half: ordered, chunked, windowed. */
export class LinkSender implements SlotSender {
  readonly chunk: number;
  private readonly window: number;
  private readonly timeoutMs: number;
  private tail: Promise<void> = Promise.resolve();
  private seq = 0;
  private failed: LinkError | undefined;
  /** Bytes of slot data sent (for the benchmark). */
  slotBytesSent = 0;

  constructor(
    readonly nc: NatsConnection,
    readonly o: LinkOptions,
  ) {
    const max = nc.info?.max_payload ?? 1 << 20;
    this.chunk = Math.max(1024, Math.min(o.chunkBytes ?? Infinity, max - 4096));
    this.window = o.window ?? 8;
    this.timeoutMs = o.timeoutMs ?? 10_000;
  }

  private hdrs(kind: string, fields: Record<string, string | number>): MsgHdrs {
    const h = natsHeaders();
    h.set('m-run', this.o.run);
    h.set('m-k', kind);
    for (const [k, v] of Object.entries(fields)) h.set(k, String(v));
    return h;
  }

  /** Runs `job` after every job queued before it (one order for control and data). */
  private queue(job: () => Promise<void>): Promise<void> {
    const run = this.tail.then(() => {
      if (this.failed) throw this.failed;
      return job();
    });
    this.tail = run.catch(() => {});
    return run;
  }

  /** Sends parts as requests, at most `window` unanswered. */
  private async pump(parts: Array<{ h: MsgHdrs; data: Uint8Array }>): Promise<void> {
    const inflight = new Set<Promise<void>>();
    let err: LinkError | undefined;
    for (const p of parts) {
      if (err) break;
      while (inflight.size >= this.window) await Promise.race(inflight);
      if (err) break;
      const req: Promise<void> = this.nc
        .request(this.o.to, p.data, { headers: p.h, timeout: this.timeoutMs })
        .then(
          (m) => {
            const e = m.headers?.get('m-err');
            if (e) err ??= new LinkError(e, 'refused');
          },
          (e: Error & { code?: string }) => {
            const gone = /no responders|503/i.test(`${e.message} ${e.code ?? ''}`);
            err ??= new LinkError(
              gone
                ? `${this.o.to}: no responders (the stage host is gone)`
                : `${this.o.to}: no answer within ${this.timeoutMs} ms (${e.message})`,
              gone ? 'gone' : 'timeout',
            );
          },
        )
        .finally(() => inflight.delete(req));
      inflight.add(req);
    }
    await Promise.all(inflight);
    if (err) {
      // a refusal is about one message; a lost peer fails every later send too
      if (err.kind !== 'refused') this.failed = err;
      throw err;
    }
  }

  /** A control message (any size), acknowledged by the peer. */
  send(msg: unknown, extra: Record<string, string> = {}): Promise<void> {
    return this.queue(() => {
      const body = packr.pack(msg);
      const x = ++this.seq;
      const n = Math.max(1, Math.ceil(body.length / this.chunk));
      const parts = Array.from({ length: n }, (_, i) => ({
        h: this.hdrs('c', { ...extra, 'm-x': x, 'm-i': i, 'm-n': n }),
        data: body.subarray(i * this.chunk, Math.min(body.length, (i + 1) * this.chunk)),
      }));
      return this.pump(parts);
    });
  }

  /** A message nobody waits on (heartbeats): no answer, sent now. Fails silently. */
  notify(msg: unknown): void {
    if (this.failed || this.nc.isClosed()) return;
    try {
      this.nc.publish(this.o.to, packr.pack(msg), { headers: this.hdrs('n', {}) });
    } catch {
      /* the link's failure shows on the next acknowledged send */
    }
  }

  /**
   * A message answered at once, outside the queue (it does not wait behind a transfer): rejects
   * with a 'gone' LinkError when nobody listens any more (the server answers "no responders"
   * as soon as the peer's connection closed), a 'timeout' one when no answer came in time.
   */
  async probe(msg: unknown, timeoutMs = 5_000): Promise<void> {
    if (this.failed) throw this.failed;
    try {
      await this.nc.request(this.o.to, packr.pack(msg), { headers: this.hdrs('n', {}), timeout: timeoutMs });
    } catch (e) {
      const err = e as Error & { code?: string };
      const gone = /no responders|503/i.test(`${err.message} ${err.code ?? ''}`);
      throw new LinkError(
        `${this.o.to}: ${gone ? 'no responders (the stage host is gone)' : `no answer within ${timeoutMs} ms`}`,
        gone ? 'gone' : 'timeout',
      );
    }
  }

  sendSlot(slot: number, offset: number, bytes: Uint8Array): Promise<void> {
    return this.queue(() => {
      const parts = [];
      for (let off = 0; off < bytes.length || off === 0; off += this.chunk) {
        const end = Math.min(bytes.length, off + this.chunk);
        parts.push({ h: this.hdrs('d', { 'm-slot': slot, 'm-off': offset + off }), data: bytes.subarray(off, end) });
        if (end >= bytes.length) break;
      }
      this.slotBytesSent += bytes.length;
      return this.pump(parts);
    });
  }

  /** Waits until everything queued so far is acknowledged (or failed). */
  flush(): Promise<void> {
    return this.tail;
  }
}

export interface ReceiverOptions {
  /** The subject this side listens on. */
  subject: string;
  /** Accept a message of this run? Returns the refusal reason, or undefined to accept. */
  admit: (run: string, msg: Msg) => string | undefined;
  onMessage: (msg: unknown, run: string) => void;
  sink: SlotSink;
}

/** The receiving half: writes slot chunks into the slab, reassembles and delivers control messages, answers each. */
export function listen(nc: NatsConnection, o: ReceiverOptions): Subscription {
  const parts = new Map<string, Uint8Array[]>();
  const refuse = (m: Msg, why: string) => {
    if (!m.reply) return;
    const h = natsHeaders();
    h.set('m-err', why);
    m.respond(new Uint8Array(0), { headers: h });
  };
  return nc.subscribe(o.subject, {
    callback: (err, m) => {
      if (err) return;
      const h = m.headers;
      const run = h?.get('m-run') ?? '';
      const why = o.admit(run, m);
      if (why) return refuse(m, why);
      const kind = h?.get('m-k');
      try {
        if (kind === 'd') {
          const slot = Number(h!.get('m-slot'));
          const off = Number(h!.get('m-off'));
          o.sink(slot, off, m.data.length).set(m.data);
        } else if (kind === 'n') {
          o.onMessage(packr.unpack(m.data), run);
        } else if (kind === 'c') {
          const key = `${run}/${h!.get('m-x')}`;
          const n = Number(h!.get('m-n'));
          const i = Number(h!.get('m-i'));
          const got = parts.get(key) ?? [];
          got[i] = m.data.slice();
          parts.set(key, got);
          if (got.filter(Boolean).length === n) {
            parts.delete(key);
            const body = n === 1 ? got[0]! : Buffer.concat(got);
            const msg = packr.unpack(body);
            if (m.reply) m.respond(new Uint8Array(0));
            return o.onMessage(msg, run);
          }
        } else {
          return refuse(m, `unknown message kind '${kind}'`);
        }
      } catch (e) {
        return refuse(m, (e as Error).message);
      }
      if (m.reply) m.respond(new Uint8Array(0));
    },
  });
}
