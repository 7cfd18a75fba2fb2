// Tokenizing a dataset: inline for small ones, in a piscina worker pool for large ones
// (chunks of records, results joined in file order, so both paths give identical examples).
// The pool lives only for one call and is destroyed before it returns: no threads outlive it.
import { availableParallelism } from 'node:os';
import { Piscina } from 'piscina';
import { readDataset, type Dataset, type ReadDatasetOptions } from './dataset.js';
import { resolveTemplate } from './templates.js';
import { joinChunks, tokenizeChunk, type TokenizedChunk, type TokenizedDataset } from './tokenize.js';
import type { TokenizeTask } from './tokenize-worker.js';
import { tokenizerFor } from './tokenizer.js';

export interface TokenizeDatasetOptions {
  /** Model directory with tokenizer.json (+ tokenizer_config.json; pre-tokenized data needs neither); workers load it from here. */
  modelDir: string;
  /** Template name or file; default by data format (templates.ts). */
  template?: string;
  seqLen: number;
  trainOnInputs?: boolean;
  /** Datasets with fewer records are tokenized inline, without workers. Default 2000. */
  poolThreshold?: number;
  /** Records per worker task. Default 512. */
  chunkSize?: number;
  /** Worker threads. Default min(4, available parallelism). */
  threads?: number;
}

export interface TrainingData extends TokenizedDataset {
  file: string;
  format: Dataset['format'];
  template: string;
  /** Bad records skipped while reading (skipBad). */
  skipped: number;
  /** Whether a worker pool was used. */
  pooled: boolean;
}

export async function tokenizeDataset(ds: Dataset, opts: TokenizeDatasetOptions): Promise<TrainingData> {
  const template = resolveTemplate(opts.template, ds.format, ds.file);
  const trainOnInputs = opts.trainOnInputs ?? false;
  const seqLen = opts.seqLen;
  const tok = tokenizerFor(opts.modelDir, ds.format); // fails early (and names the file) on a bad tokenizer
  if (template.kind === 'chat' && !tok.hasChatTemplate) tok.applyChatTemplate([]); // throws the clear error
  const threshold = opts.poolThreshold ?? 2000;
  const chunkSize = Math.max(1, opts.chunkSize ?? 512);
  let chunks: TokenizedChunk[];
  const pooled = ds.records.length >= threshold;
  if (!pooled) {
    chunks = [tokenizeChunk(tok, ds.records, ds.where, { template, seqLen, trainOnInputs })];
  } else {
    const nChunks = Math.ceil(ds.records.length / chunkSize);
    const threads = Math.max(1, Math.min(opts.threads ?? Math.min(4, availableParallelism()), nChunks));
    const pool = new Piscina({
      filename: new URL('./tokenize-worker.js', import.meta.url).href,
      minThreads: threads,
      maxThreads: threads,
      // The workers need no loader flags of the parent (a test runner's hooks, say): leaving
      // them out makes a worker start in a fraction of the time.
      execArgv: [],
    });
    try {
      const tasks: Array<Promise<TokenizedChunk>> = [];
      for (let c = 0; c < nChunks; c++) {
        const lo = c * chunkSize, hi = Math.min(ds.records.length, lo + chunkSize);
        const task: TokenizeTask = {
          modelDir: opts.modelDir, format: ds.format, records: ds.records.slice(lo, hi), where: ds.where.slice(lo, hi), template, seqLen, trainOnInputs,
        };
        tasks.push(pool.run(task) as Promise<TokenizedChunk>);
      }
      // allSettled: every task has ended before the pool is destroyed; the first error wins.
      const settled = await Promise.allSettled(tasks);
      const failed = settled.find((s) => s.status === 'rejected');
      if (failed) throw (failed as PromiseRejectedResult).reason;
      chunks = settled.map((s) => (s as PromiseFulfilledResult<TokenizedChunk>).value);
    } finally {
      await pool.destroy();
    }
  }
  return { ...joinChunks(chunks, seqLen), file: ds.file, format: ds.format, template: template.name, skipped: ds.skipped, pooled };
}

/** Reads a dataset file and tokenizes it: what an adapter's data loader is built from. */
export async function loadTrainingData(file: string, opts: TokenizeDatasetOptions & ReadDatasetOptions): Promise<TrainingData> {
  return tokenizeDataset(readDataset(file, opts), opts);
}
