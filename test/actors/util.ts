// Helpers for the actor-runtime tests: adapter configs on the demo data, and a run that captures
// every adapter's final state (params and AdamW moments) through the supervisor's finish hook.
import { parseAdapterConfig, type AdapterConfig, type AdapterConfigInput } from '../../lib/config.js';
import { Supervisor, type StartOptions } from '../../actors/index.js';
import type { JobEvent } from '../../actors/protocol.js';
import type { AdapterState } from '../../lib/lora/state.js';
import { demo } from '../support/files.js';

/** A small adapter job: 4 steps of 2 micro-batches (dropout on, so masks must line up too). */
export function adapter(name: string, data: string, over: Partial<AdapterConfigInput> = {}): AdapterConfig {
  return parseAdapterConfig({
    name,
    data: demo(data),
    seq_len: 256,
    batch_size: 4,
    micro_batch_size: 2,
    max_steps: 4,
    seed: name.length * 11 + 3,
    lora: { r: 4, alpha: 8, dropout: 0.1, targets: ['q_proj', 'v_proj', 'o_proj', 'down_proj'] },
    optimizer: { lr: 5e-3, weight_decay: 0.01 },
    max_grad_norm: 1.0,
    ...over,
  });
}

export interface RunResult {
  states: Map<string, AdapterState>;
  events: JobEvent[];
  sup: Supervisor;
  /** Each stage's most used bytes over the run. */
  peaks: number[];
}

/** The faults a supervisor reports, as "kind on stage: detail" lines, and the onFault hook that records them. */
export function faultLog(): { faults: string[]; onFault: NonNullable<StartOptions['onFault']> } {
  const faults: string[] = [];
  return { faults, onFault: (f) => faults.push(`${f.fault} on ${f.stage}: ${f.detail}`) };
}

/** Captures each finished adapter's full state (the finish hook sees it just before removal). */
export function captureFinals(sup: Supervisor): Map<string, AdapterState> {
  const states = new Map<string, AdapterState>();
  sup.hooks.finish = async (job, state) => {
    states.set(job.name, state);
    return '';
  };
  return states;
}

/** Starts a supervisor, submits the jobs, waits for all of them, closes it. */
export async function runJobs(o: StartOptions, jobs: AdapterConfig[]): Promise<RunResult> {
  const events: JobEvent[] = [];
  const sup = await Supervisor.start({ ...o, onEvent: (ev) => events.push(ev) });
  const states = captureFinals(sup);
  let peaks: number[] = [];
  try {
    for (const j of jobs) sup.submit(j);
    await sup.drain();
    peaks = (await sup.pipeline.memory()).map((m) => m.peak);
  } finally {
    await sup.close();
  }
  return { states, events, sup, peaks };
}
