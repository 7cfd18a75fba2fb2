// PEFT LoRA adapters, exactly as PEFT writes them: adapter_config.json +
// adapter_model.safetensors with tensors
//   base_model.model.model.layers.{i}.self_attn.{q,k,v,o}_proj.lora_A.weight  [r, in]
//   base_model.model.model.layers.{i}.mlp.{gate,up,down}_proj.lora_B.weight   [out, r]
// so an adapter trained here loads in PEFT and LoRA servers unchanged, and one made by PEFT
// loads here. On load, names with an adapter-name infix (`lora_A.default.weight`) and
// F16/BF16/F64 tensors are accepted too; saving writes the canonical names.
//
// Refused with a clear reason: non-empty rank_pattern / alpha_pattern, use_dora, bias other
// than "none", fan_in_fan_out, and LoRA tensors on modules other than the seven LLaMA
// projections (embed_tokens, lm_head, modules_to_save).
import fs from 'node:fs';
import path from 'node:path';
import { LORA_TARGETS, projectionModule, projectionShape, type LlamaConfig, type LoraTarget } from '../model/config.js';
import {
  fsyncDir,
  openSafetensors,
  tempSibling,
  writeFileAtomic,
  writeSafetensors,
  type StTensorSource,
} from './safetensors.js';
import { f32ToBf16, f32ToF16 } from './dtype.js';

/** One projection's LoRA factors, row-major f32: A is [r, in], B is [out, r]. */
export interface LoraPair {
  a: Float32Array;
  b: Float32Array;
}

/**
 * An adapter in memory: the adapter_config.json fields mlora uses (camelCase) and the
 * weights per layer and target. `layers[i][target]` is absent where the adapter does not
 * touch that projection of layer i (e.g. layers_to_transform).
 */
export interface AdapterWeights {
  r: number;
  loraAlpha: number;
  loraDropout: number;
  targetModules: LoraTarget[];
  useRslora: boolean;
  baseModelNameOrPath: string | null;
  layers: Array<Partial<Record<LoraTarget, LoraPair>>>;
}

export interface LoadedAdapter extends AdapterWeights {
  dir: string;
  /** The factor the B·A delta is multiplied by: alpha/r, or alpha/sqrt(r) with use_rslora. */
  scaling: number;
  /** Storage dtypes of the tensors, with counts. */
  dtypes: Record<string, number>;
}

export const ADAPTER_CONFIG = 'adapter_config.json';
export const ADAPTER_WEIGHTS = 'adapter_model.safetensors';

export function adapterScaling(a: Pick<AdapterWeights, 'r' | 'loraAlpha' | 'useRslora'>): number {
  return a.useRslora ? a.loraAlpha / Math.sqrt(a.r) : a.loraAlpha / a.r;
}

/** The canonical PEFT tensor name of a LoRA factor. */
export function loraTensorName(layer: number, target: LoraTarget, which: 'A' | 'B'): string {
  return `base_model.model.model.layers.${layer}.${projectionModule(target)}.lora_${which}.weight`;
}

const NAME_RE =
  /^base_model\.model\.model\.layers\.(\d+)\.(self_attn|mlp)\.([a-z_]+)\.lora_([AB])(?:\.([^.]+))?\.weight$/;

function describe(v: unknown): string {
  return v === undefined ? 'nothing' : JSON.stringify(v);
}

/** Number of trainable parameters of an adapter. */
export function adapterParameterCount(a: AdapterWeights): number {
  let n = 0;
  for (const l of a.layers) for (const p of Object.values(l)) if (p) n += p.a.length + p.b.length;
  return n;
}

/** Indices of the layers the adapter has weights for. */
export function adapterLayerIndices(a: AdapterWeights): number[] {
  return a.layers.flatMap((l, i) => (Object.keys(l).length ? [i] : []));
}

interface ParsedConfig {
  r: number;
  loraAlpha: number;
  loraDropout: number;
  /** undefined when target_modules is a regex string: the tensors decide. */
  targets: LoraTarget[] | undefined;
  useRslora: boolean;
  baseModelNameOrPath: string | null;
  layersToTransform: number[] | null;
}

