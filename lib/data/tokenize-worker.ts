// piscina worker: tokenizes one chunk of records. The tokenizer is loaded from the model
// directory once per worker thread (loadTokenizer caches it).
import type { DataRecord } from './dataset.js';
import type { ResolvedTemplate } from './templates.js';
import { tokenizeChunk, type TokenizedChunk } from './tokenize.js';
import { loadTokenizer } from './tokenizer.js';

export interface TokenizeTask {
  modelDir: string;
  records: DataRecord[];
  where: string[];
  template: ResolvedTemplate;
  seqLen: number;
  trainOnInputs: boolean;
}

export default function tokenizeTask(task: TokenizeTask): TokenizedChunk {
  const tok = loadTokenizer(task.modelDir);
  return tokenizeChunk(tok, task.records, task.where, { template: task.template, seqLen: task.seqLen, trainOnInputs: task.trainOnInputs });
}
