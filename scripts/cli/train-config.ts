// A training config file as `mlora train` reads it: JSON or YAML, relative paths resolved
// against the file's folder, every path it names checked before anything loads.
import fs from 'node:fs';
import path from 'node:path';
import YAML from 'yaml';
import type { TrainConfig } from '../../lib/config.js';

/** Reads a config file and resolves its relative paths against the file's folder. */
export function readConfigFile(file: string): unknown {
  let text: string;
  try {
    text = fs.readFileSync(file, 'utf8');
  } catch (e) {
    throw new Error(
      `${file}: ${(e as NodeJS.ErrnoException).code === 'ENOENT' ? 'no such file' : (e as Error).message}`,
    );
  }
  let raw: unknown;
  try {
    raw = /\.ya?ml$/i.test(file) ? YAML.parse(text) : JSON.parse(text);
  } catch (e) {
    throw new Error(`${file}: not valid ${/\.ya?ml$/i.test(file) ? 'YAML' : 'JSON'}: ${(e as Error).message}`);
  }
  if (!raw || typeof raw !== 'object' || Array.isArray(raw))
    throw new Error(`${file}: the config must be an object with model, adapters, ...`);
  const base = path.dirname(path.resolve(file));
  const abs = (p: unknown) => (typeof p === 'string' && !path.isAbsolute(p) ? path.resolve(base, p) : p);
  const c = raw as Record<string, unknown>;
  c.model = abs(c.model);
  if (c.output !== undefined) c.output = abs(c.output);
  if (Array.isArray(c.adapters)) {
    for (const a of c.adapters as Array<Record<string, unknown>>) {
      if (!a || typeof a !== 'object') continue;
      a.data = abs(a.data);
      if (a.template && typeof a.template === 'string' && /[/\\.]/.test(a.template)) a.template = abs(a.template);
      if (a.eval && typeof a.eval === 'object')
        (a.eval as Record<string, unknown>).data = abs((a.eval as Record<string, unknown>).data);
      if (a.lora && typeof a.lora === 'object' && (a.lora as Record<string, unknown>).init)
        (a.lora as Record<string, unknown>).init = abs((a.lora as Record<string, unknown>).init);
    }
  }
  return c;
}

/**
 * The paths a config names exist (model dir with config.json, each dataset, init adapter,
 * template file): checked before anything loads, each error naming the field.
 */
export function checkPaths(cfg: TrainConfig, where: string): void {
  const problems: string[] = [];
  const st = (p: string) => fs.statSync(p, { throwIfNoEntry: false });
  const m = st(cfg.model);
  if (!m) problems.push(`model: ${cfg.model}: no such directory`);
  else if (!m.isDirectory())
    problems.push(
      `model: ${cfg.model} is not a directory (expected a Hugging Face model directory: config.json, model.safetensors, tokenizer.json)`,
    );
  else if (!st(path.join(cfg.model, 'config.json')))
    problems.push(
      `model: ${cfg.model} has no config.json (expected a Hugging Face model directory: config.json, model.safetensors, tokenizer.json)`,
    );
  cfg.adapters.forEach((a, i) => {
    const file = (field: string, p: string) => {
      const s = st(p);
      if (!s) problems.push(`adapters[${i}].${field}: ${p}: no such file`);
      else if (!s.isFile()) problems.push(`adapters[${i}].${field}: ${p} is not a file`);
    };
    file('data', a.data);
    if (a.eval?.data) file('eval.data', a.eval.data);
    if (a.template && /[/\\]/.test(a.template)) file('template', a.template);
    if (a.lora.init) {
      const s = st(a.lora.init);
      if (!s || !s.isDirectory()) problems.push(`adapters[${i}].lora.init: ${a.lora.init}: no such adapter directory`);
      else if (!st(path.join(a.lora.init, 'adapter_config.json')))
        problems.push(
          `adapters[${i}].lora.init: ${a.lora.init} has no adapter_config.json (expected a PEFT adapter directory)`,
        );
    }
  });
  if (problems.length) throw new Error(problems.map((p) => `${where}: ${p}`).join('\n'));
}
