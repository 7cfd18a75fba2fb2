// Which cores each CPU stage computes on. Stage actors of one process share its cores; left to
// the OS, a stage's compute thread is often woken on the core where the other stage is
// computing, and the two then share that core for many milliseconds while the other core idles
// (2 stages × 1 thread on 2 cores: 1.2× one stage instead of nearly 2×). So when the CPU
// stages' threads fit in the cores the process may use, each stage gets its own cores, in stage
// order; when they do not fit, nothing is pinned (the OS balances better than a bad pinning).

/** `MLORA_PIN_CORES=0` turns pinning off (for comparing, or a machine shared with other pinned work). */
export function pinningEnabled(env: NodeJS.ProcessEnv = process.env): boolean {
  const v = env.MLORA_PIN_CORES;
  if (v === undefined || v === '' || v === '1') return true;
  if (v === '0') return false;
  throw new Error(`MLORA_PIN_CORES='${v}': expected 0 (do not pin stage threads to cores) or 1`);
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
