#!/usr/bin/env node
// The mlora command line. Each command lives in scripts/cli/<name>.ts and is loaded only when
// used, so `mlora --help` is instant.
const commands: Record<string, { summary: string }> = {
  train: { summary: 'train adapters (no CONFIG: the embedded demo)' },
  eval: { summary: 'loss and perplexity of a model (+adapter) on a dataset' },
  generate: { summary: 'continue a prompt with a model (+adapter)' },
  bench: { summary: 'benchmarks: kernels, batchlora, head, recompute, pipeline, gpu' },
  merge: { summary: 'fold a LoRA adapter into its base model (a plain HF model directory)' },
  'make-model': { summary: 'write a seeded random LLaMA in the Hugging Face layout' },
  inspect: { summary: 'what a model or adapter directory holds' },
  info: { summary: 'the native core: CPU features, CUDA devices, ops' },
  stage: { summary: "stage serve: offer this host's devices to --cluster runs" },
};

function usage(): string {
  const lines = ['usage: mlora <command> [options]', '', 'commands:'];
  for (const [name, c] of Object.entries(commands)) lines.push(`  ${name.padEnd(12)} ${c.summary}`);
  lines.push('', 'mlora <command> --help for the options of one command.');
  return lines.join('\n');
}

async function run(): Promise<number> {
  const [cmd, ...rest] = process.argv.slice(2);
  if (!cmd || cmd === '--help' || cmd === '-h' || cmd === 'help') {
    console.log(usage());
    return cmd ? 0 : 2;
  }
  const c = commands[cmd];
  if (!c) {
    console.error(`mlora: unknown command '${cmd}'\n\n${usage()}`);
    return 2;
  }
  let mod;
  try {
    mod = (await import(`./cli/${cmd}.js`)) as { main(argv: string[]): Promise<number> };
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === 'ERR_MODULE_NOT_FOUND') {
      console.error(`mlora: the command '${cmd}' is not available in this build`);
      return 2;
    }
    throw e;
  }
  return mod.main(rest);
}

run().then(
  (code) => {
    process.exitCode = code;
  },
  (e: unknown) => {
    const err = e as Error;
    console.error(`mlora: ${err?.message ?? String(e)}`);
    if (process.env.MLORA_DEBUG) console.error(err?.stack);
    process.exitCode = 1;
  },
);