/** Parses adapter_config.json (exported for tests); `file` names the file in errors. */
export function parseAdapterConfig(json: unknown, file = ADAPTER_CONFIG): ParsedConfig {
  if (typeof json !== 'object' || json === null || Array.isArray(json))
    throw new Error(`${file}: must be a JSON object`);
  const o = json as Record<string, unknown>;
  const err = (k: string, m: string) => new Error(`${file}: field '${k}' ${m}`);
  if (o.peft_type !== 'LORA') throw err('peft_type', `must be "LORA", got ${describe(o.peft_type)}`);
  if (o.task_type !== undefined && o.task_type !== null && o.task_type !== 'CAUSAL_LM') {
    throw err('task_type', `must be "CAUSAL_LM", got ${describe(o.task_type)}`);
  }
  const r = o.r;
  if (typeof r !== 'number' || !Number.isSafeInteger(r) || r <= 0)
    throw err('r', `must be a positive integer, got ${describe(r)}`);
  const loraAlpha = o.lora_alpha ?? 8; // PEFT's default
  if (typeof loraAlpha !== 'number' || !Number.isFinite(loraAlpha) || loraAlpha <= 0)
    throw err('lora_alpha', `must be a positive number, got ${describe(o.lora_alpha)}`);
  const loraDropout = o.lora_dropout ?? 0;
  if (typeof loraDropout !== 'number' || !(loraDropout >= 0 && loraDropout < 1))
    throw err('lora_dropout', `must be a number in [0, 1), got ${describe(o.lora_dropout)}`);
  const useRslora = o.use_rslora ?? false;
  if (typeof useRslora !== 'boolean') throw err('use_rslora', `must be true or false, got ${describe(o.use_rslora)}`);
  if (o.use_dora === true) throw err('use_dora', 'is true: DoRA adapters are not supported by mlora');
  if (o.fan_in_fan_out === true)
    throw err('fan_in_fan_out', 'is true: LLaMA projections are not Conv1D; mlora needs fan_in_fan_out false');
  if (o.bias !== undefined && o.bias !== 'none')
    throw err('bias', `is ${describe(o.bias)}: mlora trains no biases (bias "none")`);
  for (const k of ['rank_pattern', 'alpha_pattern']) {
    const v = o[k];
    if (v !== undefined && v !== null && (typeof v !== 'object' || Array.isArray(v) || Object.keys(v).length)) {
      throw err(k, `is ${describe(v)}: per-module ranks and alphas are not supported by mlora (must be {})`);
    }
  }
  if (
    o.modules_to_save !== undefined &&
    o.modules_to_save !== null &&
    !(Array.isArray(o.modules_to_save) && o.modules_to_save.length === 0)
  ) {
    throw err(
      'modules_to_save',
      `is ${describe(o.modules_to_save)}: fully trained extra modules are not supported by mlora`,
    );
  }
  let targets: LoraTarget[] | undefined;
  const tm = o.target_modules;
  if (tm === 'all-linear') targets = [...LORA_TARGETS];
  else if (typeof tm === 'string')
    targets = undefined; // a regex over module names: the tensors decide
  else if (Array.isArray(tm) && tm.length) {
    const set = new Set<LoraTarget>();
    for (const m of tm) {
      // PEFT matches list entries as a suffix of the module name: "q_proj", "self_attn.q_proj"
      const t = typeof m === 'string' ? LORA_TARGETS.find((x) => m === x || m.endsWith(`.${x}`)) : undefined;
      if (!t) throw err('target_modules', `has ${describe(m)}: mlora can target ${LORA_TARGETS.join(', ')}`);
      set.add(t);
    }
    targets = LORA_TARGETS.filter((t) => set.has(t));
  } else throw err('target_modules', `must be a non-empty list of module names, got ${describe(tm)}`);
  let layersToTransform: number[] | null = null;
  const lt = o.layers_to_transform;
  if (lt !== undefined && lt !== null) {
    const arr = typeof lt === 'number' ? [lt] : lt;
    if (!Array.isArray(arr) || !arr.every((x) => Number.isSafeInteger(x) && x >= 0)) {
      throw err('layers_to_transform', `must be null, a layer index or a list of them, got ${describe(lt)}`);
    }
    layersToTransform = arr as number[];
  }
  const bm = o.base_model_name_or_path ?? null;
  if (bm !== null && typeof bm !== 'string')
    throw err('base_model_name_or_path', `must be a string or null, got ${describe(bm)}`);
  return { r, loraAlpha, loraDropout, targets, useRslora, baseModelNameOrPath: bm, layersToTransform };
}

