// What identifies a base model across hosts without reading its weights: the parsed config
// and every safetensors header entry (name, dtype, shape, byte range). A stage host loads its
// layers from its own copy of the model directory; it refuses to serve a run whose model has a
// different fingerprint, and says which part differs.
import { createHash } from 'node:crypto';
import type { ModelDir } from './hf-model.js';

export interface ModelFingerprint {
  /** sha256 of the parsed config (the fields mlora reads), canonical JSON. */
  config: string;
  /** sha256 of the tensor headers, sorted by name. */
  tensors: string;
  /** Tensor count (for the message). */
  count: number;
}

function canonical(v: unknown): string {
  if (Array.isArray(v)) return `[${v.map(canonical).join(',')}]`;
  if (v && typeof v === 'object') {
    return `{${Object.keys(v)
      .sort()
      .map((k) => `${JSON.stringify(k)}:${canonical((v as Record<string, unknown>)[k])}`)
      .join(',')}}`;
  }
  return JSON.stringify(v) ?? 'null';
}

export function modelFingerprint(dir: ModelDir): ModelFingerprint {
  const config = createHash('sha256').update(canonical(dir.config)).digest('hex');
  const names = [...dir.tensorNames].sort();
  const h = createHash('sha256');
  for (const n of names) {
    const i = dir.info(n);
    h.update(`${n}\0${i.dtype}\0${i.shape.join(',')}\0${i.end - i.begin}\n`);
  }
  return { config, tensors: h.digest('hex'), count: names.length };
}

/** Undefined when equal; else what differs, for an error message. */
export function fingerprintMismatch(mine: ModelFingerprint, theirs: ModelFingerprint): string | undefined {
  const diffs: string[] = [];
  if (mine.config !== theirs.config)
    diffs.push(
      `config.json differs (sha256 ${mine.config.slice(0, 12)} here, ${theirs.config.slice(0, 12)} on the supervisor)`,
    );
  if (mine.tensors !== theirs.tensors) {
    diffs.push(
      `the tensor headers differ (${mine.count} tensors, sha256 ${mine.tensors.slice(0, 12)} here; ${theirs.count} tensors, ${theirs.tensors.slice(0, 12)} on the supervisor)`,
    );
  }
  return diffs.length ? diffs.join('; ') : undefined;
}
