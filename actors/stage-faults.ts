// Fault injection inside a stage actor (lib/faults.ts), applied for real: a crash ends the
// worker thread, a hang blocks its event loop, an out-of-memory fails the micro-batch it hits,
// corruption flips bytes of a slot after it was sealed, a slow stage sleeps in proportion to its
// work. Which faults have fired is shared with the pipeline (InitMsg.faultFlags), which restarts
// a stage without them.
import type { FaultSpec } from '../lib/faults.js';
import { ErrorCode, MloraError } from '../lib/errors.js';
import { clockMs } from './clock.js';
import type { Slab } from './shm.js';

export class StageFaults {
  private readonly flags: Int32Array;

  constructor(
    private readonly faults: FaultSpec[],
    flags: SharedArrayBuffer | undefined,
    private readonly stage: number,
  ) {
    this.flags = new Int32Array(flags ?? new SharedArrayBuffer(4 * Math.max(1, faults.length)));
  }

  private fired(f: FaultSpec): boolean {
    return Atomics.load(this.flags, this.faults.indexOf(f)) === 1;
  }

  private fire(f: FaultSpec): void {
    Atomics.store(this.flags, this.faults.indexOf(f), 1);
  }

  private mine(f: FaultSpec): boolean {
    return f.stage === undefined || f.stage === this.stage;
  }

  /**
   * Applies the fault specs due at the message after `handled` ones: a fault fires once, at the
   * first message at or after its `after` count where it can (crash and hang: any message; oom:
   * a micro-batch message, the one that is given back). Returns the slowdown factor.
   */
  inject(handled: number, microBatch: boolean, device: string): number {
    let factor = 1;
    for (const f of this.faults) {
      if (!this.mine(f)) continue;
      if (f.kind === 'slow') factor = f.factor ?? 2;
      if (f.after === undefined || handled + 1 < f.after || this.fired(f)) continue;
      if (f.kind === 'crash') {
        this.fire(f);
        process.exit(70); // ends this worker thread only
      }
      if (f.kind === 'hang')
        for (this.fire(f); ;) {
          /* a hung kernel: no heartbeats, no replies */
        }
      if (f.kind === 'oom' && microBatch) {
        this.fire(f);
        throw new MloraError(ErrorCode.OutOfMemory, `device ${device}: out of memory (injected fault)`);
      }
    }
    return factor;
  }

  /** Flips bytes in an outgoing slot after it was sealed (a corrupt:stage=S,after=N fault that is due). */
  corruptAfter(handled: number, slab: Slab, slot: number): void {
    for (const f of this.faults) {
      if (f.kind !== 'corrupt' || !this.mine(f) || handled + 1 < f.after! || this.fired(f)) continue;
      this.fire(f);
      const bytes = new Uint8Array(slab.sab, slab.dataOffset(slot), 64);
      for (let i = 0; i < bytes.length; i += 7) bytes[i] ^= 0x5a;
    }
  }
}

/** A slow stage (fault kind 'slow'): the work that began at `start` takes `factor` times as long. */
export async function slowDown(start: number, factor: number): Promise<void> {
  if (factor <= 1) return;
  const ms = (clockMs() - start) * (factor - 1);
  await new Promise((r) => setTimeout(r, ms));
}
