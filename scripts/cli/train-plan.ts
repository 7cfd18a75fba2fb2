// `mlora train --dry-run`: the plan of a run without running it (devices and stage split,
// the base's format, memory per stage, admission order, an estimated throughput).
import type { TrainConfig } from '../../lib/config.js';
import { openModelDir } from '../../lib/io/hf-model.js';
import { resolveClusterLayout, resolveLayout } from '../../actors/scheduler/layout.js';
import type { ClusterOptions } from '../../actors/transport/remote.js';
import { describeSplit } from '../../lib/schedule/split.js';
import { adaptersPerMessage } from '../../lib/schedule/packing.js';
import { formatBytes } from '../../lib/tensor.js';
import { activationBytes, scratchBytes, workBytes } from '../../lib/model/activations.js';
import { linearQuantization, stageWeightBreakdown } from '../../lib/model/weights.js';
import { StageAdapter } from '../../lib/lora/adapter.js';
import { loraSpec } from '../../actors/scheduler/prepare.js';
import { splitProfile, type ProfiledSplit } from './train-split.js';

export async function plan(cfg: TrainConfig, out: (s: string) => void, cluster?: ClusterOptions): Promise<void> {
  const dir = openModelDir(cfg.model);
  const c = dir.config;
  const profiled = await splitProfile(cfg, !!cluster);
  const lo = {
    devices: cfg.devices,
    split: cfg.pipeline.split,
    splitProfile: profiled.profile,
    ...(cfg.pipeline.threads ? { threads: cfg.pipeline.threads } : {}),
    ...(cfg.pipeline.memory !== undefined ? { memory: cfg.pipeline.memory } : {}),
  };
  let layout;
  if (cluster) {
    const placed = await resolveClusterLayout(c, { ...lo, cluster });
    layout = placed.layout;
    out(`cluster placement (registered devices: memory and threads as each host registered them):`);
    for (const [s, d] of placed.cluster.placement.entries())
      out(
        `  stage ${s} -> ${d.id} (${d.kind}, ${formatBytes(d.memory)}, ${d.threads} thread${d.threads === 1 ? '' : 's'})`,
      );
    await placed.cluster.close();
  } else layout = resolveLayout(c, lo);
  out(
    `model ${cfg.model}: ${c.numLayers} layers, hidden ${c.hiddenSize}, ${c.numHeads}/${c.numKvHeads} heads, vocab ${c.vocabSize}`,
  );
  out(describeSplit(layout.plans, layout.devices));
  if (cfg.pipeline.split === 'auto') out(splitCosts(profiled));
  const baseFormat = {
    computeDtype: cfg.compute_dtype,
    ...(cfg.quantize ? { quantize: cfg.quantize } : {}),
    packWeights: cfg.pack_weights,
  };
  const q = linearQuantization(dir, cfg.quantize);
  const fmt0 = stageWeightBreakdown(dir, layout.plans[0]!, baseFormat);
  out(
    `base: compute ${cfg.compute_dtype}; decoder linears ${q ? `${q}${dir.quantization ? ' (as saved by bitsandbytes)' : ' (quantized at load)'}` : fmt0.linearFormat}; embeddings and LM head ${fmt0.floatFormat}, norms f32`,
  );
  const specs = cfg.adapters.map((a) => ({ a, spec: loraSpec(a), tokens: a.micro_batch_size * a.seq_len }));
  const S = layout.plans.length;
  const per = cfg.pipeline.batchlora
    ? adaptersPerMessage(cfg.adapters.length, S, cfg.pipeline.adapters_per_micro_batch)
    : 1;
  const group = specs.slice(0, per);
  const tokens = group.reduce((s, g) => s + g.tokens, 0);
  out(
    `\nmemory per stage (largest planned micro-batch: ${tokens} tokens from ${group.length} adapter(s), ${cfg.pipeline.inflight ?? 2 * S} in flight):`,
  );
  layout.plans.forEach((p, s) => {
    const budget = layout.budgets[s]!;
    const cpu = /(^|\/)cpu(:\d+)?$/.test(layout.devices[s]!);
    const parts = stageWeightBreakdown(dir, p, baseFormat, cpu && budget ? budget : undefined);
    const base = parts.linears + parts.other + parts.panels;
    const ad = specs.reduce((sum, g) => sum + StageAdapter.bytes(c, g.spec, p.lo, p.hi, p), 0);
    const segs = group.map((g) => ({ rows: g.tokens, spec: g.spec }));
    const act = activationBytes(c, p, tokens, segs, cfg.pipeline.recompute);
    const inflight = Math.min(cfg.pipeline.inflight ?? 2 * S, S);
    const scratch = scratchBytes(c, p, tokens) + workBytes(c, tokens, segs, cfg.pipeline.recompute);
    const total = base + ad + act * inflight + scratch;
    out(
      `  stage ${s} ${layout.devices[s]} (${layout.threads[s]} thread${layout.threads[s] === 1 ? '' : 's'}): base ${formatBytes(base)} (linears ${formatBytes(parts.linears)} ${parts.linearFormat}, rest ${formatBytes(parts.other)}${parts.panels ? `, GEMM panels ${formatBytes(parts.panels)}` : ''}), adapters ${formatBytes(ad)}, ` +
        `activations ${formatBytes(act)}${cfg.pipeline.recompute ? ' (layer inputs: recompute)' : ''} × ${inflight}, scratch ${formatBytes(scratch)}; total ${formatBytes(total)} of ${budget ? formatBytes(budget) : 'the GPU'}` +
        (budget ? `, headroom ${formatBytes(budget - total)}` : ''),
    );
  });
  const order = [...cfg.adapters].map((a, i) => ({ a, i })).sort((x, y) => y.a.priority - x.a.priority || x.i - y.i);
  out(
    `\nadmission order: ${order.map(({ a }) => `${a.name}${a.priority ? ` (priority ${a.priority})` : ''}`).join(', ')}`,
  );
  const flopsPerToken =
    c.numLayers *
      2 *
      2 *
      (c.hiddenSize * c.numHeads * c.headDim * 2 +
        2 * c.hiddenSize * c.numKvHeads * c.headDim +
        3 * c.hiddenSize * c.intermediateSize) +
    4 * c.hiddenSize * c.vocabSize;
  const gflops = layout.threads.reduce((a, t) => a + t, 0) * 40; // a conservative 40 GFLOP/s per CPU thread
  out(
    `estimated throughput: ~${Math.round((gflops * 1e9) / flopsPerToken)} tokens/s (${(flopsPerToken / 1e6).toFixed(1)} MFLOP per token, ~${gflops} GFLOP/s assumed)`,
  );
}

/** What the 'auto' split balanced, in one line. */
function splitCosts({ profile, shapes, measured }: ProfiledSplit): string {
  const data = shapes.some((s) => s)
    ? `sequences of ~${Math.round(profile.seqLen!)} tokens, ${Math.round(100 * profile.targetFraction!)}% of the rows targeted (sampled from the data)`
    : `sequences of ${profile.seqLen} tokens (seq_len)`;
  const k = profile.costs;
  return k && measured
    ? `split costs: measured on this machine over a step of ${measured.adapters === 1 ? 'the adapter' : `${measured.adapters} adapters`} (${measured.microBatches} micro-batch${measured.microBatches === 1 ? '' : 'es'}, ~${measured.tokens} tokens; ${data}): a layer's attention ${k.attention.toFixed(2)} ms, its MLP ${k.mlp.toFixed(2)} ms, the head ${k.head.toFixed(2)} ms`
    : `split costs: FLOPs at ${data}`;
}