/** Loads a PEFT LoRA adapter directory. Tensors stored as F32/F16/BF16/F64 come back as f32. */
export function loadAdapter(dir: string): LoadedAdapter {
  const cfgFile = path.join(dir, ADAPTER_CONFIG);
  let text: string;
  try {
    text = fs.readFileSync(cfgFile, 'utf8');
  } catch (e) {
    throw new Error(
      `${cfgFile}: cannot read: ${(e as NodeJS.ErrnoException).code === 'ENOENT' ? 'no such file' : (e as Error).message}`,
    );
  }
  let json: unknown;
  try {
    json = JSON.parse(text);
  } catch (e) {
    throw new Error(`${cfgFile}: not valid JSON (${(e as Error).message})`);
  }
  const c = parseAdapterConfig(json, cfgFile);
  const wFile = path.join(dir, ADAPTER_WEIGHTS);
  if (!fs.existsSync(wFile)) {
    const bin = fs.existsSync(path.join(dir, 'adapter_model.bin'));
    throw new Error(
      `${wFile}: no such file${bin ? ' (adapter_model.bin is a pickle: re-save the adapter with safe_serialization=True)' : ''}`,
    );
  }
  const st = openSafetensors(wFile);
  const layers: Array<Partial<Record<LoraTarget, LoraPair>>> = [];
  const found = new Map<string, { layer: number; target: LoraTarget; A?: string; B?: string }>();
  let infix: string | undefined | null = null;
  const dtypes: Record<string, number> = {};
  for (const [name, info] of st.tensors) {
    const m = NAME_RE.exec(name);
    if (!m)
      throw new Error(
        `${wFile}: tensor '${name}' is not a LoRA factor of a LLaMA projection (base_model.model.model.layers.N.<module>.lora_A/B.weight)`,
      );
    const [, layerS, mod, proj, which, inf] = m;
    const target = LORA_TARGETS.find((t) => t === proj);
    if (!target || projectionModule(target) !== `${mod}.${proj}`)
      throw new Error(`${wFile}: tensor '${name}': ${mod}.${proj} is not a LLaMA projection`);
    if (infix === null) infix = inf;
    else if (infix !== inf)
      throw new Error(
        `${wFile}: tensor '${name}': the file mixes adapter names (${describe(infix)} and ${describe(inf)})`,
      );
    const layer = Number(layerS);
    if (!['F32', 'F16', 'BF16', 'F64'].includes(info.dtype))
      throw new Error(`${wFile}: tensor '${name}' is ${info.dtype}; LoRA weights must be F32, F16 or BF16`);
    dtypes[info.dtype] = (dtypes[info.dtype] ?? 0) + 1;
    const expectR = (dim: number, what: string) => {
      if (info.shape.length !== 2 || info.shape[dim] !== c.r) {
        throw new Error(
          `${wFile}: tensor '${name}' has shape [${info.shape.join(', ')}] but lora_${which} must be ${what} with r = ${c.r} (${cfgFile})`,
        );
      }
    };
    expectR(which === 'A' ? 0 : 1, which === 'A' ? '[r, in]' : '[out, r]');
    const key = `${layer}.${target}`;
    const e = found.get(key) ?? { layer, target };
    e[which as 'A' | 'B'] = name;
    found.set(key, e);
  }
  if (found.size === 0) throw new Error(`${wFile}: holds no LoRA tensors`);
  const usedTargets = new Set<LoraTarget>();
  for (const e of found.values()) {
    if (!e.A || !e.B) {
      throw new Error(
        `${wFile}: layer ${e.layer} ${e.target} has lora_${e.A ? 'A' : 'B'} but no lora_${e.A ? 'B' : 'A'}`,
      );
    }
    if (c.targets && !c.targets.includes(e.target)) {
      throw new Error(`${wFile}: tensor '${e.A}' is for ${e.target}, which target_modules in ${cfgFile} does not list`);
    }
    if (c.layersToTransform && !c.layersToTransform.includes(e.layer)) {
      throw new Error(
        `${wFile}: tensor '${e.A}' is for layer ${e.layer}, which layers_to_transform in ${cfgFile} excludes`,
      );
    }
    usedTargets.add(e.target);
    while (layers.length <= e.layer) layers.push({});
    layers[e.layer]![e.target] = { a: st.readF32(e.A), b: st.readF32(e.B) };
  }
  const a: LoadedAdapter = {
    dir,
    r: c.r,
    loraAlpha: c.loraAlpha,
    loraDropout: c.loraDropout,
    targetModules: c.targets ?? LORA_TARGETS.filter((t) => usedTargets.has(t)),
    useRslora: c.useRslora,
    baseModelNameOrPath: c.baseModelNameOrPath,
    layers,
    scaling: 0,
    dtypes,
  };
  a.scaling = adapterScaling(a);
  return a;
}

