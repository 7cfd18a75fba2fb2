// The control plane: comlink calls from the pipeline to a stage's management API, on a
// MessagePort of their own (InitMsg.control), beside the ordered path of actors/protocol.ts.
//
// Which request goes where, and why:
// - comlink (this file): addAdapter, removeAdapter, exportAdapter, gradSumsq, memory, stats,
//   shutdown.
//   Their order against the micro-batches does not matter: a Forward that names an adapter the
//   stage does not hold yet waits in the mailbox until it is there (ForwardMsg.versions), the
//   scheduler evicts or exports an adapter only when none of its micro-batches is in flight, and
//   the queries read state no Forward or Backward of another adapter writes. The stage still runs
//   each call in its mailbox's control lane (actors/stage.ts), between two messages, so a call
//   never runs beside a kernel of the hot path.
// - the ordered path (actors/protocol.ts, integer ids, replies matched here in the pipeline):
//   Step (an adapter's next Forward waits for it by version, and it must come after the step's
//   last Backward on each stage), Poison (it must take effect before the Forward the scheduler
//   posts right after it, so it travels on the same port), Drop (the barrier of a recovery: it
//   sets the epoch below which the mailbox discards micro-batch messages, and a stage host's relay
//   forgets those micro-batches as it sees it go by) and Link (it hands over a port, which a
//   remote stage keeps on the supervisor's side: actors/transport/remote.ts).
//
// A remote stage (actors/transport/) gets the same port: its endpoint relays what comlink posts
// on it over NATS, in order with the rest, and the host hands it to its worker on a local port.
//
// A call to a stage that died or hangs must not wait forever: the pipeline races every call
// against the stage's failure (recovery rejects it with a coded error) and a timeout
// (actors/stage-workers.ts), and after a restart it wraps the new stage's port afresh.
import { expose, transferHandlers, wrap, type Remote, type TransferHandler } from 'comlink';
import nodeEndpoint from 'comlink/dist/esm/node-adapter.mjs';
import type { MessagePort } from 'node:worker_threads';
import type { LoraSpec } from '../lib/lora/adapter.js';
import type { AdapterState } from '../lib/lora/state.js';
import { errorCode } from '../lib/errors.js';
import type { RunStats } from '../lib/native.js';

/**
 * Where a stage's time went since the last reset: its device's run() calls (lib/native.ts
 * RunStats), the messages it handled and the time it spent handling them (busy; the rest of
 * busy beyond the run() calls is this thread's JavaScript: views, checks, op lists, replies).
 */
export interface StageStats extends RunStats {
  messages: number;
  busyMs: number;
}

/** A stage's management API (served by actors/stage.ts). */
export interface StageApi {
  /** Puts an adapter's slice of these layers on the stage (its state: params and AdamW moments). */
  addAdapter(adapter: number, spec: LoraSpec, state: AdapterState): Promise<void>;
  removeAdapter(adapter: number): Promise<void>;
  /** The adapter's slice: params, AdamW moments and optimizer version. */
  exportAdapter(adapter: number): Promise<AdapterState>;
  /** Σ grad² of the adapter's slice. */
  gradSumsq(adapter: number): Promise<number>;
  memory(): Promise<{ device: string; budget: number; used: number; peak: number }>;
  /** Where the stage's time went since the last call with reset (benchmarks). */
  stats(reset: boolean): Promise<StageStats>;
  /** Frees the device and closes the stage's ports: its thread then ends by itself. */
  shutdown(): Promise<void>;
}

// comlink sends a thrown Error as its name, message and stack: the code (lib/errors.ts) goes with
// them, so the caller tells an out-of-memory from a bad argument by its code, never by its text.
// Its deserializer copies every field back onto the Error it throws.
const thrown = transferHandlers.get('throw') as TransferHandler<{ value: unknown }, unknown>;
transferHandlers.set('throw', {
  canHandle: (v: unknown): v is { value: unknown } => thrown.canHandle(v),
  serialize(v: { value: unknown }) {
    const [wire, transfer] = thrown.serialize(v);
    const code = errorCode(v.value);
    const w = wire as { isError?: boolean; value: Record<string, unknown> };
    if (code !== undefined && w.isError) w.value.code = code;
    return [wire, transfer];
  },
  deserialize: (wire: unknown) => thrown.deserialize(wire),
} satisfies TransferHandler<{ value: unknown }, unknown>);

/** The stage's side: serves `api` on its control port. */
export function serveStage(api: StageApi, port: MessagePort): void {
  expose(api, nodeEndpoint(port));
}

/** The pipeline's side: the stage's API over the other end of that port. */
export function stageApi(port: MessagePort): Remote<StageApi> {
  return wrap<StageApi>(nodeEndpoint(port));
}
