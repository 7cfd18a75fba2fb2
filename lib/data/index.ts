// lib/data: tokenizer loading, the BPE tokenizer mlora writes, datasets, prompt templates,
// tokenization, the tokenizing pool, and the per-adapter data loader.
export { loadTokenizer, modelVocabulary, tokenizerFor } from './tokenizer.js';
export type { Tokenizer, ChatMessage, ChatRole, EncodeOptions } from './tokenizer.js';
export {
  writeTokenizerFiles, trainByteLevelBpe, bytesToUnicode,
  SPECIAL_TOKENS, UNK_ID, BOS_ID, EOS_ID, PAD_ID, MIN_VOCAB, DEFAULT_CHAT_TEMPLATE,
} from './bpe.js';
export type { WriteTokenizerOptions, TrainedBpe } from './bpe.js';
export { readDataset, parseDataset, parseRecord, detectFormat, DataRecordError, DATA_FORMATS, CHAT_ROLES } from './dataset.js';
export type { Dataset, DataFormat, DataRecord, InstructionRecord, ChatRecord, TextRecord, TokenizedRecord, ReadDatasetOptions } from './dataset.js';
export { ALPACA, TEMPLATE_NAMES, resolveTemplate, loadTemplateFile, defaultTemplateName, renderInstruction, fillTemplate } from './templates.js';
export type { PromptTemplate, ResolvedTemplate } from './templates.js';
export { IGNORE_INDEX, tokenizeRecord, tokenizeRecords, tokenizeChunk, joinChunks, countTargets } from './tokenize.js';
export type { TokenizedExample, TokenizedDataset, TokenizedChunk, TokenizeOptions } from './tokenize.js';
export { tokenizeDataset, loadTrainingData } from './pool.js';
export type { TokenizeDatasetOptions, TrainingData } from './pool.js';
export { AdapterDataLoader } from './loader.js';
export type { LoaderOptions, LoaderState, MicroBatch } from './loader.js';
export { demoDatasets, demoCorpus } from './demo.js';
