// mlora inspect DIR [--model BASEDIR] [--json]: what a model or adapter directory holds, and
// (for an adapter, with --model) whether it fits a base model. Reads headers and configs
// only, plus tokenizer.json, except for an adapter's (small) weights.
import fs from 'node:fs';
import path from 'node:path';
import { formatBytes } from '../../lib/tensor.js';
import { loadTokenizer } from '../../lib/data/tokenizer.js';
import { openModelDir, readModelConfig } from '../../lib/io/hf-model.js';
import {
  ADAPTER_CONFIG,
  adapterLayerIndices,
  adapterMismatches,
  adapterParameterCount,
  loadAdapter,
} from '../../lib/io/peft.js';
import type { LlamaConfig } from '../../lib/model/config.js';
import { parseCommandArgs, usageError, type Command } from './args.js';

const USAGE = `usage: mlora inspect DIR [--model BASEDIR] [--json]

  DIR            a Hugging Face model directory (config.json + safetensors) or a PEFT
                 LoRA adapter directory (adapter_config.json + adapter_model.safetensors)
  --model DIR    with an adapter: check that it fits this base model
  --json         print one JSON object instead of text`;

/** "0-3, 5" from [0, 1, 2, 3, 5]. */
function ranges(xs: number[]): string {
  const out: string[] = [];
  for (let i = 0; i < xs.length;) {
    let j = i;
    while (j + 1 < xs.length && xs[j + 1] === xs[j]! + 1) j++;
    out.push(i === j ? `${xs[i]}` : `${xs[i]}-${xs[j]}`);
    i = j + 1;
  }
  return out.join(', ');
}

function configSummary(c: LlamaConfig): Record<string, unknown> {
  return {
    modelType: c.modelType,
    hiddenSize: c.hiddenSize,
    intermediateSize: c.intermediateSize,
    numLayers: c.numLayers,
    numHeads: c.numHeads,
    numKvHeads: c.numKvHeads,
    headDim: c.headDim,
    vocabSize: c.vocabSize,
    maxPositionEmbeddings: c.maxPositionEmbeddings,
    rmsNormEps: c.rmsNormEps,
    ropeTheta: c.ropeTheta,
    tieWordEmbeddings: c.tieWordEmbeddings,
    torchDtype: c.torchDtype,
    ...(c.ropeScaling ? { ropeScaling: c.ropeScaling } : {}),
    ...(c.qkvBias ? { qkvBias: true } : {}),
    ...(c.qkNorm ? { qkNorm: true } : {}),
    ...(c.layerWindows ? { layerWindows: c.layerWindows } : {}),
  };
}

/** The layer variants of a model family, in words ('' for a plain LLaMA). */
function familyFeatures(c: LlamaConfig): string {
  const f: string[] = [];
  const r = c.ropeScaling;
  if (r)
    f.push(
      r.type === 'llama3'
        ? `rope llama3 (factor ${r.factor}, low/high ${r.lowFreqFactor}/${r.highFreqFactor}, original context ${r.originalMaxPositionEmbeddings})`
        : `rope ${r.type} (factor ${r.factor})`,
    );
  if (c.qkvBias) f.push('q/k/v biases');
  if (c.qkNorm) f.push('q/k norms');
  if (c.layerWindows) f.push(`sliding window ${c.layerWindows.map((w) => w || 'full').join('/')} per layer`);
  return f.join(', ');
}

const CMD: Command = { name: 'inspect', usage: USAGE };

