// piscina worker: tokenizes one chunk of records. The tokenizer is loaded from the model
// directory once per worker thread (loadTokenizer caches it; pre-tokenized data needs only the vocabulary).
import type { DataRecord } from './dataset.js';
import type { ResolvedTemplate } from './templates.js';
import { tokenizeChunk, type TokenizedChunk } from './tokenize.js';
import { tokenizerFor } from './tokenizer.js';

export interface TokenizeTask {
  modelDir: string;
  /** The dataset's format: pre-tokenized data needs no tokenizer.json. */
  format: string;
  records: DataRecord[];
  where: string[];
  template: ResolvedTemplate;
  seqLen: number;
  trainOnInputs: boolean;
}

export default function tokenizeTask(task: TokenizeTask): TokenizedChunk {
  const tok = tokenizerFor(task.modelDir, task.format);
  return tokenizeChunk(tok, task.records, task.where, { template: task.template, seqLen: task.seqLen, trainOnInputs: task.trainOnInputs });
}
