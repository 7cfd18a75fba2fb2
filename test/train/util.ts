// Helpers for the trainer tests: one supervisor run (in-process, cpu:0) that collects every
// event, and the adapters it wrote (final PEFT adapter + every checkpoint) as flat Float32Arrays.
import path from 'node:path';
import { Supervisor, type StartOptions } from '../../actors/index.js';
import { parseAdapterConfig, type AdapterConfig, type AdapterConfigInput } from '../../lib/config.js';
import { loadAdapter } from '../../lib/io/peft.js';
import { openModelDir } from '../../lib/io/hf-model.js';
import { listCheckpoints, loadCheckpoint } from '../../lib/io/checkpoint.js';
import { fromAdapterWeights } from '../../lib/lora/state.js';
import { loraSpec } from '../../actors/scheduler/prepare.js';
import type { JobEvent } from '../../actors/protocol.js';
import type { AdapterState } from '../../lib/lora/state.js';

export interface RunResult {
  events: JobEvent[];
  /** Step events per adapter name, in order. */
  steps: Map<string, Array<Extract<JobEvent, { type: 'step' }>>>;
  errors: string[];
  sup: Supervisor;
  /** Adapter ids of every micro-batch message that ran (LocalPipeline's schedule records). */
  messages: number[][];
}

export const RUN_DEFAULTS: Partial<StartOptions> = { devices: ['cpu:0'], inProcess: true, threads: 1, memory: '1GiB' };

/** Runs the given adapters to the end in one supervisor; closes it. */
export async function run(
  model: string,
  adapters: AdapterConfigInput[],
  o: Partial<StartOptions> = {},
): Promise<RunResult> {
  const events: JobEvent[] = [];
  const sup = await Supervisor.start({ ...RUN_DEFAULTS, model, ...o, onEvent: (e) => events.push(e) });
  try {
    for (const a of adapters) sup.submit(parseAdapterConfig(a));
    await sup.drain();
  } finally {
    await sup.close();
  }
  const messages = sup.pipeline
    .schedule()
    .filter((r) => r.kind === 'F')
    .map((r) => r.adapters);
  return { events, ...collect(events), sup, messages };
}

export function collect(events: JobEvent[]) {
  const steps = new Map<string, Array<Extract<JobEvent, { type: 'step' }>>>();
  const errors: string[] = [];
  for (const e of events) {
    if (e.type === 'step') {
      if (!steps.has(e.adapter)) steps.set(e.adapter, []);
      steps.get(e.adapter)!.push(e);
    }
    if (e.type === 'error') errors.push(`${e.adapter}: ${e.message}`);
  }
  return { steps, errors };
}

/** The flat params of a PEFT adapter dir, in the layout of the config's spec. */
export function readPeft(model: string, cfg: AdapterConfigInput, dir: string): Float32Array {
  const c = parseAdapterConfig(cfg);
  return fromAdapterWeights(openModelDir(model).config, loraSpec(c), loadAdapter(dir), dir);
}

/** Every complete checkpoint of an adapter under output (step → state), oldest first. */
export function readCheckpoints(
  model: string,
  cfg: AdapterConfigInput,
  output: string,
): Array<{ step: number; state: AdapterState }> {
  const c: AdapterConfig = parseAdapterConfig(cfg);
  const config = openModelDir(model).config;
  return listCheckpoints(path.join(output, c.name))
    .filter((e) => e.complete)
    .map((e) => ({ step: e.step, state: loadCheckpoint(e.dir, config, loraSpec(c)).state }));
}
