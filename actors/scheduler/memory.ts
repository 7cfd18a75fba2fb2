// The scheduler's memory ledger, per stage (bytes). `restFree` is what is free when no
// micro-batch is in flight: the budget less the base weights, the scratch and the adapters on
// the stage. It is measured at rest and kept exact between measurements by adding and taking
// each adapter's bytes as it leaves or joins: taken before the stages allocate them, given back
// after the stages have freed them, so admission never spends bytes a stage holds. In-flight
// micro-batches hold `reserved` (what they keep between their calls on a stage) plus the largest
// of their `transient` bytes (what a call holds while it runs: a stage runs one call at a time);
// `promised` is held back for the waiting job that placement serves next, so micro-batches
// cannot take it.
//
// The ledger only counts: placement (placement.ts) and admission (admission.ts) decide with it,
// and the pipeline's memory() and *Bytes() estimates feed it.

export class MemoryLedger {
  /** Free bytes per stage with nothing in flight; undefined until the first measure(). */
  restFree: number[] | undefined;
  /** Bytes the micro-batches in flight keep between their calls, per stage. */
  private reserved: number[] = [];
  /** Per micro-batch in flight: the bytes each stage holds only while it runs that message. */
  private readonly transient = new Map<number, number[]>();
  /** Held back for the waiting job placement serves next. */
  promised: number[] = [];
  /** Adapter bytes per stage of each job whose adapter is on the stages. */
  private readonly resident = new Map<number, number[]>();

  /** Takes what is free on each stage; only exact when nothing is in flight. */
  measure(mem: Array<{ budget: number; used: number }>): void {
    this.restFree = mem.map((m) => m.budget - m.used);
    if (this.reserved.length !== mem.length) this.reserved = mem.map(() => 0);
    this.promised = mem.map(() => 0);
  }

  /** Bytes the micro-batches in flight hold at most on stage s (their own, and one call's transient bytes). */
  inUse(s: number): number {
    return this.reserved[s]! + this.peakTransient(s);
  }

  /** The largest transient bytes of the micro-batches in flight on stage s (one call runs at a time). */
  private peakTransient(s: number): number {
    let peak = 0;
    for (const t of this.transient.values()) peak = Math.max(peak, t[s]!);
    return peak;
  }

  /** Whether a micro-batch that keeps `held` and runs with `transient` more bytes fits on stage s. */
  fits(s: number, held: number, transient: number): boolean {
    return (
      this.reserved[s]! + held + Math.max(this.peakTransient(s), transient) <= this.restFree![s]! - this.promised[s]!
    );
  }

  /** Free for micro-batches on stage s at rest: what is not promised to a waiting job. */
  unpromised(s: number): number {
    return this.restFree![s]! - this.promised[s]!;
  }

  /** A micro-batch is launched: it holds `reserve` until it is done, and `transient` while a stage runs it. */
  hold(mb: number, reserve: number[], transient: number[]): void {
    reserve.forEach((b, s) => (this.reserved[s]! += b));
    this.transient.set(mb, transient);
  }

  /** The micro-batch is done (or failed): its bytes come back. */
  release(mb: number, reserve: number[]): void {
    reserve.forEach((b, s) => (this.reserved[s]! -= b));
    this.transient.delete(mb);
  }

  /** Sum over the adapters on the stages, per stage. */
  residentBytes(stages: number): number[] {
    const sum = new Array<number>(stages).fill(0);
    for (const b of this.resident.values()) b.forEach((x, s) => (sum[s]! += x));
    return sum;
  }

  isResident(job: number): boolean {
    return this.resident.has(job);
  }

  /** The adapter bytes per stage of a job on the stages. */
  residentOf(job: number): number[] | undefined {
    return this.resident.get(job);
  }

  /**
   * A job's adapter is joining the stages: its bytes are taken before they are asked to allocate
   * it (they do, ahead of the micro-batches queued there, while admission goes on).
   */
  addResident(job: number, bytes: number[]): void {
    this.resident.set(job, bytes);
    bytes.forEach((b, s) => (this.restFree![s]! -= b));
  }

  /**
   * A job's adapter is leaving: it no longer counts as resident. Its bytes come back with
   * giveBack() once the stages have freed them (not before: admission must not spend them early).
   */
  dropResident(job: number): number[] | undefined {
    const bytes = this.resident.get(job);
    this.resident.delete(job);
    return bytes;
  }

  giveBack(bytes: number[]): void {
    bytes.forEach((b, s) => (this.restFree![s]! += b));
  }
}