function pairDims(a: AdapterWeights, layer: number, t: LoraTarget, p: LoraPair): { in: number; out: number } {
  const where = `layer ${layer} ${t}`;
  if (!(p.a instanceof Float32Array) || !(p.b instanceof Float32Array))
    throw new Error(`adapter ${where}: a and b must be Float32Arrays`);
  if (p.a.length % a.r !== 0 || p.b.length % a.r !== 0 || p.a.length === 0 || p.b.length === 0) {
    throw new Error(
      `adapter ${where}: A has ${p.a.length} and B ${p.b.length} elements, not non-zero multiples of r = ${a.r}`,
    );
  }
  return { in: p.a.length / a.r, out: p.b.length / a.r };
}

/**
 * Every way the adapter does not fit the base model, one line each naming the tensor and
 * both shapes (empty when it fits).
 */
export function adapterMismatches(a: AdapterWeights, c: LlamaConfig): string[] {
  const out: string[] = [];
  if (a.layers.length > c.numLayers) {
    out.push(
      `the adapter has weights for layer ${a.layers.length - 1} but the model has ${c.numLayers} layers (0..${c.numLayers - 1})`,
    );
  }
  a.layers.forEach((l, i) => {
    if (i >= c.numLayers) return;
    for (const t of LORA_TARGETS) {
      const p = l[t];
      if (!p) continue;
      const [mout, min] = projectionShape(c, t);
      const d = pairDims(a, i, t, p);
      if (d.in !== min)
        out.push(
          `${loraTensorName(i, t, 'A')}: adapter [${a.r}, ${d.in}], model ${t} needs [${a.r}, ${min}] (in = ${min})`,
        );
      if (d.out !== mout)
        out.push(
          `${loraTensorName(i, t, 'B')}: adapter [${d.out}, ${a.r}], model ${t} needs [${mout}, ${a.r}] (out = ${mout})`,
        );
    }
  });
  return out;
}

/** Throws an Error listing every mismatch when the adapter is not for a model of this config. */
export function checkAdapterAgainstModel(a: AdapterWeights, c: LlamaConfig, modelLabel = 'the base model'): void {
  const m = adapterMismatches(a, c);
  if (m.length) {
    throw new Error(
      `adapter${'dir' in a ? ` ${(a as LoadedAdapter).dir}` : ''} does not fit ${modelLabel} (${m.length} mismatch${m.length > 1 ? 'es' : ''}):\n  ` +
        m.slice(0, 10).join('\n  ') +
        (m.length > 10 ? `\n  ... and ${m.length - 10} more` : ''),
    );
  }
}

/** adapter_config.json contents as PEFT writes them. */
export function adapterConfigJson(a: AdapterWeights): Record<string, unknown> {
  // A layer with no weights below the last one: tell PEFT which layers have LoRA modules.
  const present = adapterLayerIndices(a);
  const gaps = present.length < a.layers.length;
  return {
    alpha_pattern: {},
    auto_mapping: null,
    base_model_name_or_path: a.baseModelNameOrPath,
    bias: 'none',
    fan_in_fan_out: false,
    inference_mode: true,
    init_lora_weights: true,
    layers_pattern: null,
    layers_to_transform: gaps ? present : null,
    lora_alpha: a.loraAlpha,
    lora_dropout: a.loraDropout,
    modules_to_save: null,
    peft_type: 'LORA',
    r: a.r,
    rank_pattern: {},
    revision: null,
    target_modules: [...a.targetModules],
    task_type: 'CAUSAL_LM',
    use_dora: false,
    use_rslora: a.useRslora,
  };
}

const OURS = new Set([ADAPTER_CONFIG, ADAPTER_WEIGHTS, 'README.md', 'adapter_model.bin']);

/**
 * Saves an adapter in PEFT format, atomically: everything is written and fsynced into a temp
 * directory next to DIR, then swapped in by rename. A crash leaves either the old complete
 * adapter, the new complete one, or (between the two renames) the old one at DIR.old-* and
 * the new one at DIR.tmp-*; never a half-written DIR. An existing DIR holding other files
 * than an adapter's is refused, so saving never deletes unrelated data.
 */
