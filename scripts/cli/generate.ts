// mlora generate --model DIR [--adapter DIR] --prompt TEXT [--max-new-tokens N] [--temperature T] [--top-k K] [--seed N] [--chat]
import { parseArgs } from 'node:util';
import { loadTokenizer } from '../../lib/data/tokenizer.js';
import { openSingleModel } from '../../lib/model/single.js';
import { encodePrompt, generate } from '../../lib/model/generate.js';

const USAGE =
  'usage: mlora generate --model DIR [--adapter DIR] --prompt TEXT [--max-new-tokens N] [--temperature T] [--top-k K] [--seed N] [--chat] [--threads N] [--json]';

export async function main(argv: string[]): Promise<number> {
  let a;
  try {
    a = parseArgs({
      args: argv,
      options: {
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
        help: { type: 'boolean', short: 'h' },
      },
    });
  } catch (e) {
    console.error(`mlora generate: ${(e as Error).message}\n${USAGE}`);
    return 2;
  }
  if (a.values.help) return (console.log(USAGE), 0);
  if (!a.values.model || a.values.prompt === undefined) {
    console.error(`mlora generate: --model and --prompt are required\n${USAGE}`);
    return 2;
  }
  const opts: Record<string, number> = {};
  for (const [k, def, integer] of [
    ['max-new-tokens', 64, true],
    ['temperature', 0, false],
    ['top-k', 0, true],
    ['seed', 0, true],
    ['threads', 1, true],
  ] as const) {
    const v = a.values[k];
    const n = v === undefined ? def : Number(v);
    if (!(integer ? Number.isInteger(n) : Number.isFinite(n)) || n < 0 || (k === 'threads' && n < 1)) {
      console.error(
        `mlora generate: --${k} must be a ${k === 'threads' ? 'positive' : 'non-negative'} ${integer ? 'integer' : 'number'}, got '${v}'\n${USAGE}`,
      );
      return 2;
    }
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
