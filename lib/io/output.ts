// An output folder's earlier results, and what a new run may do with them. A run never
// writes over a finished adapter or its checkpoints unless asked: it goes on from them
// (resume) or starts again (overwrite). Starting again first moves the earlier results of an
// adapter into <output>/.overwritten-<run>/<adapter>/, where they stay until the new adapter
// is complete; a crash in between leaves them there, whole, to be moved back by hand.
import fs from 'node:fs';
import path from 'node:path';
import { randomBytes } from 'node:crypto';

/** What to do with an adapter's earlier results in the output folder. */
export type OutputMode = 'refuse' | 'resume' | 'overwrite';

/** A run id: the start time (UTC, sortable) and a random tail, safe as a folder name. */
export function newRunId(now = new Date()): string {
  return `${now
    .toISOString()
    .replace(/[-:]/g, '')
    .replace(/\.\d+Z$/, 'Z')}-${randomBytes(3).toString('hex')}`;
}

/**
 * The results an earlier run left for one adapter: its finished adapter files and its
 * checkpoints (complete or not), as names inside <output>/<adapter>/, sorted.
 */
export function earlierResults(output: string, adapter: string): string[] {
  const dir = path.join(output, adapter);
  let entries: fs.Dirent[];
  try {
    entries = fs.readdirSync(dir, { withFileTypes: true });
  } catch {
    return [];
  }
  // (a file named like a checkpoint is no result: saving there fails, with its own error)
  return entries
    .filter(
      (e) =>
        (e.isFile() && e.name === 'adapter_model.safetensors') ||
        (e.isDirectory() && /^\.?checkpoint-\d+(\.replaced)?$/.test(e.name)),
    )
    .map((e) => e.name)
    .sort((a, b) => a.localeCompare(b, 'en', { numeric: true }));
}

/** Where `overwrite` moves the earlier results of run `runId`. */
export function setAsideDir(output: string, runId: string): string {
  return path.join(output, `.overwritten-${runId}`);
}

export interface Wording {
  resume: string;
  overwrite: string;
}
export const CLI_WORDING: Wording = { resume: '--resume', overwrite: '--overwrite' };
export const API_WORDING: Wording = { resume: 'resume: true', overwrite: 'overwrite: true' };

/**
 * The error for adapters whose earlier results a run would write over, naming the folder, what
 * is there, and the two ways on; undefined when none of them has any.
 */
export function refusal(output: string, adapters: string[], how: Wording): Error | undefined {
  const found = adapters.map((a) => ({ a, r: earlierResults(output, a) })).filter((x) => x.r.length);
  if (!found.length) return undefined;
  const list = found.map(({ a, r }) => `  ${path.join(output, a)}/: ${r.join(', ')}`).join('\n');
  return new Error(
    `${output} already holds results of ${found.map((x) => `'${x.a}'`).join(', ')} from an earlier run:\n${list}\n` +
      `nothing was trained. Use ${how.resume} to go on from their checkpoints, or ${how.overwrite} to train them again from the start ` +
      `(the earlier results move to ${path.join(output, '.overwritten-<run id>')}/ and are removed once the new ones are complete), or choose another output.`,
  );
}

/**
 * Moves an adapter's earlier results (its whole folder) aside for `overwrite`; returns where
 * they went, or undefined when there were none.
 */
export function setAside(output: string, adapter: string, runId: string): string | undefined {
  if (!earlierResults(output, adapter).length) return undefined;
  const to = path.join(setAsideDir(output, runId), adapter);
  fs.mkdirSync(path.dirname(to), { recursive: true });
  fs.renameSync(path.join(output, adapter), to);
  return to;
}

/** Moves a file of the output folder (metrics.jsonl, report.html) aside with the adapters. */
export function setAsideFile(output: string, name: string, runId: string): string | undefined {
  const from = path.join(output, name);
  if (!fs.existsSync(from)) return undefined;
  const to = path.join(setAsideDir(output, runId), name);
  fs.mkdirSync(path.dirname(to), { recursive: true });
  fs.renameSync(from, to);
  return to;
}

/** Removes what was set aside for one adapter (its new results are complete), and the folder once empty. */
export function dropSetAside(output: string, adapter: string, runId: string): void {
  const dir = setAsideDir(output, runId);
  fs.rmSync(path.join(dir, adapter), { recursive: true, force: true });
  removeIfEmpty(dir);
}

/** Removes the whole set-aside folder of a run (every adapter of it completed). */
export function dropAllSetAside(output: string, runId: string): void {
  fs.rmSync(setAsideDir(output, runId), { recursive: true, force: true });
}

function removeIfEmpty(dir: string): void {
  try {
    fs.rmdirSync(dir);
  } catch {
    // not empty (other adapters, metrics.jsonl) or already gone
  }
}
