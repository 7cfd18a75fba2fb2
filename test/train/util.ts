// Helpers for the trainer tests: a cached tiny model, small datasets cut from data/demo,
// and one supervisor run (in-process, cpu:0) that collects every event and the adapters it
// wrote (final PEFT adapter + every checkpoint) as flat Float32Arrays.
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { ensureModel } from '../../scripts/cli/make-model.js';
import { Supervisor, type StartOptions } from '../../actors/supervisor.js';
import { parseAdapterConfig, type AdapterConfig, type AdapterConfigInput } from '../../lib/config.js';
import { loadAdapter } from '../../lib/io/peft.js';
import { openModelDir } from '../../lib/io/hf-model.js';
import { listCheckpoints, loadCheckpoint } from '../../lib/io/checkpoint.js';
import { fromAdapterWeights } from '../../lib/lora/state.js';
import { loraSpec } from '../../actors/jobs.js';
import type { JobEvent } from '../../actors/protocol.js';
import type { AdapterState } from '../../lib/lora/state.js';

const here = path.dirname(fileURLToPath(import.meta.url));
export const repo = path.resolve(here, '../../..');

/** The tiny preset model (2 layers, hidden 64, vocab 512), made once per machine. */
export function tinyModel(seed = 7): Promise<string> {
  return ensureModel(path.join(os.tmpdir(), 'mlora-test-models'), 'tiny', seed);
}

export function tmpDir(t: { teardown(fn: () => void): void }, prefix = 'mlora-train-'): string {
  const d = fs.mkdtempSync(path.join(os.tmpdir(), prefix));
  t.teardown(() => fs.rmSync(d, { recursive: true, force: true }));
  return d;
}

/** The first `n` records of a demo dataset, written to dir/<name>-<n>.jsonl. */
export function demoData(dir: string, name: 'arithmetic' | 'capitals' | 'reverse' | 'sentiment', n: number): string {
  const lines = fs.readFileSync(path.join(repo, 'data/demo', `${name}.jsonl`), 'utf8').split('\n').filter(Boolean).slice(0, n);
  const file = path.join(dir, `${name}-${n}.jsonl`);
  fs.writeFileSync(file, lines.join('\n') + '\n');
  return file;
}

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
export async function run(model: string, adapters: AdapterConfigInput[], o: Partial<StartOptions> = {}): Promise<RunResult> {
  const events: JobEvent[] = [];
  const sup = await Supervisor.start({ ...RUN_DEFAULTS, model, ...o, onEvent: (e) => events.push(e) });
  try {
    for (const a of adapters) sup.submit(parseAdapterConfig(a));
    await sup.drain();
  } finally {
    await sup.close();
  }
  const messages = sup.pipeline.schedule().filter((r) => r.kind === 'F').map((r) => r.adapters);
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
export function readCheckpoints(model: string, cfg: AdapterConfigInput, output: string): Array<{ step: number; state: AdapterState }> {
  const c: AdapterConfig = parseAdapterConfig(cfg);
  const config = openModelDir(model).config;
  return listCheckpoints(path.join(output, c.name))
    .filter((e) => e.complete)
    .map((e) => ({ step: e.step, state: loadCheckpoint(e.dir, config, loraSpec(c)).state }));
}

/** Max |a - b| (Infinity on a length mismatch or NaN). */
export function maxDiff(a: ArrayLike<number>, b: ArrayLike<number>): number {
  if (a.length !== b.length) return Infinity;
  let m = 0;
  for (let i = 0; i < a.length; i++) {
    const d = Math.abs(a[i]! - b[i]!);
    if (!(d <= m)) m = Number.isNaN(d) ? Infinity : d;
  }
  return m;
}

/** True when the two arrays hold the same float32 bit patterns. */
export function bitwiseEqual(a: Float32Array, b: Float32Array): boolean {
  if (a.length !== b.length) return false;
  const x = new Uint32Array(a.buffer, a.byteOffset, a.length);
  const y = new Uint32Array(b.buffer, b.byteOffset, b.length);
  for (let i = 0; i < x.length; i++) if (x[i] !== y[i]) return false;
  return true;
}
