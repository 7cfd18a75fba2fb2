// Helpers for the CLI tests: the real `mlora` binary as a child process (or a command's main()
// in this process), small training configs on the demo data, adapter comparisons.
import fs from 'node:fs';
import path from 'node:path';
import { spawn, spawnSync } from 'node:child_process';
import type { Test } from 'tap';
import { openSafetensors } from '../../lib/io/safetensors.js';
import { DEMO_DATA, tmpDir } from '../support/files.js';

export const ROOT = path.resolve('.');
export const CLI = path.join(ROOT, 'dist/scripts/mlora.js');
export const FIX = path.join(ROOT, 'test/fixtures/llama-tiny');

/** A small two-stage run: two adapters on the demo data, a checkpoint every `save_every` steps. */
export function smallConfig(model: string, output: string, o: { steps?: number; saveEvery?: number } = {}) {
  const common = {
    batch_size: 4,
    micro_batch_size: 2,
    seq_len: 128,
    max_steps: o.steps ?? 6,
    save_every: o.saveEvery ?? 2,
    schedule: { type: 'cosine', warmup_steps: 1 },
  };
  return {
    model,
    output,
    devices: ['cpu:0', 'cpu:1'],
    adapters: [
      {
        name: 'capitals',
        data: path.join(DEMO_DATA, 'capitals.jsonl'),
        lora: { r: 4, alpha: 8, dropout: 0.1 },
        optimizer: { lr: 3e-3 },
        seed: 1,
        ...common,
      },
      {
        name: 'arithmetic',
        data: path.join(DEMO_DATA, 'arithmetic.jsonl'),
        lora: { r: 8, alpha: 8, dropout: 0, targets: ['q_proj', 'v_proj', 'up_proj'] },
        optimizer: { lr: 2e-3, weight_decay: 0.01 },
        max_grad_norm: 1,
        seed: 2,
        ...common,
      },
    ],
    pipeline: { threads: 1 },
    log: { every: 1, progress: 'plain' },
  };
}

export function writeJson(file: string, obj: unknown): string {
  fs.writeFileSync(file, JSON.stringify(obj, null, 2));
  return file;
}

export interface CliResult {
  code: number | null;
  signal: NodeJS.Signals | null;
  out: string;
  err: string;
}

export function mlora(args: string[], env: Record<string, string> = {}): CliResult {
  const r = spawnSync(process.execPath, [CLI, ...args], {
    encoding: 'utf8',
    env: { ...process.env, ...env },
    timeout: 120_000,
  });
  return { code: r.status, signal: r.signal, out: r.stdout, err: r.stderr };
}

/** Starts `mlora ARGS` and hands back the child with its output so far. */
export function start(args: string[], env: Record<string, string> = {}) {
  const child = spawn(process.execPath, [CLI, ...args], {
    env: { ...process.env, ...env },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  const r = { child, out: '', err: '' };
  child.stdout.on('data', (b: Buffer) => (r.out += b.toString()));
  child.stderr.on('data', (b: Buffer) => (r.err += b.toString()));
  const exited = new Promise<CliResult>((res) =>
    child.on('close', (code, signal) => res({ code, signal, out: r.out, err: r.err })),
  );
  /** Resolves once stdout matches `re` `count` times (rejects if the child ends first). */
  const waitFor = (re: RegExp, count = 1) =>
    new Promise<void>((res, rej) => {
      const g = new RegExp(re.source, 'g');
      const check = () => {
        if ((r.out.match(g) ?? []).length >= count) {
          child.stdout.off('data', check);
          res();
        }
      };
      child.stdout.on('data', check);
      void exited.then((x) =>
        rej(new Error(`mlora ended (code ${x.code}) before printing ${re} ×${count}:\n${x.out}\n${x.err}`)),
      );
      check();
    });
  return { child, exited, waitFor, output: () => r.out };
}

export function readMetrics(output: string): Array<Record<string, unknown>> {
  return fs
    .readFileSync(path.join(output, 'metrics.jsonl'), 'utf8')
    .trim()
    .split('\n')
    .map((l) => JSON.parse(l) as Record<string, unknown>);
}

export function adapterTensors(file: string): Map<string, Float32Array> {
  const f = openSafetensors(file);
  return new Map([...f.tensors.keys()].sort().map((n) => [n, f.readF32(n)]));
}

/** Asserts two adapter weight files hold bitwise the same tensors (prints the max difference otherwise). */
export function sameWeights(t: Test, a: string, b: string, label: string) {
  const x = adapterTensors(a);
  const y = adapterTensors(b);
  t.same([...x.keys()], [...y.keys()], `${label}: same tensor names`);
  let maxDiff = 0;
  let differing = 0;
  for (const [n, xa] of x) {
    const ya = y.get(n);
    if (!ya || ya.length !== xa.length) {
      differing++;
      continue;
    }
    for (let i = 0; i < xa.length; i++) {
      if (!Object.is(xa[i], ya[i])) {
        differing++;
        maxDiff = Math.max(maxDiff, Math.abs(xa[i]! - ya[i]!));
      }
    }
  }
  t.equal(differing, 0, `${label}: bitwise equal (${differing} values differ, max |diff| ${maxDiff.toExponential(2)})`);
}

/** A copy of the reference fixture model (config.json + model.safetensors, no tokenizer). */
export function copyFixtureModel(t: Test): string {
  const d = tmpDir(t, 'fixmodel');
  for (const f of fs.readdirSync(path.join(FIX, 'model'))) fs.copyFileSync(path.join(FIX, 'model', f), path.join(d, f));
  return d;
}

/** A command's main() in this process (cheaper than a child), with its console output. Errors thrown are exit 1, as in mlora.js. */
export async function inProcess(
  main: (argv: string[]) => Promise<number>,
  ...argv: string[]
): Promise<{ code: number; out: string; err: string }> {
  let out = '',
    err = '';
  const log = console.log,
    error = console.error;
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
