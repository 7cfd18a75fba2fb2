/**
 * A monotonic clock in ms shared by every thread of the process (CLOCK_MONOTONIC via
 * process.hrtime), unlike performance.now(), whose origin is each worker thread's own start:
 * the pipeline and its stages stamp schedule records on it (InitMsg.originMs).
 */
export function clockMs(): number {
  return Number(process.hrtime.bigint()) / 1e6;
}
