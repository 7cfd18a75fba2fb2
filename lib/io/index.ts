// Formats: safetensors, Hugging Face model directories, PEFT LoRA adapters.
export * from './dtype.js';
export * from './safetensors.js';
export * from './hf-config.js';
export * from './hf-tensors.js';
export * from './hf-model.js';
export * from './random-model.js';
export * from './peft.js';
export * from './merge.js';