export async function main(argv: string[]): Promise<number> {
  const parsed = parseCommandArgs(CMD, argv, { model: { type: 'string' }, json: { type: 'boolean' } }, true);
  if (typeof parsed === 'number') return parsed;
  const { values, positionals } = parsed;
  if (positionals.length !== 1) return usageError(CMD, `expected one directory, got ${positionals.length}`);
  const dir = positionals[0]!;
  if (!fs.existsSync(dir) || !fs.statSync(dir).isDirectory()) throw new Error(`${dir}: not a directory`);
  const json = values.json === true;

  if (fs.existsSync(path.join(dir, ADAPTER_CONFIG))) {
    const a = loadAdapter(dir);
    const layers = adapterLayerIndices(a);
    const report: Record<string, unknown> = {
      kind: 'adapter',
      dir,
      r: a.r,
      loraAlpha: a.loraAlpha,
      scaling: a.scaling,
      useRslora: a.useRslora,
      loraDropout: a.loraDropout,
      targetModules: a.targetModules,
      layers,
      parameters: adapterParameterCount(a),
      dtypes: a.dtypes,
      baseModelNameOrPath: a.baseModelNameOrPath,
    };
    let mismatches: string[] | undefined;
    if (values.model !== undefined) {
      const cfg = readModelConfig(values.model);
      mismatches = adapterMismatches(a, cfg);
      report.model = values.model;
      report.matchesModel = mismatches.length === 0;
      report.mismatches = mismatches;
    }
    if (json) console.log(JSON.stringify(report, null, 2));
    else {
      console.log(`adapter      ${dir}`);
      console.log(`base model   ${a.baseModelNameOrPath ?? '(not recorded)'}`);
      console.log(`r            ${a.r}`);
      console.log(`alpha        ${a.loraAlpha} (scaling ${a.scaling}${a.useRslora ? ', rsLoRA' : ''})`);
      console.log(`dropout      ${a.loraDropout}`);
      console.log(`targets      ${a.targetModules.join(' ')}`);
      console.log(`layers       ${ranges(layers)} (${layers.length})`);
      console.log(`parameters   ${adapterParameterCount(a).toLocaleString('en-US')}`);
      console.log(
        `dtypes       ${Object.entries(a.dtypes)
          .map(([k, v]) => `${k} ×${v}`)
          .join(', ')}`,
      );
      if (mismatches) {
        if (mismatches.length === 0) console.log(`model        ${values.model}: matches`);
        else {
          console.log(
            `model        ${values.model}: DOES NOT MATCH (${mismatches.length} mismatch${mismatches.length > 1 ? 'es' : ''})`,
          );
          for (const m of mismatches) console.log(`  ${m}`);
        }
      }
    }
    return mismatches && mismatches.length ? 1 : 0;
  }

  if (fs.existsSync(path.join(dir, 'config.json'))) {
    if (values.model !== undefined) throw new Error(`--model is for adapter directories; ${dir} is a model directory`);
    const m = openModelDir(dir);
    const s = m.stats();
    // The tokenizer (needed for text data and generate; pre-tokenized data works without one)
    let tokenizer:
      { vocabSize: number; bosId?: number; eosId?: number; chatTemplate: boolean } | { error: string } | null = null;
    if (fs.existsSync(path.join(dir, 'tokenizer.json'))) {
      try {
        const tk = loadTokenizer(dir, { fresh: true });
        tokenizer = {
          vocabSize: tk.vocabSize,
          ...(tk.bosId !== undefined ? { bosId: tk.bosId } : {}),
          ...(tk.eosId !== undefined ? { eosId: tk.eosId } : {}),
          chatTemplate: tk.hasChatTemplate,
        };
        if (tk.vocabSize > m.config.vocabSize)
          tokenizer = {
            error: `tokenizer.json has ${tk.vocabSize} tokens, more than the model's vocab_size ${m.config.vocabSize}`,
          };
      } catch (e) {
        tokenizer = { error: (e as Error).message };
      }
    }
    const report = {
      kind: 'model',
      dir,
      config: configSummary(m.config),
      files: m.files.map((f) => path.basename(f.path)),
      tensors: s.tensors,
      parameters: s.parameters,
      bytes: s.bytes,
      dtypes: s.dtypes,
      extraTensors: m.extraTensors,
      warnings: m.warnings,
      tokenizer,
    };
    if (json) console.log(JSON.stringify(report, null, 2));
    else {
      const c = m.config;
      console.log(`model        ${dir}`);
      console.log(
        `type         ${c.modelType}, ${c.numLayers} layers, hidden ${c.hiddenSize}, intermediate ${c.intermediateSize}`,
      );
      console.log(
        `attention    ${c.numHeads} heads, ${c.numKvHeads} kv heads, head_dim ${c.headDim}, rope_theta ${c.ropeTheta}`,
      );
      console.log(
        `vocab        ${c.vocabSize}, max positions ${c.maxPositionEmbeddings}, ${c.tieWordEmbeddings ? 'tied' : 'untied'} embeddings`,
      );
      const features = familyFeatures(c);
      if (features) console.log(`features     ${features}`);
      console.log(`rms_norm_eps ${c.rmsNormEps}`);
      console.log(`torch_dtype  ${c.torchDtype}`);
      console.log(`files        ${report.files.join(' ')}`);
      console.log(
        `tensors      ${s.tensors}${m.extraTensors.length ? ` (+${m.extraTensors.length} unused: ${m.extraTensors.slice(0, 3).join(', ')}${m.extraTensors.length > 3 ? ', ...' : ''})` : ''}`,
      );
      console.log(`parameters   ${s.parameters.toLocaleString('en-US')}`);
      console.log(
        `dtypes       ${Object.entries(s.dtypes)
          .map(([k, v]) => `${k} ×${v}`)
          .join(', ')}`,
      );
      console.log(`size         ${formatBytes(s.bytes)} (${s.bytes} bytes)`);
      if (!tokenizer) console.log('tokenizer    none (pre-tokenized data only)');
      else if ('error' in tokenizer) console.log(`tokenizer    UNUSABLE: ${tokenizer.error}`);
      else
        console.log(
          `tokenizer    ${tokenizer.vocabSize} tokens, bos ${tokenizer.bosId ?? '-'}, eos ${tokenizer.eosId ?? '-'}, chat template ${tokenizer.chatTemplate ? 'yes' : 'no'}`,
        );
      for (const w of m.warnings) console.log(`warning      ${w}`);
    }
    return 0;
  }
  throw new Error(`${dir}: neither a model directory (no config.json) nor an adapter directory (no ${ADAPTER_CONFIG})`);
}
