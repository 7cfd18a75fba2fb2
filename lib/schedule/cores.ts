// Which cores each CPU stage computes on, when asked to pin (MLORA_PIN_CORES=1). Every CPU
// device already computes on a thread of its own (native/src/core/thread_pool.h), which is what
// keeps two stages off each other's core; pinning on top gains a little more on a machine this
// run has to itself, but is off by default: two processes that each pin their stages to the
// first cores would share those and leave the rest idle. When the CPU stages' threads fit in the
// cores the process may use, each stage gets its own, in stage order; else nothing is pinned.
// A pinned stage's JS thread shares its compute thread's core(s): its work falls between the
// stage's own op lists, and never on the neighbour stage's core.

/** `MLORA_PIN_CORES=1` pins each local CPU stage's threads to cores of its own. */
export function pinningEnabled(env: NodeJS.ProcessEnv = process.env): boolean {
  const v = env.MLORA_PIN_CORES;
  if (v === undefined || v === '' || v === '0') return false;
  if (v === '1') return true;
  throw new Error(`MLORA_PIN_CORES='${v}': expected 1 (pin each stage's threads to cores of its own) or 0`);
}

/**
 * One list of CPU ids per stage (one id per thread; empty for a non-CPU stage), or undefined
 * when the CPU stages need more threads than `allowed` has cores.
 */
export function assignCores(devices: string[], threads: number[], allowed: number[]): number[][] | undefined {
  const cpu = devices.map((d) => d.trim().startsWith('cpu'));
  const need = threads.reduce((a, t, i) => a + (cpu[i] ? t : 0), 0);
  if (need === 0 || need > allowed.length) return undefined;
  let next = 0;
  return threads.map((t, i) => (cpu[i] ? allowed.slice(next, (next += t)) : []));
}
