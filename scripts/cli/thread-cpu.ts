// Where this process's CPU time went, by kind of thread: the benchmarks' account of the cores
// (how much of them computed, how much ran JavaScript, how long the compute threads waited for a
// core). Read from Linux's per-thread scheduler counters (/proc/self/task/<tid>/schedstat: time
// on a CPU and time runnable but waiting, in ns); the native core names its threads
// ("mlora cpu:0" a device's compute thread, "mlora cpu:0/1" its helpers, "mlora stage 0" a stage
// actor's JavaScript thread: lib/native.ts nameThread); the machine's idle time from /proc/stat.
// Elsewhere than Linux: empty.
import fs from 'node:fs';

/** Kinds of thread the account tells apart. */
export type ThreadKind = 'compute' | 'stage JS' | 'main JS' | 'other';

export interface ThreadTime {
  /** ms on a CPU */
  runMs: number;
  /** ms runnable but waiting for a CPU (other threads of this process, or other processes, held it) */
  waitMs: number;
}

function kindOf(tid: number, name: string): ThreadKind {
  if (tid === process.pid) return 'main JS';
  if (name.startsWith('mlora stage')) return 'stage JS';
  if (name.startsWith('mlora cpu')) return 'compute';
  return 'other'; // V8's GC and platform threads, libuv's pool, the inspector
}

/** Each kind's time summed over the live threads now (a thread that ended is no longer counted). */
export function threadTimes(): Map<ThreadKind, ThreadTime> {
  const out = new Map<ThreadKind, ThreadTime>();
  let tids: string[];
  try {
    tids = fs.readdirSync('/proc/self/task');
  } catch {
    return out;
  }
  for (const t of tids) {
    try {
      const [run, wait] = fs.readFileSync(`/proc/self/task/${t}/schedstat`, 'utf8').split(' ').map(Number);
      const name = fs.readFileSync(`/proc/self/task/${t}/comm`, 'utf8').trim();
      const k = kindOf(Number(t), name);
      const acc = out.get(k) ?? { runMs: 0, waitMs: 0 };
      acc.runMs += run! / 1e6;
      acc.waitMs += wait! / 1e6;
      out.set(k, acc);
    } catch {
      /* the thread ended while we read */
    }
  }
  return out;
}

/** What each kind of thread used between two threadTimes() (kinds absent from `after` are left out). */
export function threadTimesSince(
  before: Map<ThreadKind, ThreadTime>,
  after: Map<ThreadKind, ThreadTime>,
): Map<ThreadKind, ThreadTime> {
  const out = new Map<ThreadKind, ThreadTime>();
  for (const [k, a] of after) {
    const b = before.get(k) ?? { runMs: 0, waitMs: 0 };
    out.set(k, { runMs: a.runMs - b.runMs, waitMs: a.waitMs - b.waitMs });
  }
  return out;
}

/**
 * The machine's idle time and the time its hypervisor gave its CPUs to others (steal), in ms
 * summed over CPUs, from /proc/stat (clock ticks: 10 ms); zeros elsewhere than Linux.
 */
export function machineIdle(): { idleMs: number; stealMs: number } {
  try {
    const f = fs.readFileSync('/proc/stat', 'utf8').split('\n')[0]!.trim().split(/\s+/).slice(1).map(Number);
    // user nice system idle iowait irq softirq steal
    return { idleMs: 10 * (f[3]! + f[4]!), stealMs: 10 * (f[7] ?? 0) };
  } catch {
    return { idleMs: 0, stealMs: 0 };
  }
}