/** The safetensors entries of an adapter, in PEFT names, converted to the storage dtype. */
function adapterTensors(a: AdapterWeights, dtype: 'f32' | 'bf16' | 'f16'): Record<string, StTensorSource> {
  const st = dtype === 'f32' ? 'F32' : dtype === 'bf16' ? 'BF16' : 'F16';
  const tensors: Record<string, StTensorSource> = {};
  a.layers.forEach((l, i) => {
    for (const t of LORA_TARGETS) {
      const p = l[t];
      if (!p) continue;
      if (!a.targetModules.includes(t))
        throw new Error(`saveAdapter: layer ${i} has ${t} weights but targetModules does not list ${t}`);
      const d = pairDims(a, i, t, p);
      const conv = (x: Float32Array) => (st === 'F32' ? x : st === 'BF16' ? f32ToBf16(x) : f32ToF16(x));
      tensors[loraTensorName(i, t, 'A')] = { dtype: st, shape: [a.r, d.in], data: () => conv(p.a) };
      tensors[loraTensorName(i, t, 'B')] = { dtype: st, shape: [d.out, a.r], data: () => conv(p.b) };
    }
  });
  if (!Object.keys(tensors).length) throw new Error('saveAdapter: the adapter has no weights');
  return tensors;
}

/**
 * Writes adapter_model.safetensors then adapter_config.json into DIR, each file atomically
 * (temp file + fsync + rename), leaving anything else in DIR alone: a trainer's output dir
 * also holds its checkpoint-<step>/ folders.
 */
export function writeAdapterFiles(
  dir: string,
  a: AdapterWeights,
  options: { dtype?: 'f32' | 'bf16' | 'f16' } = {},
): void {
  parseAdapterConfig(adapterConfigJson(a), `writeAdapterFiles ${dir}`);
  const tensors = adapterTensors(a, options.dtype ?? 'f32');
  fs.mkdirSync(dir, { recursive: true });
  writeSafetensors(path.join(dir, ADAPTER_WEIGHTS), tensors, { format: 'pt' });
  writeFileAtomic(path.join(dir, ADAPTER_CONFIG), JSON.stringify(adapterConfigJson(a), null, 2) + '\n');
  fsyncDir(dir);
}

export function saveAdapter(dir: string, a: AdapterWeights, options: { dtype?: 'f32' | 'bf16' | 'f16' } = {}): void {
  if (!Number.isSafeInteger(a.r) || a.r <= 0) throw new Error(`saveAdapter: r must be a positive integer, got ${a.r}`);
  parseAdapterConfig(adapterConfigJson(a), `saveAdapter ${dir}`); // the config must be one we can read back
  const tensors = adapterTensors(a, options.dtype ?? 'f32');
  if (!Object.keys(tensors).length) throw new Error('saveAdapter: the adapter has no weights');

  const abs = path.resolve(dir);
  if (fs.existsSync(abs)) {
    if (!fs.statSync(abs).isDirectory()) throw new Error(`${dir}: exists and is not a directory`);
    const foreign = fs.readdirSync(abs).filter((f) => !OURS.has(f));
    if (foreign.length) {
      throw new Error(
        `${dir}: holds files that are not part of an adapter (${foreign.slice(0, 3).join(', ')}${foreign.length > 3 ? ', ...' : ''}); not replacing it`,
      );
    }
  }
  fs.mkdirSync(path.dirname(abs), { recursive: true });
  const tmp = tempSibling(abs);
  fs.mkdirSync(tmp);
  let old: string | undefined;
  try {
    writeSafetensors(path.join(tmp, ADAPTER_WEIGHTS), tensors, { format: 'pt' });
    writeFileAtomic(path.join(tmp, ADAPTER_CONFIG), JSON.stringify(adapterConfigJson(a), null, 2) + '\n');
    fsyncDir(tmp);
    if (fs.existsSync(abs)) {
      old = `${abs}.old-${process.pid}-${path.basename(tmp).slice(-8)}`;
      fs.renameSync(abs, old);
    }
    fs.renameSync(tmp, abs);
  } catch (e) {
    fs.rmSync(tmp, { recursive: true, force: true });
    if (old && !fs.existsSync(abs)) fs.renameSync(old, abs);
    throw e;
  }
  fsyncDir(path.dirname(abs));
  if (old) fs.rmSync(old, { recursive: true, force: true });
}
