// Shared helpers for the user-tool tests: the real CLI as a child process, and an
// independent loss: the model's full logits (StageProgram.logits, one sequence at a time) with
// a float64 log-softmax and the HF label shift done here.
import fs from 'node:fs';
import path from 'node:path';
import { spawnSync } from 'node:child_process';
import type { Test } from 'tap';
import { batchOnDevice, freeBatch, type SingleModel } from '../../lib/model/single.js';
import { tmpDir } from '../support/files.js';

export const ROOT = path.resolve('.');
export const FIX = path.join(ROOT, 'test/fixtures/llama-tiny');
export const CLI = path.join(ROOT, 'dist/scripts/mlora.js');

export function mlora(...args: string[]): { code: number | null; out: string; err: string } {
  const r = spawnSync(process.execPath, [CLI, ...args], { encoding: 'utf8', env: process.env });
  return { code: r.status, out: r.stdout, err: r.stderr };
}

/** Logits [n, vocab] of one whole sequence (positions 0..n-1), by a full recomputation. */
export async function fullLogits(m: SingleModel, ids: ArrayLike<number>): Promise<Float32Array> {
  const n = ids.length;
  const b = batchOnDevice(m, {
    tokens: Int32Array.from(ids), positions: Int32Array.from({ length: n }, (_, i) => i),
    cuSeqlens: Int32Array.from([0, n]), targets: new Int32Array(n).fill(-100),
  }, 900_000 + n);
  try {
    return await m.program.logits(b.mb, b.tokens);
  } finally {
    freeBatch(b);
  }
}

/** Σ −log p(label[j+1] | ids[..j]) over labels ≠ −100 (float64 log-softmax), and the count. */
export async function referenceLoss(m: SingleModel, seqs: Array<{ inputIds: ArrayLike<number>; labels?: ArrayLike<number> }>) {
  const V = m.config.vocabSize;
  let sum = 0, count = 0;
  for (const s of seqs) {
    const labels = s.labels ?? s.inputIds;
    const lg = await fullLogits(m, s.inputIds);
    for (let j = 0; j + 1 < s.inputIds.length; j++) {
      const y = labels[j + 1]!;
      if (y === -100) continue;
      let mx = -Infinity;
      for (let v = 0; v < V; v++) mx = Math.max(mx, lg[j * V + v]!);
      let z = 0;
      for (let v = 0; v < V; v++) z += Math.exp(lg[j * V + v]! - mx);
      sum += mx + Math.log(z) - lg[j * V + y]!;
      count++;
    }
  }
  return { sum, count, loss: sum / count };
}

/** A copy of the reference fixture model (config.json + model.safetensors, no tokenizer). */
export function copyFixtureModel(t: Test): string {
  const d = tmpDir(t, 'fixmodel');
  for (const f of fs.readdirSync(path.join(FIX, 'model'))) fs.copyFileSync(path.join(FIX, 'model', f), path.join(d, f));
  return d;
}

/** A command's main() in this process (cheaper than a child), with its console output. Errors thrown are exit 1, as in mlora.js. */
export async function inProcess(main: (argv: string[]) => Promise<number>, ...argv: string[]): Promise<{ code: number; out: string; err: string }> {
  let out = '', err = '';
  const log = console.log, error = console.error;
  console.log = (...a: unknown[]) => void (out += a.join(' ') + '\n');
  console.error = (...a: unknown[]) => void (err += a.join(' ') + '\n');
  try {
    return { code: await main(argv), out, err };
  } catch (e) {
    return { code: 1, out, err: err + `mlora: ${(e as Error).message}\n` };
  } finally {
    console.log = log;
    console.error = error;
  }
}
