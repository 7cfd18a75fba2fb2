// `mlora bench --scenario recompute`: training with and without activation recomputation.
import { activationBytes, StageProgram } from '../../lib/model/stage.js';
import { freshState } from '../../lib/lora/state.js';
import { LocalPipeline } from '../../actors/local.js';
import { assemble } from '../../actors/scheduler/assemble.js';
import { Rng } from '../../lib/rng.js';
import { bestOfAlternating, oneStageBench, syntheticMicroBatch } from './bench-common.js';

export interface RecomputeBenchRecord {
  scenario: 'recompute';
  tokens: number;
  plain_ms: number;
  recompute_ms: number;
  slowdown: number;
  /** Bytes a micro-batch keeps between its forward and backward on a stage of all the layers but not the head. */
  saved_bytes_plain: number;
  saved_bytes_recompute: number;
}

/**
 * "recompute": one training micro-batch through the whole bench model on one device, with and
 * without activation recomputation (two programs over the same weights, run in turn, the order
 * alternating), and what a micro-batch keeps between forward and backward either way.
 */
export async function recomputeScenario(
  o: { threads: number; steps: number; micro: number; seqLen: number },
  log: (s: string) => void,
): Promise<RecomputeBenchRecord> {
  const { c, device, plan, weights, spec } = await oneStageBench(o.threads, log);
  const pipes = {
    plain: new LocalPipeline(c, [new StageProgram(device, c, plan, weights)]),
    recompute: new LocalPipeline(c, [new StageProgram(device, c, plan, weights, { recompute: true })]),
  };
  for (const p of Object.values(pipes)) await p.addAdapter(1, spec, freshState(c, spec));
  const mb = syntheticMicroBatch(new Rng(4), c, o.micro, o.seqLen);
  const data = assemble(1, [{ adapter: 1, serial: 0, mb }], mb.numTokens);
  const ms = await bestOfAlternating(['plain', 'recompute'] as const, o.steps, async (name) => {
    await pipes[name].train(data);
  });
  const segs = [{ rows: mb.numTokens, spec }];
  const body = { ...plan, last: false };
  const rec: RecomputeBenchRecord = {
    scenario: 'recompute',
    tokens: mb.numTokens,
    plain_ms: Math.round(ms.plain * 10) / 10,
    recompute_ms: Math.round(ms.recompute * 10) / 10,
    slowdown: Math.round((ms.recompute / ms.plain) * 100) / 100,
    saved_bytes_plain: activationBytes(c, body, mb.numTokens, segs),
    saved_bytes_recompute: activationBytes(c, body, mb.numTokens, segs, true),
  };
  log(
    `recompute: bench model, ${o.micro}×${o.seqLen} tokens, ${o.threads} thread(s): ${rec.plain_ms} ms without, ${rec.recompute_ms} ms with recompute (${rec.slowdown}×); ` +
      `a micro-batch keeps ${(rec.saved_bytes_plain / 2 ** 20).toFixed(1)} MiB vs ${(rec.saved_bytes_recompute / 2 ** 20).toFixed(1)} MiB between forward and backward on a stage of all ${c.numLayers} layers`,
  );
  await pipes.plain.close();
  await pipes.recompute.close(); // the shared weights were freed by the first close; a second free is a no-op
  return rec;
}
