// What the 'auto' split of `mlora train` balances: the run's data as the cost model sees it
// (sequence lengths and targeted rows, sampled from each adapter's dataset), and on this
// process's CPU stages the unit costs timed on each adapter's micro-batches
// (lib/schedule/calibrate.ts). The demo's stories run ~50-140 tokens in sequences of up to 256:
// the cost model needs the lengths the stages compute on, not the longest allowed (attention
// grows with them, the rest does not).
import fs from 'node:fs';
import type { AdapterConfig, TrainConfig } from '../../lib/config.js';
import { openModelDir } from '../../lib/io/hf-model.js';
import { parseDataset, readDataset, type Dataset } from '../../lib/data/dataset.js';
import { countTargets, tokenizeRecords } from '../../lib/data/tokenize.js';
import { resolveTemplate } from '../../lib/data/templates.js';
import { tokenizerFor } from '../../lib/data/tokenizer.js';
import { measureUnitCosts } from '../../lib/schedule/calibrate.js';
import type { SplitProfile } from '../../lib/schedule/split.js';
import { resolveLayout } from '../../actors/scheduler/layout.js';
import { loraSpec } from '../../actors/scheduler/prepare.js';

/** Records of each dataset the profile tokenizes (the first ones: enough for the mean lengths). */
export const PROFILE_RECORDS = 256;

/** Adapters whose micro-batches are timed (the first ones): enough for the mix of a run. */
export const PROFILE_ADAPTERS = 8;

/** What an adapter's sequences look like: lengths and targeted rows. */
export interface DataShape {
  /** Σ len² / Σ len: the length whose causal attention costs what the data's costs per token. */
  seqLen: number;
  /** Mean tokens per sequence. */
  meanLen: number;
  targetFraction: number;
}

/** Bytes of a JSONL dataset the profile reads at most: its first records, not a large file twice (the run reads it all). */
export const PROFILE_BYTES = 1 << 20;

/** The first records of a dataset: of a large JSONL file, the whole lines in its first PROFILE_BYTES. */
function datasetHead(file: string, skipBad: boolean): Dataset {
  const fd = fs.openSync(file, 'r');
  try {
    const size = fs.fstatSync(fd).size;
    const head = Buffer.alloc(Math.min(size, PROFILE_BYTES));
    fs.readSync(fd, head, 0, head.length, 0);
    const text = head.toString('utf8');
    // a JSON array (or a file read whole) parses as it is; else the lines before the cut
    if (size <= PROFILE_BYTES || text.trimStart().startsWith('[')) return readDataset(file, { skipBad });
    return parseDataset(text.slice(0, text.lastIndexOf('\n') + 1), file, { skipBad });
  } finally {
    fs.closeSync(fd);
  }
}

/** An adapter's data shape from the first records of its dataset; undefined when it cannot be read here (the run reports that itself). */
export function sampleDataShape(modelDir: string, a: AdapterConfig): DataShape | undefined {
  try {
    const ds = datasetHead(a.data, a.skip_bad_records);
    const n = Math.min(PROFILE_RECORDS, ds.records.length);
    const data = tokenizeRecords(tokenizerFor(modelDir, ds.format), ds.records.slice(0, n), ds.where.slice(0, n), {
      template: resolveTemplate(a.template, ds.format, a.data),
      seqLen: a.seq_len,
      trainOnInputs: a.train_on_inputs,
    });
    if (!data.examples.length) return undefined;
    let sum = 0,
      squares = 0,
      targets = 0;
    for (const e of data.examples) {
      const l = e.inputIds.length;
      sum += l;
      squares += l * l;
      targets += countTargets(e.labels);
    }
    return { seqLen: squares / sum, meanLen: sum / data.examples.length, targetFraction: targets / sum };
  } catch {
    return undefined;
  }
}

/** Micro-batches of an adapter per optimizer step: the adapters step at one pace (lib/schedule/fairness.ts), so this is how often its kind comes. */
function microBatchesPerStep(a: AdapterConfig): number {
  return Math.ceil(a.batch_size / a.micro_batch_size);
}

/** How the profile came about, for --dry-run. */
export interface ProfiledSplit {
  profile: SplitProfile;
  /** Per adapter, the sampled data shape (undefined: not readable here). */
  shapes: (DataShape | undefined)[];
  /** The micro-batches the costs were measured on: one step of each of these adapters (measured costs only). */
  measured?: { adapters: number; microBatches: number; tokens: number };
}

/**
 * The split profile of a run: the data's shape (every adapter's tokens weighed by how many it
 * trains per step), and measured unit costs where the split is 'auto' over more than one CPU
 * stage of this process and split_costs is 'measured'.
 */
export async function splitProfile(cfg: TrainConfig, cluster = false): Promise<ProfiledSplit> {
  const shapes = cfg.adapters.map((a) => sampleDataShape(cfg.model, a));
  let sum = 0,
    squares = 0,
    targets = 0;
  cfg.adapters.forEach((a, i) => {
    const s = shapes[i];
    if (!s) return;
    const tokens = a.batch_size * s.meanLen;
    sum += tokens;
    squares += tokens * s.seqLen;
    targets += tokens * s.targetFraction;
  });
  const profile: SplitProfile =
    sum > 0
      ? { seqLen: squares / sum, targetFraction: targets / sum }
      : { seqLen: Math.max(...cfg.adapters.map((a) => a.seq_len)) };
  if (cluster || cfg.pipeline.split !== 'auto' || cfg.pipeline.split_costs !== 'measured') return { profile, shapes };
  const dir = openModelDir(cfg.model);
  const layout = resolveLayout(dir.config, {
    devices: cfg.devices,
    ...(cfg.pipeline.threads ? { threads: cfg.pipeline.threads } : {}),
  });
  if (layout.devices.length < 2 || layout.devices.some((d) => !d.trim().startsWith('cpu'))) return { profile, shapes };
  // each adapter's micro-batch as sequences of its effective length, as many as make its mean tokens
  const timed = cfg.adapters.slice(0, PROFILE_ADAPTERS).map((a, i) => {
    const s = shapes[i] ?? { seqLen: a.seq_len, meanLen: a.seq_len, targetFraction: 1 };
    return {
      sequences: (a.micro_batch_size * s.meanLen) / s.seqLen,
      seqLen: s.seqLen,
      targetFraction: s.targetFraction,
      adapter: loraSpec(a),
      weight: microBatchesPerStep(a),
    };
  });
  const costs = await measureUnitCosts(dir, timed, {
    threads: Math.min(...layout.threads),
    base: {
      computeDtype: cfg.compute_dtype,
      ...(cfg.quantize ? { quantize: cfg.quantize } : {}),
      packWeights: cfg.pack_weights,
    },
    recompute: cfg.pipeline.recompute,
  });
  if (!costs) return { profile, shapes };
  return {
    profile: { ...profile, costs },
    shapes,
    measured: {
      adapters: timed.length,
      microBatches: timed.reduce((n, b) => n + b.weight, 0),
      tokens: Math.round(timed.reduce((n, b) => n + b.weight * b.sequences * b.seqLen, 0)),
    },
  };
}
