// Shared set-up for the fault tests: small tokenized datasets, and one helper that runs a 2-stage
// worker-thread pipeline with faults and returns every adapter's final state, the fault events
// and the job events.
import fs from 'node:fs';
import path from 'node:path';
import { Supervisor } from '../../actors/index.js';
import type { FaultEvent } from '../../actors/runtime.js';
import type { JobEvent } from '../../actors/protocol.js';
import { cloneState, type AdapterState } from '../../lib/lora/state.js';
import type { FaultSpec } from '../../lib/faults.js';
import { parseAdapterConfig, type AdapterConfig } from '../../lib/config.js';
import { Rng } from '../../lib/rng.js';

/** A tokenized JSONL dataset of `n` records of 12–30 random token ids. */
export function writeData(dir: string, name: string, n: number, seed: number, vocab = 500): string {
  const rng = new Rng(seed);
  const lines: string[] = [];
  for (let i = 0; i < n; i++) {
    const len = 12 + Math.floor(rng.uniform() * 19);
    lines.push(
      JSON.stringify({ input_ids: Array.from({ length: len }, () => 3 + Math.floor(rng.uniform() * (vocab - 3))) }),
    );
  }
  const file = path.join(dir, `${name}.jsonl`);
  fs.writeFileSync(file, lines.join('\n') + '\n');
  return file;
}

/**
 * Adapters for the tests: each takes 2 micro-batches per step (gradient accumulation), some
 * with dropout (masks must replay exactly), AdamW with weight decay, clipping on one.
 */
export function adapters(
  dir: string,
  names: string[],
  steps = 4,
  extra: Partial<Record<string, unknown>> = {},
): AdapterConfig[] {
  return names.map((name, i) =>
    parseAdapterConfig({
      name,
      data: writeData(dir, name, 40, 100 + i),
      seq_len: 48,
      batch_size: 4,
      micro_batch_size: 2,
      max_steps: steps,
      seed: 1 + i,
      lora: {
        r: 4,
        alpha: 8,
        dropout: i % 2 ? 0 : 0.1,
        targets: i % 2 ? ['q_proj', 'v_proj', 'down_proj'] : ['q_proj', 'k_proj', 'v_proj', 'o_proj'],
      },
      optimizer: { lr: 5e-3, weight_decay: 0.01 },
      ...(i === 2 ? { max_grad_norm: 0.5 } : {}),
      ...extra,
    }),
  );
}

export interface RunOptions {
  model: string;
  adapters: AdapterConfig[];
  faults?: Array<string | FaultSpec>;
  output?: string;
  resume?: boolean;
  hangTimeoutMs?: number;
  heartbeatMs?: number;
  maxStageFailures?: number;
  inflight?: number;
  /** The frozen base's format (Supervisor.start computeDtype / quantize). */
  quantize?: 'nf4' | 'nf4-dq' | 'int8';
  computeDtype?: 'f32' | 'bf16';
  /** Give up (reject) after this long: a recovery that never ends is a failure, not a hang. */
  timeoutMs?: number;
}

export interface RunResult {
  finals: Map<string, AdapterState>;
  faults: FaultEvent[];
  events: JobEvent[];
  states: Map<string, string>;
  error?: Error;
  ms: number;
  slotsInUse: number;
  sup: Supervisor;
}

export async function run(o: RunOptions): Promise<RunResult> {
  const faults: FaultEvent[] = [];
  const events: JobEvent[] = [];
  const t0 = performance.now();
  const sup = await Supervisor.start({
    model: o.model,
    devices: ['cpu:0', 'cpu:1'],
    threads: 1,
    memory: '256MiB',
    maxTokens: 512,
    faults: o.faults ?? [],
    onFault: (f) => faults.push(f),
    onEvent: (e) => events.push(e),
    ...(o.inflight ? { inflight: o.inflight } : {}),
    ...(o.quantize ? { quantize: o.quantize } : {}),
    ...(o.computeDtype ? { computeDtype: o.computeDtype } : {}),
    ...(o.output ? { output: o.output } : {}),
    resume: !!o.resume,
    heartbeatMs: o.heartbeatMs ?? 50,
    hangTimeoutMs: o.hangTimeoutMs ?? 1500,
    ...(o.maxStageFailures !== undefined ? { maxStageFailures: o.maxStageFailures } : {}),
  });
  const finals = new Map<string, AdapterState>();
  const finish = sup.hooks.finish;
  sup.hooks.finish = async (job, state) => {
    finals.set(job.name, cloneState(state));
    return finish ? finish(job, state) : '';
  };
  const jobs = o.adapters.map((a) => sup.submit(a));
  let error: Error | undefined;
  let timer: NodeJS.Timeout | undefined;
  try {
    await Promise.race([
      sup.drain(),
      new Promise(
        (_, rej) =>
          (timer = setTimeout(
            () => rej(new Error(`run did not end within ${o.timeoutMs ?? 240_000} ms`)),
            o.timeoutMs ?? 240_000,
          )),
      ),
    ]);
  } catch (e) {
    error = e as Error;
  } finally {
    clearTimeout(timer);
  }
  const ms = performance.now() - t0;
  const states = new Map(jobs.map((j) => [j.name, j.state as string]));
  let slotsInUse = 0;
  if (!error) {
    await sup.close();
    slotsInUse = (sup.pipeline as unknown as { slotsInUse?: () => number }).slotsInUse?.() ?? 0;
  }
  return { finals, faults, events, states, ms, slotsInUse, sup, ...(error ? { error } : {}) };
}

/** Index of the first differing element (bitwise, NaN-aware), or -1. */
export function firstDiff(a: Float32Array, b: Float32Array): number {
  if (a.length !== b.length) return 0;
  const x = new Uint32Array(a.buffer, a.byteOffset, a.length);
  const y = new Uint32Array(b.buffer, b.byteOffset, b.length);
  for (let i = 0; i < x.length; i++) if (x[i] !== y[i]) return i;
  return -1;
}

/** '' when the two states are bitwise equal; else a description of the first difference. */
export function stateDiff(got: AdapterState | undefined, want: AdapterState | undefined): string {
  if (!got || !want) return `missing state (got ${!!got}, want ${!!want})`;
  if (got.version !== want.version) return `version ${got.version} != ${want.version}`;
  for (const k of ['params', 'm', 'v'] as const) {
    const i = firstDiff(got[k], want[k]);
    if (i >= 0) {
      let maxAbs = 0;
      for (let j = 0; j < want[k].length; j++) maxAbs = Math.max(maxAbs, Math.abs(got[k][j]! - want[k][j]!));
      return `${k}[${i}]: ${got[k][i]} != ${want[k][i]} (max |diff| ${maxAbs.toExponential(2)})`;
    }
  }
  return '';
}
