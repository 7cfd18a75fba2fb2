// The shared-memory slab through which activations and activation gradients cross stages.
// One SharedArrayBuffer holds `count` fixed-size slots. Each slot starts with a header of
// named Int32 fields, then the data region (64-byte aligned). A slot has exactly one owner
// at a time: ownership moves with the message that names the slot (supervisor → stage →
// next stage → ... → supervisor), and only the supervisor allocates (all of a micro-batch's
// slots when it starts) and frees them (when it is done), so there are never two owners. Stages wrap the data region as native tensors: zero copies between CPU stages.

import { ErrorCode, MloraError } from '../lib/errors.js';
import { native } from '../lib/native.js';
import type { AdapterState } from '../lib/lora/state.js';

/** Header field indices (Int32 words) of a slot. */
export const SlotField = {
  /** 0 = free, 1 = taken */
  STATE: 0,
  /** micro-batch id the slot belongs to */
  MB: 1,
  /** what the data is: see SlotKind */
  KIND: 2,
  /** bytes of data written */
  BYTES: 3,
  /** checksum of the data bytes (FNV-1a over 32-bit words in 8 lanes, seeded with MB and SEQ: Slab.checksum) */
  CHECKSUM: 4,
  /** sequence number of the hand-over (detects a stale slot) */
  SEQ: 5,
  /** number of tokens (rows) */
  ROWS: 6,
  /** number of sequences (meta slots) */
  NSEQ: 7,
} as const;

export const SlotKind = { META: 1, HIDDEN: 2, GRAD: 3 } as const;

export const HEADER_BYTES = 64;

export interface SlabLayout {
  count: number;
  slotBytes: number;
}

/** Bytes a slot needs for micro-batches of up to `maxTokens` tokens. */
export function slotBytesFor(maxTokens: number, hidden: number, maxSeqs = maxTokens): number {
  const hiddenBytes = maxTokens * hidden * 4;
  const metaBytes = metaLayout(maxTokens, maxSeqs).bytes;
  return HEADER_BYTES + Math.ceil(Math.max(hiddenBytes, metaBytes) / 64) * 64;
}

/**
 * The meta slot of a micro-batch: the token-level data every stage needs, plus the losses
 * the last stage writes back. Offsets in bytes from the start of the data region.
 */
export function metaLayout(rows: number, nseq: number) {
  const al = (n: number) => Math.ceil(n / 16) * 16;
  const tokens = 0;
  const positions = tokens + al(rows) * 4;
  const targets = positions + al(rows) * 4;
  const weights = targets + al(rows) * 4;
  const losses = weights + al(rows) * 4;
  const cuSeqlens = losses + al(rows) * 4;
  const bytes = cuSeqlens + al(nseq + 1) * 4;
  return { tokens, positions, targets, weights, losses, cuSeqlens, bytes };
}

export class Slab {
  readonly header: Int32Array;

  constructor(
    readonly sab: SharedArrayBuffer,
    readonly count: number,
    readonly slotBytes: number,
  ) {
    if (slotBytes % 64 !== 0) throw new Error(`slot size ${slotBytes} is not a multiple of 64`);
    if (sab.byteLength < count * slotBytes)
      throw new Error(`slab of ${sab.byteLength} bytes cannot hold ${count} slots of ${slotBytes}`);
    this.header = new Int32Array(sab);
  }

  static create(count: number, slotBytes: number): Slab {
    return new Slab(new SharedArrayBuffer(count * slotBytes), count, slotBytes);
  }

  private field(slot: number, f: number): number {
    return (slot * this.slotBytes) / 4 + f;
  }

  get(slot: number, f: number): number {
    return Atomics.load(this.header, this.field(slot, f));
  }

  set(slot: number, f: number, v: number): void {
    Atomics.store(this.header, this.field(slot, f), v);
  }

  /** Byte offset of a slot's data region in the SharedArrayBuffer. */
  dataOffset(slot: number): number {
    return slot * this.slotBytes + HEADER_BYTES;
  }

  get dataBytes(): number {
    return this.slotBytes - HEADER_BYTES;
  }

  f32(slot: number, byteOffset: number, n: number): Float32Array {
    return new Float32Array(this.sab, this.dataOffset(slot) + byteOffset, n);
  }

  i32(slot: number, byteOffset: number, n: number): Int32Array {
    return new Int32Array(this.sab, this.dataOffset(slot) + byteOffset, n);
  }

  /**
   * FNV-1a over the first `bytes` of the data region, as 32-bit words, seeded with (mb, seq), in
   * 32 interleaved lanes (native/src/cpu/checksum.h). A slot is hashed twice per hop (seal,
   * verify) on the stages' threads, between their kernels: in native code with 4 vector chains
   * it takes ~1/4 of the 8-lane JavaScript loop it replaces.
   */
  checksum(slot: number, bytes: number, mb: number, seq: number): number {
    const w = new Int32Array(this.sab, this.dataOffset(slot), Math.floor(bytes / 4));
    return native().checksum(w, (0x811c9dc5 ^ mb ^ Math.imul(seq, 0x01000193)) | 0);
  }

