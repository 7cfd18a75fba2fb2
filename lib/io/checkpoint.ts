// Training checkpoints of one adapter:
//   <adapter dir>/checkpoint-<step>/
//     adapter_config.json, adapter_model.safetensors   the PEFT adapter at that step (loadable as is)
//     optimizer.safetensors                            AdamW moments: <PEFT name>.exp_avg / .exp_avg_sq
//     state.msgpack                                    step, optimizer version, data position, config hash
//     manifest.json                                    written LAST: marks the checkpoint complete
// A checkpoint without a valid manifest (a crash while writing, a full disk) is ignored on
// resume, and the previous complete one is used. A save writes into a hidden temp dir
// (.checkpoint-<step>.tmp-<pid>-<hex>) and renames it into place; a rewrite of an existing
// step first sets the old copy aside as .checkpoint-<step>.replaced, which stands in for
// checkpoint-<step> if the process dies between the two renames.
import fs from 'node:fs';
import path from 'node:path';
import { createHash } from 'node:crypto';
import { pack, unpack } from 'msgpackr';
import {
  fsyncDir,
  tempSibling,
  writeFileAtomic,
  writeSafetensors,
  openSafetensors,
  type StTensorSource,
} from './safetensors.js';
import { writeAdapterFiles } from './peft.js';
import type { AdapterState } from '../lora/state.js';
import type { LlamaConfig } from '../model/config.js';
import type { LoraSpec } from '../lora/adapter.js';
import { fromPeftTensors, toAdapterWeights, toPeftTensors } from '../lora/state.js';

export const CHECKPOINT_FORMAT = 'mlora-checkpoint';
export const CHECKPOINT_VERSION = 1;

export interface CheckpointMeta {
  step: number;
  /** Adapter config hash: a resume with a changed config is refused. */
  configHash: string;
  /** Data loader position (lib/data/loader.ts LoaderState). */
  loader: unknown;
  time: string;
  tokens: number;
  loss: number;
  /** on_nan rollbacks so far and the learning-rate multiplier they left (absent: none, 1). */
  rollbacks?: number;
  lrScale?: number;
}

export function hashConfig(obj: unknown): string {
  return createHash('sha256').update(JSON.stringify(obj)).digest('hex').slice(0, 16);
}

export interface SaveCheckpointArgs {
  adapterDir: string;
  config: LlamaConfig;
  spec: LoraSpec;
  baseModel: string;
  state: AdapterState;
  meta: CheckpointMeta;
  /** Keep at most this many complete checkpoints (oldest removed first); default all. */
  keep?: number;
}

export function saveCheckpoint(a: SaveCheckpointArgs): string {
  const name = `checkpoint-${a.meta.step}`;
  const dir = path.join(a.adapterDir, name);
  const replaced = path.join(a.adapterDir, `.${name}.replaced`);
  // renaming would otherwise move a foreign file aside and put the checkpoint in its place
  if (fs.statSync(dir, { throwIfNoEntry: false })?.isDirectory() === false)
    throw new Error(`${dir}: exists and is not a directory`);
  fs.mkdirSync(a.adapterDir, { recursive: true });
  removeDeadTemps(a.adapterDir);
  // Written whole beside the old copy, then swapped in, so a crash or a full disk while
  // rewriting a step never leaves that step without a complete checkpoint.
  const tmp = tempSibling(path.join(a.adapterDir, `.${name}`));
  try {
    fs.mkdirSync(tmp);
    writeCheckpointFiles(tmp, a);
    if (listCheckpoints(a.adapterDir).find((c) => c.step === a.meta.step)?.dir === replaced) {
      // an earlier swap crashed: the copy set aside is the complete one, keep it until the end
      fs.rmSync(dir, { recursive: true, force: true });
    } else {
      fs.rmSync(replaced, { recursive: true, force: true });
      if (fs.existsSync(dir)) fs.renameSync(dir, replaced);
    }
    fs.renameSync(tmp, dir);
  } catch (e) {
    try {
      fs.rmSync(tmp, { recursive: true, force: true });
    } catch {
      // the write's own error is the one to report; listing ignores the temp dir
    }
    throw new Error(`${dir}: ${(e as Error).message}`, { cause: e });
  }
  fsyncDir(a.adapterDir); // the new copy must be durable before the old one goes
  fs.rmSync(replaced, { recursive: true, force: true });
  if (a.keep !== undefined) {
    const all = listCheckpoints(a.adapterDir).filter((c) => c.complete);
    for (const old of all.slice(0, Math.max(0, all.length - a.keep)))
      fs.rmSync(old.dir, { recursive: true, force: true });
  }
  return dir;
}

