// The micro-batch route: a micro-batch starts on stage 0 and this thread hears only when it is
// through. At launch it takes every slot the micro-batch will use (its meta slot with tokens,
// positions, targets and weights; the hidden states between stages; the gradient that travels
// back; the head share's final hidden states) and names them in stage 0's Forward: each stage
// then passes it on to the next by itself (ForwardMsg.hidden), over the channel between the two
// workers, so a busy scheduler never delays a hop. The last stage turns the Forward into a
// Backward (or, with a head share, sends the stage before a HeadMsg first); stage 0's 'done'
// after its Backward (the last stage's after an evaluation) finishes the micro-batch: the
// per-row losses are read from the meta slot and its slots are free again.
import type { StagePlan } from '../lib/model/batch.js';
import type { MicroBatchData } from '../lib/model/batch.js';
import { metaLayout, Slab, SlotAllocator, SlotKind } from './shm.js';
import type { ForwardMsg } from './protocol.js';

export interface InFlight {
  data: MicroBatchData;
  train: boolean;
  resolve: (losses: Float32Array) => void;
  reject: (e: Error) => void;
  meta: number;
  /** acts[s] = slot holding stage s's output (hidden states), S-1 of them; taken at launch, as the stages pass the micro-batch on by themselves */
  acts: number[];
  grad: number;
  /** The final hidden states the last stage hands its head share (-1: no share) */
  head: number;
}

/**
 * The first row of a micro-batch's head share: rows from there on hold about `share` of its
 * targeted rows (the head runs on targeted rows only, so that is the share of its cost).
 */
export function shareStart(targets: Int32Array, share: number): number {
  let T = 0;
  for (let i = 0; i < targets.length; i++) if (targets[i]! >= 0) T++;
  const want = Math.round(share * T);
  let r = targets.length;
  for (let k = 0; k < want;) if (targets[--r]! >= 0) k++;
  return r;
}

export class Router {
  readonly slots: SlotAllocator;
  private readonly flights = new Map<number, InFlight>();

  constructor(
    readonly slab: Slab,
    private readonly plans: StagePlan[],
    private readonly hiddenSize: number,
    private readonly maxTokens: number,
    /** Posts a Forward to stage 0. */
    private readonly toFirst: (m: ForwardMsg) => void,
  ) {
    this.slots = new SlotAllocator(slab);
  }

  /** Stage 0's Forward; every slot the micro-batch will use is taken now (the stages pass it on themselves). */
  private forwardMsg(f: InFlight, epoch: number, version: (adapter: number) => number): ForwardMsg {
    const S = this.plans.length;
    const d = f.data;
    const versions: Record<number, number> = {};
    for (const seg of d.segments) versions[seg.adapter] = version(seg.adapter);
    for (let s = 0; s < S - 1; s++) f.acts[s] = this.slots.take(d.id);
    if (S > 1 && f.train) f.grad = this.slots.take(d.id);
    const share = f.train && S > 1 ? (this.plans[S - 2]!.headShare ?? 0) : 0;
    if (share > 0) f.head = this.slots.take(d.id);
    const N = d.tokens.length;
    return {
      type: 'forward',
      epoch,
      mb: d.id,
      numTokens: N,
      nseq: d.cuSeqlens.length - 1,
      segments: d.segments,
      versions,
      metaSlot: f.meta,
      inSlot: -1,
      outSlot: S > 1 ? f.acts[0]! : f.grad,
      hidden: f.acts.slice(0, S - 1),
      gradSlot: f.grad,
      train: f.train,
      headRow: share > 0 ? shareStart(d.targets, share) : N,
      headSlot: f.head,
    };
  }

  /**
   * Starts a micro-batch on stage 0 (recovery epoch `epoch`; each adapter's Forward waits on
   * every stage for optimizer version `version(adapter)`); resolves with its per-row losses.
   */
  launch(
    data: MicroBatchData,
    train: boolean,
    epoch: number,
    version: (adapter: number) => number,
  ): Promise<Float32Array> {
    return new Promise((resolve, reject) => {
      const N = data.tokens.length;
      const L = metaLayout(N, data.cuSeqlens.length - 1);
      if (L.bytes > this.slab.dataBytes || N * this.hiddenSize * 4 > this.slab.dataBytes) {
        reject(
          new Error(
            `micro-batch ${data.id} has ${N} tokens, more than the ${this.maxTokens} the shared slots were sized for`,
          ),
        );
        return;
      }
      const meta = this.slots.take(data.id);
      this.slab.i32(meta, L.tokens, N).set(data.tokens);
      this.slab.i32(meta, L.positions, N).set(data.positions);
      this.slab.i32(meta, L.targets, N).set(data.targets);
      this.slab.f32(meta, L.weights, N).set(data.weights);
      this.slab.i32(meta, L.cuSeqlens, data.cuSeqlens.length).set(data.cuSeqlens);
      this.slab.seal(meta, data.id, SlotKind.META, L.bytes, 0);
      const f: InFlight = { data, train, resolve, reject, meta, acts: this.plans.map(() => -1), grad: -1, head: -1 };
      this.flights.set(data.id, f);
      this.toFirst(this.forwardMsg(f, epoch, version));
    });
  }

  /** Micro-batch `mb` is through: its losses go to its caller, its slots are free. */
  done(mb: number): void {
    const f = this.flights.get(mb);
    if (!f) return;
    const N = f.data.tokens.length;
    const L = metaLayout(N, f.data.cuSeqlens.length - 1);
    const losses = this.slab.f32(f.meta, L.losses, N).slice();
    this.release(f);
    f.resolve(losses);
  }

  /** Micro-batch `mb` failed: its caller hears `e`. */
  fail(mb: number, e: Error): void {
    const f = this.flights.get(mb);
    if (!f) return;
    this.release(f);
    f.reject(e);
  }

  /** Every micro-batch in flight, its slots freed (a recovery replays them); their callers still wait. */
  releaseAll(): InFlight[] {
    const all = [...this.flights.values()];
    for (const f of all) this.release(f);
    return all;
  }

  /** The micro-batches in flight now. */
  inFlight(): MicroBatchData[] {
    return [...this.flights.values()].map((f) => f.data);
  }

  /** Every caller still waiting hears `e` (the pipeline was closed). */
  rejectAll(e: Error): void {
    for (const f of this.flights.values()) f.reject(e);
    this.flights.clear();
  }

  private freeSlot(acts: number[], i: number): void {
    if (acts[i]! >= 0) {
      this.slots.release(acts[i]!);
      acts[i] = -1;
    }
  }

  private release(f: InFlight): void {
    this.flights.delete(f.data.id);
    for (let i = 0; i < f.acts.length; i++) this.freeSlot(f.acts, i);
    if (f.grad >= 0) this.slots.release(f.grad);
    f.grad = -1;
    if (f.head >= 0) this.slots.release(f.head);
    f.head = -1;
    this.slots.release(f.meta);
  }
}
