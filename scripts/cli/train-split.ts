// What the 'auto' split of `mlora train` balances: the run's data as the cost model sees it
// (sequence lengths and targeted rows, sampled from each adapter's dataset), and on this
// process's CPU stages the unit costs timed at that shape (lib/schedule/calibrate.ts). The
// demo's stories run ~50-140 tokens in sequences of up to 256: the cost model needs the lengths
// the stages compute on, not the longest allowed (attention grows with them, the rest does not).
import type { TrainConfig } from '../../lib/config.js';
import { openModelDir } from '../../lib/io/hf-model.js';
import { readDataset } from '../../lib/data/dataset.js';
import { countTargets, tokenizeRecords } from '../../lib/data/tokenize.js';
import { resolveTemplate } from '../../lib/data/templates.js';
import { tokenizerFor } from '../../lib/data/tokenizer.js';
import { adaptersPerMessage } from '../../lib/schedule/packing.js';
import { measureUnitCosts } from '../../lib/schedule/calibrate.js';
import type { SplitProfile } from '../../lib/schedule/split.js';
import { resolveLayout } from '../../actors/scheduler/layout.js';
import { loraSpec } from '../../actors/scheduler/prepare.js';

/** Records of each dataset the profile tokenizes (the first ones: enough for the mean lengths). */
export const PROFILE_RECORDS = 256;

/** What one message looks like: sequences in it, their effective length, the fraction of rows with a target. */
export interface DataShape {
  /** Σ len² / Σ len: the length whose causal attention costs what the data's costs per token. */
  seqLen: number;
  /** Mean tokens per sequence. */
  meanLen: number;
  targetFraction: number;
  /** Sequences per micro-batch, averaged over the adapters. */
  sequences: number;
}

/**
 * The data's shape from the first records of each adapter's dataset, each adapter weighted by
 * its micro-batch; undefined when a dataset cannot be read here (the run reports that itself).
 */
export function sampleDataShape(cfg: TrainConfig): DataShape | undefined {
  let sum = 0,
    count = 0,
    squares = 0,
    targets = 0,
    sequences = 0;
  try {
    for (const a of cfg.adapters) {
      const ds = readDataset(a.data, { skipBad: a.skip_bad_records });
      const n = Math.min(PROFILE_RECORDS, ds.records.length);
      const tok = tokenizerFor(cfg.model, ds.format);
      const data = tokenizeRecords(tok, ds.records.slice(0, n), ds.where.slice(0, n), {
        template: resolveTemplate(a.template, ds.format, a.data),
        seqLen: a.seq_len,
        trainOnInputs: a.train_on_inputs,
      });
      if (!data.examples.length) return undefined;
      // per sequence of this adapter's micro-batches
      const w = a.micro_batch_size / data.examples.length;
      for (const e of data.examples) {
        const l = e.inputIds.length;
        sum += w * l;
        count += w;
        squares += w * l * l;
        targets += w * countTargets(e.labels);
      }
      sequences += a.micro_batch_size / cfg.adapters.length;
    }
  } catch {
    return undefined;
  }
  return { seqLen: squares / sum, meanLen: sum / count, targetFraction: targets / sum, sequences };
}

/** How the profile came about, for --dry-run. */
export interface ProfiledSplit {
  profile: SplitProfile;
  /** The sampled data shape; undefined: the longest seq_len. */
  shape?: DataShape;
  /** The tokens per micro-batch the costs were measured at (measured costs only). */
  measuredTokens?: number;
}

/**
 * The split profile of a run: the data's shape, and measured unit costs where the split is
 * 'auto' over more than one CPU stage of this process and split_costs is 'measured'.
 */
export async function splitProfile(cfg: TrainConfig, cluster = false): Promise<ProfiledSplit> {
  const longest = Math.max(...cfg.adapters.map((a) => a.seq_len));
  const shape = sampleDataShape(cfg);
  const profile: SplitProfile = shape
    ? { seqLen: shape.seqLen, targetFraction: shape.targetFraction }
    : { seqLen: longest };
  if (cluster || cfg.pipeline.split !== 'auto' || cfg.pipeline.split_costs !== 'measured') return { profile, shape };
  const dir = openModelDir(cfg.model);
  const layout = resolveLayout(dir.config, {
    devices: cfg.devices,
    ...(cfg.pipeline.threads ? { threads: cfg.pipeline.threads } : {}),
  });
  const S = layout.devices.length;
  if (S < 2 || layout.devices.some((d) => !d.trim().startsWith('cpu'))) return { profile, shape };
  const per = cfg.pipeline.batchlora
    ? adaptersPerMessage(cfg.adapters.length, S, cfg.pipeline.adapters_per_micro_batch)
    : 1;
  // sequences of the effective length, as many as make the mean message's tokens
  const seqLen = shape?.seqLen ?? longest;
  const sequences =
    (per * (shape ? shape.sequences * shape.meanLen : cfg.adapters[0]!.micro_batch_size * longest)) / seqLen;
  const costs = await measureUnitCosts(dir, {
    sequences,
    seqLen,
    targetFraction: shape?.targetFraction ?? 1,
    adapters: cfg.adapters.slice(0, per).map(loraSpec),
    threads: Math.min(...layout.threads),
    base: { computeDtype: cfg.compute_dtype, ...(cfg.quantize ? { quantize: cfg.quantize } : {}) },
    recompute: cfg.pipeline.recompute,
  });
  if (!costs) return { profile, shape };
  return { profile: { ...profile, costs }, shape, measuredTokens: Math.round(sequences * seqLen) };
}
