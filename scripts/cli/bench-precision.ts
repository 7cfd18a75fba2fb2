// `mlora bench --scenario precision`: training throughput and resident memory per base format.
import { LORA_TARGETS } from '../../lib/model/config.js';
import { openModelDir } from '../../lib/io/hf-model.js';
import { openDevice } from '../../lib/tensor.js';
import { freeStageWeights, loadStageWeights, type BaseFormat } from '../../lib/model/weights.js';
import { StageProgram } from '../../lib/model/stage.js';
import type { LoraSpec } from '../../lib/lora/adapter.js';
import { freshState } from '../../lib/lora/state.js';
import { LocalPipeline } from '../../actors/local.js';
import { assemble } from '../../actors/scheduler/assemble.js';
import { Rng } from '../../lib/rng.js';
import { ensureModel } from './make-model.js';
import { cacheModels, syntheticMicroBatch } from './bench-common.js';

export interface PrecisionBenchRecord {
  scenario: 'precision';
  model: string;
  mode: string;
  tokens: number;
  step_ms: number;
  tokens_per_s: number;
  /** bytes of the base weights on the device (the allocator's count) */
  base_bytes: number;
  /** the device's bytes in use while training (base, adapter, no micro-batch at rest) */
  device_bytes: number;
  /** the process's resident set after the steps */
  rss_bytes: number;
}

/** The base formats the precision scenario compares (mode name → BaseFormat). */
export const PRECISION_MODES: Record<string, BaseFormat> = {
  f32: {},
  bf16: { computeDtype: 'bf16' },
  int8: { quantize: 'int8' },
  nf4: { quantize: 'nf4' },
  'nf4+bf16': { quantize: 'nf4', computeDtype: 'bf16' },
};

/**
 * "precision": training throughput and resident memory of a preset (bench, or 1b) on one
 * device with its base in each format: the weights are loaded (quantized at load) for one mode
 * at a time, a rank-16 adapter on all seven projections trains `steps` micro-batches after one
 * warm-up, best step time counts. 1b on a small CPU: use few steps and short sequences.
 */
export async function precisionScenario(
  o: { preset: 'bench' | '1b'; threads: number; steps: number; micro: number; seqLen: number; modes: string[] },
  log: (s: string) => void,
): Promise<PrecisionBenchRecord[]> {
  const dir = openModelDir(await ensureModel(cacheModels(), o.preset, 0, log));
  const c = dir.config;
  const plan = { lo: 0, hi: c.numLayers, first: true, last: true };
  const spec: LoraSpec = { r: 16, alpha: 32, dropout: 0, targets: [...LORA_TARGETS], useRslora: false, seed: 0 };
  const out: PrecisionBenchRecord[] = [];
  log(
    `precision: ${o.preset} model (${c.numLayers} layers, hidden ${c.hiddenSize}, stored ${c.torchDtype}), ${o.micro}×${o.seqLen} tokens per micro-batch, ${o.threads} thread(s)`,
  );
  for (const mode of o.modes) {
    const fmt = PRECISION_MODES[mode];
    if (!fmt) throw new Error(`precision: unknown mode '${mode}' (known: ${Object.keys(PRECISION_MODES).join(', ')})`);
    const device = openDevice('cpu:0', { threads: o.threads });
    const u0 = device.memory().used;
    const weights = await loadStageWeights(device, dir, plan, fmt);
    const baseBytes = device.memory().used - u0;
    const program = new StageProgram(
      device,
      c,
      plan,
      weights,
      fmt.computeDtype ? { computeDtype: fmt.computeDtype } : {},
    );
    const p = new LocalPipeline(c, [program]);
    await p.addAdapter(1, spec, freshState(c, spec));
    const mb = syntheticMicroBatch(new Rng(4), c, o.micro, o.seqLen);
    const data = assemble(1, [{ adapter: 1, serial: 0, mb }], mb.numTokens);
    let best = Infinity;
    for (let s = 0; s < o.steps + 1; s++) {
      const t0 = performance.now();
      await p.train(data);
      if (s > 0) best = Math.min(best, performance.now() - t0);
    }
    const rec: PrecisionBenchRecord = {
      scenario: 'precision',
      model: o.preset,
      mode,
      tokens: mb.numTokens,
      step_ms: Math.round(best),
      tokens_per_s: Math.round((mb.numTokens / best) * 1000 * 10) / 10,
      base_bytes: baseBytes,
      device_bytes: device.memory().used - u0,
      rss_bytes: process.memoryUsage().rss,
    };
    out.push(rec);
    log(
      `precision: ${mode.padEnd(9)} ${String(rec.tokens_per_s).padStart(8)} tokens/s (${rec.step_ms} ms per ${rec.tokens}-token micro-batch); base ${(baseBytes / 1e9).toFixed(3)} GB, device ${(rec.device_bytes / 1e9).toFixed(3)} GB, process RSS ${(rec.rss_bytes / 1e9).toFixed(2)} GB`,
    );
    await p.close();
    freeStageWeights(weights);
    device.trimCache();
  }
  return out;
}
