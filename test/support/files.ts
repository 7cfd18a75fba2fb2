// Temporary folders and the demo datasets shipped in data/demo.
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import tap from 'tap';

/** The repository root (tests run from dist/test/..., sources sit three folders up). */
export const REPO = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../../..');
export const DEMO_DATA = path.join(REPO, 'data/demo');

/** A fresh folder mlora-TAG-XXXXXX under the system temp dir, removed when `t` ends. */
export function tmpDir(t: { teardown(fn: () => void): void }, tag = 'test'): string {
  const d = fs.mkdtempSync(path.join(os.tmpdir(), `mlora-${tag}-`));
  const remove = () => fs.rmSync(d, { recursive: true, force: true });
  // The root test's teardown can run while a file's top-level awaits are still using the
  // folder (tap may end the root between two awaits), so the root's folders go at exit.
  if ((t as unknown) === tap) process.once('exit', remove);
  else t.teardown(remove);
  return d;
}

/** A demo dataset's path. */
export function demo(name: string): string {
  return path.join(DEMO_DATA, `${name}.jsonl`);
}

/** The first `n` records of a demo dataset, written to dir/<name>-<n>.jsonl. */
export function demoData(dir: string, name: 'arithmetic' | 'capitals' | 'reverse' | 'sentiment', n: number): string {
  const lines = fs.readFileSync(demo(name), 'utf8').split('\n').filter(Boolean).slice(0, n);
  const file = path.join(dir, `${name}-${n}.jsonl`);
  fs.writeFileSync(file, lines.join('\n') + '\n');
  return file;
}