function writeCheckpointFiles(dir: string, a: SaveCheckpointArgs): void {
  writeAdapterFiles(dir, toAdapterWeights(a.config, a.spec, a.state.params, a.baseModel));
  const params = toPeftTensors(a.config, a.spec, a.state.params);
  const m = toPeftTensors(a.config, a.spec, a.state.m);
  const v = toPeftTensors(a.config, a.spec, a.state.v);
  const tensors: Record<string, StTensorSource> = {};
  for (const [name, { shape }] of params) {
    tensors[`${name}.exp_avg`] = { dtype: 'F32', shape, data: m.get(name)!.data };
    tensors[`${name}.exp_avg_sq`] = { dtype: 'F32', shape, data: v.get(name)!.data };
  }
  writeSafetensors(path.join(dir, 'optimizer.safetensors'), tensors, { optimizer_steps: String(a.state.version) });
  writeFileAtomic(path.join(dir, 'state.msgpack'), [pack({ ...a.meta, version: a.state.version })]);
  const files: Record<string, number> = {};
  for (const f of fs.readdirSync(dir)) files[f] = fs.statSync(path.join(dir, f)).size;
  writeFileAtomic(
    path.join(dir, 'manifest.json'),
    JSON.stringify({ format: CHECKPOINT_FORMAT, version: CHECKPOINT_VERSION, step: a.meta.step, files }, null, 2),
  );
  fsyncDir(dir);
}

const TEMP_RE = /^\.checkpoint-\d+\.tmp-(\d+)-[0-9a-f]+$/;
const PROCESS_START = Date.now() - process.uptime() * 1000;

/** Removes the temp dirs of saves that died (a crash mid-write); never one a live writer may own. */
function removeDeadTemps(adapterDir: string): void {
  for (const name of fs.readdirSync(adapterDir)) {
    const pid = Number(TEMP_RE.exec(name)?.[1]);
    if (!pid) continue;
    const dir = path.join(adapterDir, name);
    const st = fs.statSync(dir, { throwIfNoEntry: false });
    if (st && ownerGone(pid, st.mtimeMs)) fs.rmSync(dir, { recursive: true, force: true });
  }
}

function ownerGone(pid: number, mtimeMs: number): boolean {
  // pids are reused (a restarted container often gets the same one): ours, from before we started, is dead
  if (pid === process.pid) return mtimeMs < PROCESS_START;
  try {
    process.kill(pid, 0);
    return false;
  } catch (e) {
    return (e as NodeJS.ErrnoException).code === 'ESRCH'; // EPERM: alive, another user's
  }
}

export interface CheckpointEntry {
  dir: string;
  step: number;
  complete: boolean;
  why?: string;
}

/**
 * Checkpoints of an adapter dir, oldest first, each marked complete or not (with the reason).
 * Read only (no recovery by renaming), so it works on a read-only output and never undoes
 * the swap of a save in progress.
 */
export function listCheckpoints(adapterDir: string): CheckpointEntry[] {
  if (!fs.existsSync(adapterDir)) return [];
  const current = new Map<number, CheckpointEntry>();
  const setAside = new Map<number, CheckpointEntry>();
  for (const name of fs.readdirSync(adapterDir)) {
    const m = /^(?:checkpoint-(\d+)|\.checkpoint-(\d+)\.replaced)$/.exec(name);
    if (!m) continue;
    const step = Number(m[1] ?? m[2]);
    (m[1] !== undefined ? current : setAside).set(step, readEntry(path.join(adapterDir, name), step));
  }
  // a crash between a save's two renames leaves the previous copy only under its set-aside name
  for (const [step, e] of setAside) if (e.complete && !current.get(step)?.complete) current.set(step, e);
  return [...current.values()].sort((a, b) => a.step - b.step);
}

function readEntry(dir: string, step: number): CheckpointEntry {
  const e: CheckpointEntry = { dir, step, complete: false };
  try {
    const man = JSON.parse(fs.readFileSync(path.join(dir, 'manifest.json'), 'utf8')) as {
      format: string;
      step: number;
      files: Record<string, number>;
    };
    if (man.format !== CHECKPOINT_FORMAT) throw new Error(`manifest format '${man.format}'`);
    for (const [f, size] of Object.entries(man.files)) {
      const st = fs.statSync(path.join(dir, f), { throwIfNoEntry: false });
      if (!st || st.size !== size) throw new Error(`${f} is missing or has the wrong size`);
    }
    e.complete = true;
  } catch (err) {
    e.why = (err as Error).message;
  }
  return e;
}

export function latestCheckpoint(adapterDir: string): CheckpointEntry | undefined {
  return listCheckpoints(adapterDir)
    .filter((c) => c.complete)
    .pop();
}

/** The checkpoint's record (step, config hash, data position) without its tensors. */
export function readCheckpointMeta(dir: string): CheckpointMeta & { version: number } {
  return unpack(fs.readFileSync(path.join(dir, 'state.msgpack'))) as CheckpointMeta & { version: number };
}

export function loadCheckpoint(
  dir: string,
  config: LlamaConfig,
  spec: LoraSpec,
): { state: AdapterState; meta: CheckpointMeta } {
  const meta = readCheckpointMeta(dir);
  const weights = openSafetensors(path.join(dir, 'adapter_model.safetensors'));
  const opt = openSafetensors(path.join(dir, 'optimizer.safetensors'));
  const get = (f: typeof weights, n: string) => (f.tensors.has(n) ? f.readF32(n) : undefined);
  const params = fromPeftTensors(config, spec, (n) => get(weights, n), `${dir}/adapter_model.safetensors`);
  const m = fromPeftTensors(config, spec, (n) => get(opt, `${n}.exp_avg`), `${dir}/optimizer.safetensors`);
  const v = fromPeftTensors(config, spec, (n) => get(opt, `${n}.exp_avg_sq`), `${dir}/optimizer.safetensors`);
  return { state: { params, m, v, version: meta.version }, meta };
}
