// mlora generate --model DIR [--adapter DIR] --prompt TEXT [--max-new-tokens N] [--temperature T] [--top-k K] [--seed N] [--chat]
import { parseArgs } from 'node:util';
import { loadTokenizer } from '../../lib/data/tokenizer.js';
import { openSingleModel } from '../../lib/model/single.js';
import { generate } from '../../lib/model/generate.js';

const USAGE = 'usage: mlora generate --model DIR [--adapter DIR] --prompt TEXT [--max-new-tokens N] [--temperature T] [--top-k K] [--seed N] [--chat] [--threads N] [--json]';

export async function main(argv: string[]): Promise<number> {
  let a;
  try {
    a = parseArgs({ args: argv, options: {
      model: { type: 'string' }, adapter: { type: 'string' }, prompt: { type: 'string' }, 'max-new-tokens': { type: 'string' },
      temperature: { type: 'string' }, 'top-k': { type: 'string' }, seed: { type: 'string' }, chat: { type: 'boolean' }, threads: { type: 'string' },
      json: { type: 'boolean' }, help: { type: 'boolean', short: 'h' },
    } });
  } catch (e) {
    console.error(`mlora generate: ${(e as Error).message}\n${USAGE}`);
    return 2;
  }
  if (a.values.help) return (console.log(USAGE), 0);
  if (!a.values.model || a.values.prompt === undefined) {
    console.error(`mlora generate: --model and --prompt are required\n${USAGE}`);
    return 2;
  }
  const num = (k: string, def: number) => {
    const v = (a.values as Record<string, string | undefined>)[k];
    if (v === undefined) return def;
    const n = Number(v);
    if (!Number.isFinite(n) || n < 0) throw new Error(`--${k} must be a non-negative number, got '${v}'`);
    return n;
  };
  const tok = loadTokenizer(a.values.model);
  const text = a.values.chat ? tok.applyChatTemplate([{ role: 'user', content: a.values.prompt }], { addGenerationPrompt: true }) : a.values.prompt;
  const ids = tok.encode(text, { addSpecialTokens: !a.values.chat });
  const m = await openSingleModel(a.values.model, a.values.adapter, { threads: num('threads', 1) });
  try {
    const t = performance.now();
    const out = await generate(m, ids, {
      maxNewTokens: num('max-new-tokens', 64), temperature: num('temperature', 0), topK: num('top-k', 0), seed: num('seed', 0),
      ...(tok.eosId !== undefined ? { eosId: tok.eosId } : {}),
    });
    const ms = performance.now() - t;
    const completion = tok.decode(out, { skipSpecialTokens: true });
    if (a.values.json) console.log(JSON.stringify({ prompt: a.values.prompt, completion, tokens: out, ms: Math.round(ms) }));
    else {
      console.log(text + completion);
      console.error(`(${out.length} tokens in ${(ms / 1000).toFixed(2)} s)`);
    }
  } finally {
    m.free();
  }
  return 0;
}