  seal(slot: number, mb: number, kind: number, bytes: number, seq: number): void {
    this.set(slot, SlotField.MB, mb);
    this.set(slot, SlotField.KIND, kind);
    this.set(slot, SlotField.BYTES, bytes);
    this.set(slot, SlotField.SEQ, seq);
    this.set(slot, SlotField.CHECKSUM, this.checksum(slot, bytes, mb, seq));
  }

  /** Throws when the slot does not hold what the message says (corruption in transit). */
  verify(slot: number, mb: number, kind: number): void {
    const bytes = this.get(slot, SlotField.BYTES);
    const seq = this.get(slot, SlotField.SEQ);
    if (this.get(slot, SlotField.MB) !== mb || this.get(slot, SlotField.KIND) !== kind) {
      throw new SlotCorruption(
        `slot ${slot} holds micro-batch ${this.get(slot, SlotField.MB)} kind ${this.get(slot, SlotField.KIND)}, expected ${mb} kind ${kind}`,
      );
    }
    const want = this.get(slot, SlotField.CHECKSUM);
    const got = this.checksum(slot, bytes, mb, seq);
    if (want !== got)
      throw new SlotCorruption(`slot ${slot} of micro-batch ${mb}: checksum mismatch (data corrupted in transit)`);
  }
}

export class SlotCorruption extends MloraError {
  override name = 'SlotCorruption';
  constructor(message: string) {
    super(ErrorCode.Corrupt, message);
  }
}

/** The supervisor's side: which slots are free. Only the supervisor allocates and frees. */
export class SlotAllocator {
  private readonly free: number[];
  constructor(readonly slab: Slab) {
    this.free = Array.from({ length: slab.count }, (_, i) => slab.count - 1 - i);
  }
  get available(): number {
    return this.free.length;
  }
  take(mb: number): number {
    const s = this.free.pop();
    if (s === undefined) throw new Error('no free shared-memory slot (the admission limit should have prevented this)');
    this.slab.set(s, SlotField.STATE, 1);
    this.slab.set(s, SlotField.MB, mb);
    return s;
  }
  release(slot: number): void {
    if (this.slab.get(slot, SlotField.STATE) !== 1) throw new Error(`slot ${slot} released twice`);
    this.slab.set(slot, SlotField.STATE, 0);
    this.free.push(slot);
  }
  inUse(): number {
    return this.slab.count - this.free.length;
  }
}

/**
 * An adapter's slice on one stage after its latest optimizer step, in a SharedArrayBuffer the
 * stage writes and the supervisor keeps as recovery's snapshot (a step's reply names it: nothing
 * is copied or transferred, no fresh pages are faulted in per step). Two sides, each holding
 * params, m and v (`size` floats each): the step to version v writes side v % 2, so the side of
 * the snapshot the supervisor holds (v - 1) is never written until a later step has replaced it,
 * and a stage that dies in the middle of a step leaves it whole. The buffer outlives the stage's
 * worker.
 */
export interface StageSnapshot {
  /** Shared, or (over a cluster link, which carries no shared memory: compactSnapshot) a copy of one side. */
  buffer: SharedArrayBuffer | ArrayBuffer;
  /** Floats of each field. */
  size: number;
  /** The side holding `version`. */
  side: number;
  version: number;
}

/** The fields of a snapshot side, in order. */
export const SnapshotField = { params: 0, m: 1, v: 2 } as const;
const SNAPSHOT_FIELDS = 3;

/** The buffer for both sides of a slice of `size` floats. */
export function snapshotBuffer(size: number): SharedArrayBuffer {
  return new SharedArrayBuffer(2 * SNAPSHOT_FIELDS * size * 4);
}

/** One field of one side (a view: the memory the stage writes). */
export function snapshotField(
  buffer: SharedArrayBuffer | ArrayBuffer,
  size: number,
  side: number,
  field: keyof typeof SnapshotField,
): Float32Array {
  return new Float32Array(buffer, 4 * size * (SNAPSHOT_FIELDS * side + SnapshotField[field]), size);
}

/** The snapshot's state as views of the shared side (copy it before a later step may write that side). */
export function snapshotViews(s: StageSnapshot): AdapterState {
  const f = (k: keyof typeof SnapshotField) => snapshotField(s.buffer, s.size, s.side, k);
  return { params: f('params'), m: f('m'), v: f('v'), version: s.version };
}

/** A copy of the snapshot's side in memory of its own (side 0): for a wire that carries no shared memory. */
export function compactSnapshot(s: StageSnapshot): StageSnapshot {
  const out: StageSnapshot = {
    buffer: new ArrayBuffer(SNAPSHOT_FIELDS * s.size * 4),
    size: s.size,
    side: 0,
    version: s.version,
  };
  const from = snapshotViews(s);
  const to = snapshotViews(out);
  for (const k of Object.keys(SnapshotField) as Array<keyof typeof SnapshotField>) to[k].set(from[k]);
  return out;
}
