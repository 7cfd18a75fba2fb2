// Where the stages run: devices, threads and byte budgets per stage and the layer split, on this
// machine (resolveLayout) or on a cluster's registered devices (clusterLayout). What --dry-run
// prints, and what start.ts opens the pipeline with.
import { availableParallelism } from 'node:os';
import type { LlamaConfig } from '../../lib/model/config.js';
import type { StagePlan } from '../../lib/model/stage.js';
import { native } from '../../lib/native.js';
import { defaultCpuBudget, parseBytes, parseDeviceSpec } from '../../lib/tensor.js';
import { balanceSplit, explicitSplit, type SplitProfile } from '../../lib/schedule/split.js';
import { Cluster, type ClusterOptions } from '../transport/remote.js';
import type { ClusterDevice } from '../transport/registry.js';

export interface LayoutOptions {
  /** cpu:N / cuda:N per stage, or 'auto' (every GPU; else CPU stages sharing the cores). */
  devices?: string[] | 'auto' | 'cluster';
  /** CPU threads per device (default: the machine's cores shared evenly). */
  threads?: number;
  /** Byte budget per device (e.g. "4GiB"); default: a share of 80% of RAM, or the GPU's free memory. */
  memory?: string | number;
  /** Layers per stage, or 'auto' (cost model). */
  split?: 'auto' | number[];
  /** What the data looks like, for the 'auto' split's cost model (sequence length, fraction of rows with a target). */
  splitProfile?: SplitProfile;
  /**
   * Run the stages on the cluster's stage hosts (`mlora stage serve`): a nats:// URL with
   * credentials, or the options. `devices` then names registered devices (host/cpu:0) or is
   * 'cluster' (every free registered device).
   */
  cluster?: string | ClusterOptions;
}

export interface ResolvedLayout {
  devices: string[];
  threads: number[];
  budgets: number[];
  plans: StagePlan[];
}

/** The layer split over devices with these threads: the cost model's ('auto'), or the one given. */
function splitLayers(
  config: LlamaConfig,
  threads: number[],
  o: Pick<LayoutOptions, 'split' | 'splitProfile'>,
): StagePlan[] {
  const plans =
    !o.split || o.split === 'auto'
      ? balanceSplit(config, threads, o.splitProfile).plans
      : explicitSplit(config, o.split);
  if (plans.length !== threads.length)
    throw new Error(`pipeline.split has ${plans.length} stages for ${threads.length} devices`);
  return plans;
}

/** Devices, threads, budgets and the layer split for a model (what --dry-run prints). */
export function resolveLayout(
  config: LlamaConfig,
  o: Pick<LayoutOptions, 'devices' | 'threads' | 'memory' | 'split' | 'splitProfile'>,
): ResolvedLayout {
  const cores = availableParallelism();
  let devices: string[];
  if (!o.devices || o.devices === 'auto') {
    const n = native().info().cuda.devices;
    if (n > 0) devices = Array.from({ length: Math.min(n, config.numLayers) }, (_, i) => `cuda:${i}`);
    else devices = Array.from({ length: Math.max(1, Math.min(cores, config.numLayers, 8)) }, (_, i) => `cpu:${i}`);
  } else if (o.devices === 'cluster')
    throw new Error("devices: 'cluster' needs a cluster to run on (--cluster nats://...)");
  else devices = o.devices;
  if (!devices.length) throw new Error('no devices given');
  const seen = new Set<string>();
  for (const d of devices) {
    parseDeviceSpec(d);
    if (seen.has(d)) throw new Error(`device ${d} is listed twice`);
    seen.add(d);
  }
  const cpuCount = devices.filter((d) => d.startsWith('cpu')).length;
  const threads = devices.map((d) =>
    d.startsWith('cpu') ? (o.threads ?? Math.max(1, Math.floor(cores / Math.max(1, cpuCount)))) : 1,
  );
  const budgets = devices.map((d) =>
    o.memory !== undefined ? parseBytes(o.memory) : d.startsWith('cpu') ? defaultCpuBudget(cpuCount) : 0,
  );
  return { devices, threads, budgets, plans: splitLayers(config, threads, o) };
}

/**
 * The layout on registered cluster devices: each device's budget and threads are what its host
 * registered (--memory / --threads still override), the split balances the threads.
 */
export function clusterLayout(
  config: LlamaConfig,
  devices: ClusterDevice[],
  o: Pick<LayoutOptions, 'threads' | 'memory' | 'split' | 'splitProfile'>,
): ResolvedLayout {
  if (!devices.length) throw new Error('no devices given');
  const ids = devices.map((d) => d.id);
  const dup = ids.find((d, i) => ids.indexOf(d) !== i);
  if (dup) throw new Error(`device ${dup} is listed twice`);
  const threads = devices.map((d) => o.threads ?? d.threads);
  const budgets = devices.map((d) => (o.memory !== undefined ? parseBytes(o.memory) : d.memory));
  return { devices: ids, threads, budgets, plans: splitLayers(config, threads, o) };
}

/** Connects to the cluster and places the stages on its registered devices (what --dry-run prints with --cluster). */
export async function resolveClusterLayout(
  config: LlamaConfig,
  o: Pick<LayoutOptions, 'cluster' | 'devices' | 'threads' | 'memory' | 'split' | 'splitProfile'>,
) {
  const cluster = await Cluster.connect(typeof o.cluster === 'string' ? { url: o.cluster } : o.cluster!);
  try {
    const devs = await cluster.resolve(
      !o.devices || o.devices === 'auto' || o.devices === 'cluster' ? 'cluster' : o.devices,
    );
    const layout = clusterLayout(config, devs, o);
    cluster.placement.push(...devs.slice(0, layout.plans.length));
    return { cluster, layout };
  } catch (e) {
    await cluster.close();
    throw e;
  }
}
