// mlora generate --model DIR [--adapter DIR] --prompt TEXT [--max-new-tokens N] [--temperature T] [--top-k K] [--seed N] [--chat]
import { badNumber, numberOption, parseCommandArgs, usageError, type Command } from './args.js';
import { loadTokenizer } from '../../lib/data/tokenizer.js';
import { openSingleModel } from '../../lib/model/single.js';
import { encodePrompt, generate } from '../../lib/model/generate.js';

const USAGE =
  'usage: mlora generate --model DIR [--adapter DIR] --prompt TEXT [--max-new-tokens N] [--temperature T] [--top-k K] [--seed N] [--chat] [--threads N] [--json]';

const CMD: Command = { name: 'generate', usage: USAGE };

export async function main(argv: string[]): Promise<number> {
  const a = parseCommandArgs(CMD, argv, {
    model: { type: 'string' },
    adapter: { type: 'string' },
    prompt: { type: 'string' },
    'max-new-tokens': { type: 'string' },
    temperature: { type: 'string' },
    'top-k': { type: 'string' },
    seed: { type: 'string' },
    chat: { type: 'boolean' },
    threads: { type: 'string' },
    json: { type: 'boolean' },
  });
  if (typeof a === 'number') return a;
  if (!a.values.model || a.values.prompt === undefined) return usageError(CMD, '--model and --prompt are required');
  const opts: Record<string, number> = {};
  for (const [k, def, kind] of [
    ['max-new-tokens', 64, 'non-negative integer'],
    ['temperature', 0, 'non-negative number'],
    ['top-k', 0, 'non-negative integer'],
    ['seed', 0, 'non-negative integer'],
    ['threads', 1, 'positive integer'],
  ] as const) {
    const n = numberOption(a.values[k], def, kind);
    if (n === undefined) return badNumber(CMD, k, a.values[k], kind);
    opts[k] = n;
  }
  const tok = loadTokenizer(a.values.model);
  const text = a.values.chat
    ? tok.applyChatTemplate([{ role: 'user', content: a.values.prompt }], { addGenerationPrompt: true })
    : a.values.prompt;
  const m = await openSingleModel(a.values.model, a.values.adapter, { threads: opts.threads! });
  try {
    const ids = encodePrompt(tok, m.config, text, a.values.chat);
    if (tok.vocabSize > m.config.vocabSize)
      throw new Error(
        `${a.values.model}: tokenizer.json has ${tok.vocabSize} tokens, more than the model's vocab_size ${m.config.vocabSize}: they do not belong together`,
      );
    const t = performance.now();
    const out = await generate(m, ids, {
      maxNewTokens: opts['max-new-tokens']!,
      temperature: opts.temperature!,
      topK: opts['top-k']!,
      seed: opts.seed!,
      ...(tok.eosId !== undefined ? { eosId: tok.eosId } : {}),
    });
    const ms = performance.now() - t;
    const completion = tok.decodeAfter(ids, out, { skipSpecialTokens: true });
    if (a.values.json)
      console.log(JSON.stringify({ prompt: a.values.prompt, completion, tokens: out, ms: Math.round(ms) }));
    else {
      console.log(text + completion);
      console.error(`(${out.length} tokens in ${(ms / 1000).toFixed(2)} s)`);
    }
  } finally {
    m.free();
  }
  return 0;
}
