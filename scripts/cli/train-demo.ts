// The embedded demo of `mlora train` (no CONFIG): four adapters fine-tuning the shipped
// stories260K on the story datasets in data/demo/stories/.
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { LORA_TARGETS } from '../../lib/model/config.js';

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../../..');

/** The base model of the demo: stories260K, shipped in data/models/ (a real pretrained LLaMA). */
export const DEMO_MODEL = path.join(root, 'data/models/stories260K');

/**
 * The embedded demo: four adapters on stories260K, each teaching it something a greedy
 * sample shows (a new character, a setting, a style, a format), with different LoRA settings;
 * held-out loss on each adapter's eval split and a greedy sample, before and after training.
 * `fast`: a few steps of small batches and short samples (tests).
 */
export function demoConfig(modelDir: string, output: string, fast: boolean): unknown {
  const data = (n: string) => path.join(root, 'data/demo/stories', `${n}.jsonl`);
  const steps = fast ? 8 : 60;
  const common = {
    seq_len: 256,
    batch_size: fast ? 4 : 8,
    epochs: fast ? 1 : 3,
    max_steps: steps,
    save_every: fast ? 4 : 20,
    schedule: { type: 'cosine', warmup_steps: fast ? 0 : 4 },
  };
  // held-out loss before the first step, every 20 steps and after the last; a greedy sample
  // from the prompt before training and after it shows what the adapter taught
  const adapter = (name: string, seed: number, prompt: string, rest: Record<string, unknown>) => ({
    name,
    data: data(name),
    eval: { data: data(`${name}.eval`), every: fast ? steps : 20, prompts: [prompt], max_new_tokens: fast ? 24 : 48 },
    ...common,
    seed,
    ...rest,
  });
  // alpha = 2r: every adapter's update has the same scale, whatever its rank
  const lora = (r: number, targets: readonly string[]) => ({ r, alpha: 2 * r, dropout: 0, targets });
  return {
    model: modelDir,
    output,
    adapters: [
      adapter('robot', 1, 'Once upon a time,', { lora: lora(8, LORA_TARGETS), optimizer: { lr: 3e-3 } }),
      adapter('sea', 2, 'Once upon a time,', {
        lora: lora(4, ['q_proj', 'v_proj', 'o_proj', 'up_proj', 'down_proj']),
        optimizer: { lr: 5e-3 },
      }),
      adapter('rhyme', 3, 'Once upon a time,', {
        lora: lora(16, LORA_TARGETS),
        optimizer: { lr: 4e-3, weight_decay: 0.01 },
        micro_batch_size: fast ? 2 : 4,
      }),
      adapter('dialogue', 4, 'Mom:', { lora: lora(8, LORA_TARGETS), optimizer: { lr: 4e-3 }, max_grad_norm: 1 }),
    ],
    // 8 messages, not the default 2 × stages: rhyme's step is 2 micro-batches, so 4 would leave
    // an adapter waiting whenever rhyme has both in flight and another's next micro-batch goes
    // out ahead of its step (docs/benchmarks.md, demo: the bubble 8.5–8.8% at 4, 6.2–7.2% at 6
    // on an Intel Xeon); on a faster CPU the stage calls are shorter and the wait for an
    // adapter's step weighs more: 6.6–11.8% at 6, 6.2–8.4% at 8 (AMD Zen 5, 9 runs each)
    pipeline: { inflight: 8 },
    log: { every: fast ? 1 : 5, progress: 'auto' },
  };
}
