// The cluster's registry of stage hosts: a NATS KV bucket (JetStream) with one key per host,
// holding its devices (name, kind, memory, threads) and whether each is claimed by a run. The
// bucket's TTL is the lease: a host puts its record again every lease/3, so a host that died,
// hangs or lost its link vanishes from the bucket within one lease.
import { jetstreamManager, type JetStreamManager } from '@nats-io/jetstream';
import { Kvm, type KV } from '@nats-io/kv';
import type { NatsConnection } from '@nats-io/transport-node';
import type { Slab } from '../shm.js';
import { SlotField } from '../shm.js';

export const BUCKET = 'mlora_hosts';
export const DEFAULT_LEASE_MS = 15_000;

export interface DeviceRecord {
  /** The device on its host (cpu:0, cuda:1). */
  device: string;
  kind: 'cpu' | 'cuda';
  /** Byte budget the host gives a stage on this device. */
  memory: number;
  threads: number;
  /** Where a supervisor talks to it. */
  subject: string;
  /** The run that claimed it (absent: free). */
  claimedBy?: string;
}

export interface HostRecord {
  name: string;
  devices: DeviceRecord[];
  /** ms since the epoch at the last renewal (for --dry-run's listing). */
  renewed: number;
  version: string;
}

/** A registered device as a supervisor addresses it: host/device. */
export interface ClusterDevice extends DeviceRecord {
  host: string;
  /** host/device */
  id: string;
  /** The host's last renewal (its clock, ms since the epoch). */
  renewed: number;
}

export async function openRegistry(nc: NatsConnection, leaseMs = DEFAULT_LEASE_MS): Promise<KV> {
  const kvm = new Kvm(nc);
  try {
    return await kvm.create(BUCKET, { ttl: leaseMs, history: 1 });
  } catch (e) {
    // the bucket exists with its own TTL (another host or run made it): use it as it is
    if (/already in use|exists/i.test((e as Error).message)) return kvm.open(BUCKET);
    throw new Error(
      `cannot open the cluster's KV bucket '${BUCKET}' (is JetStream enabled in the nats-server config?): ${(e as Error).message}`,
    );
  }
}

/** A subject token from a host or device name (NATS subjects split on '.'). */
export function subjectToken(s: string): string {
  return s.replace(/[^A-Za-z0-9_-]/g, '_');
}

const managers = new WeakMap<NatsConnection, JetStreamManager>();

/**
 * Every registered device, in host order. The keys come from one stream-info request (the
 * subjects the bucket's stream holds), not from a key-listing consumer: that one can wait
 * forever when records expire while it runs, and leases make records expire all the time.
 */
export async function listDevices(nc: NatsConnection, kv: KV): Promise<ClusterDevice[]> {
  let jsm = managers.get(nc);
  if (!jsm) managers.set(nc, (jsm = await jetstreamManager(nc)));
  const prefix = `$KV.${BUCKET}.`;
  const info = await jsm.streams.info(`KV_${BUCKET}`, { subjects_filter: `${prefix}>` });
  const names = Object.keys(info.state.subjects ?? {})
    .map((k) => k.slice(prefix.length))
    .sort();
  const out: ClusterDevice[] = [];
  for (const k of names) {
    const e = await kv.get(k);
    if (!e || e.operation !== 'PUT' || !e.value.length) continue;
    const rec = e.json<HostRecord>();
    for (const d of rec.devices)
      out.push({ ...d, host: rec.name, id: `${rec.name}/${d.device}`, renewed: rec.renewed });
  }
  return out;
}

/**
 * The bytes of a slot that cross a link: its header after the STATE word (owned by the
 * supervisor's allocator) and its data; or, given `range` ([offset in the slot, bytes]), only
 * those (rows a stage wrote into a slot it does not seal).
 */
export function slotWire(slab: Slab, slot: number, range?: [number, number]): { offset: number; bytes: Uint8Array } {
  if (range) return { offset: range[0], bytes: new Uint8Array(slab.sab, slot * slab.slotBytes + range[0], range[1]) };
  const len = slab.get(slot, SlotField.BYTES);
  if (len < 0 || len > slab.dataBytes) throw new Error(`slot ${slot} claims ${len} data bytes (of ${slab.dataBytes})`);
  const offset = 4;
  return { offset, bytes: new Uint8Array(slab.sab, slot * slab.slotBytes + offset, 64 - offset + len) };
}

/** The receiving side's view for a chunk of slot bytes (bounds checked: a bad header is an error, never a write elsewhere). */
export function slotSink(slab: () => Slab | undefined) {
  return (slot: number, offset: number, length: number): Uint8Array => {
    const s = slab();
    if (!s) throw new Error('slot data before init');
    if (!Number.isInteger(slot) || slot < 0 || slot >= s.count)
      throw new Error(`slot ${slot} out of range (${s.count} slots)`);
    if (offset < 4 || offset + length > s.slotBytes)
      throw new Error(`bytes ${offset}..${offset + length} outside slot ${slot} (${s.slotBytes} bytes)`);
    return new Uint8Array(s.sab, slot * s.slotBytes + offset, length);
  };
}
