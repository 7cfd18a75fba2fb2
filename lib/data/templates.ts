// Prompt templates: how a record becomes a prompt (not learned unless train_on_inputs) and
// a response (learned).
//
//   alpaca   the standard Alpaca prompt, with and without `input` (instruction data)
//   chat     the tokenizer's chat_template from tokenizer_config.json (chat data)
//   plain    the text as is (text data)
//   FILE     a template file (instruction data), JSON:
//              {
//                "description": "optional, for people",
//                "prompt": "### Question:\n{instruction}\n\n### Context:\n{input}\n\n### Answer:\n",
//                "prompt_no_input": "### Question:\n{instruction}\n\n### Answer:\n",
//                "response": "{output}"
//              }
//            Placeholders: {instruction}, {input}, {output}; write {{ and }} for literal braces.
//            `prompt` is required; `prompt_no_input` (used when a record has no or an empty
//            input) defaults to `prompt` with {input} empty; `response` defaults to "{output}".
// Pre-tokenized data takes no template. The default is by data format: instruction ->
// alpaca, chat -> chat, text -> plain.
import { readFileSync } from 'node:fs';
import type { DataFormat, InstructionRecord } from './dataset.js';

export interface PromptTemplate {
  kind: 'prompt';
  name: string;
  prompt: string;
  promptNoInput: string;
  response: string;
}
export type ResolvedTemplate = PromptTemplate | { kind: 'chat'; name: 'chat' } | { kind: 'plain'; name: 'plain' } | { kind: 'none'; name: 'none' };

export const ALPACA: PromptTemplate = {
  kind: 'prompt',
  name: 'alpaca',
  prompt:
    'Below is an instruction that describes a task, paired with an input that provides further context. ' +
    'Write a response that appropriately completes the request.\n\n' +
    '### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n',
  promptNoInput:
    'Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n' +
    '### Instruction:\n{instruction}\n\n### Response:\n',
  response: '{output}',
};

export const TEMPLATE_NAMES = ['alpaca', 'chat', 'plain'] as const;

const PLACEHOLDER = /\{\{|\}\}|\{([^{}]*)\}/g;
const FIELDS = ['instruction', 'input', 'output'];

/** Checks a template string's placeholders; returns an error text or undefined. */
function checkPlaceholders(s: string): string | undefined {
  for (const m of s.matchAll(PLACEHOLDER)) {
    if (m[1] !== undefined && !FIELDS.includes(m[1])) return `unknown placeholder {${m[1]}} (allowed: {instruction}, {input}, {output}; {{ and }} for braces)`;
  }
  const stray = s.replace(PLACEHOLDER, '');
  if (/[{}]/.test(stray)) return `unbalanced brace (write {{ and }} for literal braces)`;
  return undefined;
}

export function fillTemplate(s: string, values: Record<string, string>): string {
  return s.replace(PLACEHOLDER, (m, name: string | undefined) => (m === '{{' ? '{' : m === '}}' ? '}' : values[name!] ?? ''));
}

/** Reads and validates a template file (format above). Errors name the file and field. */
export function loadTemplateFile(file: string): PromptTemplate {
  let raw: unknown;
  try {
    raw = JSON.parse(readFileSync(file, 'utf8'));
  } catch (e) {
    throw new Error(`${file}: cannot read the template file: ${(e as Error).message}`);
  }
  if (!raw || typeof raw !== 'object' || Array.isArray(raw)) throw new Error(`${file}: a template file must be a JSON object {prompt, prompt_no_input?, response?}`);
  const r = raw as Record<string, unknown>;
  const get = (k: string, def?: string): string => {
    const v = r[k];
    if (v === undefined && def !== undefined) return def;
    if (v === undefined) throw new Error(`${file}: field '${k}' is missing`);
    if (typeof v !== 'string') throw new Error(`${file}: field '${k}' must be a string`);
    const err = checkPlaceholders(v);
    if (err) throw new Error(`${file}: field '${k}': ${err}`);
    return v;
  };
  for (const k of Object.keys(r))
    if (!['prompt', 'prompt_no_input', 'response', 'description'].includes(k))
      throw new Error(`${file}: unknown field '${k}' (allowed: prompt, prompt_no_input, response, description)`);
  const prompt = get('prompt');
  if (!prompt.includes('{instruction}')) throw new Error(`${file}: field 'prompt' must contain {instruction}`);
  const promptNoInput = get('prompt_no_input', prompt); // with {input} = ''
  const response = get('response', '{output}');
  return { kind: 'prompt', name: file, prompt, promptNoInput, response };
}

export function defaultTemplateName(format: DataFormat): string {
  switch (format) {
    case 'instruction': return 'alpaca';
    case 'chat': return 'chat';
    case 'text': return 'plain';
    case 'tokenized': return 'none';
  }
}

/**
 * Resolves a template spec (a name, a file path, or undefined for the format's default) for
 * data of `format`, and checks they fit together. `dataFile` names the data in errors.
 */
export function resolveTemplate(spec: string | undefined, format: DataFormat, dataFile = 'dataset'): ResolvedTemplate {
  const name = spec ?? defaultTemplateName(format);
  const mismatch = (need: string) =>
    new Error(`${dataFile}: template '${name}' cannot render ${format} data (${format} data needs ${need})`);
  if (format === 'tokenized') {
    if (spec !== undefined && spec !== 'none') throw new Error(`${dataFile}: pre-tokenized data (input_ids) takes no template, got '${spec}'`);
    return { kind: 'none', name: 'none' };
  }
  if (name === 'chat') {
    if (format !== 'chat') throw mismatch(format === 'text' ? "template 'plain'" : "template 'alpaca' or a template file");
    return { kind: 'chat', name: 'chat' };
  }
  if (name === 'plain') {
    if (format !== 'text') throw mismatch(format === 'chat' ? "template 'chat'" : "template 'alpaca' or a template file");
    return { kind: 'plain', name: 'plain' };
  }
  if (format === 'chat') throw mismatch("template 'chat'");
  if (format === 'text') throw mismatch("template 'plain'");
  if (name === 'alpaca') return ALPACA;
  if (name === 'none') throw mismatch("template 'alpaca' or a template file");
  if (!/[./\\]/.test(name))
    throw new Error(`${dataFile}: unknown template '${name}' (allowed: ${TEMPLATE_NAMES.join(', ')}, or a template file path)`);
  return loadTemplateFile(name);
}

/** The prompt and response text of an instruction record under a prompt template. */
export function renderInstruction(t: PromptTemplate, r: InstructionRecord): { prompt: string; response: string } {
  const values = { instruction: r.instruction, input: r.input ?? '', output: r.output };
  return { prompt: fillTemplate(r.input ? t.prompt : t.promptNoInput, values), response: fillTemplate(t.response, values) };
}
