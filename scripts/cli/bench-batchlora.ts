// `mlora bench --scenario batchlora`: K adapters batched in one micro-batch (BatchLoRA) vs the
// same K trained one after another by the same engine, on one device; tokens/s and model FLOP
// utilisation against the GEMM ceiling measured in the same run, and with MLORA_PROFILE_OPS=1
// the batched run's time split by op.
import { openModelDir } from '../../lib/io/hf-model.js';
import { openDevice } from '../../lib/tensor.js';
import type { OpTime } from '../../lib/native.js';
import { loadStageWeights, type PackWeights } from '../../lib/model/weights.js';
import { StageProgram } from '../../lib/model/stage.js';
import { freshState } from '../../lib/lora/state.js';
import { LocalPipeline } from '../../actors/local.js';
import { assemble } from '../../actors/scheduler/assemble.js';
import type { SourceMicroBatch } from '../../actors/scheduler/job-types.js';
import type { Pipeline } from '../../actors/pipeline.js';
import { Rng } from '../../lib/rng.js';
import { ensureModel } from './make-model.js';
import { benchLoraSpec, cacheModels, gemmCeiling, STEP, type TrainBenchRecord } from './bench-common.js';
import { syntheticMicroBatch, trainFlopsPerToken } from './bench-common.js';

/** Trains `steps` steps of K adapters, batched (one message of all K) or sequential (K messages, one at a time). */
async function runSteps(
  p: Pipeline,
  ids: number[],
  mbs: Map<number, SourceMicroBatch>,
  steps: number,
  batched: boolean,
  concurrent: boolean,
): Promise<number> {
  let mbId = 1;
  const t = performance.now();
  for (let s = 0; s < steps; s++) {
    if (batched) {
      const parts = ids.map((id) => ({ adapter: id, serial: s, mb: mbs.get(id)! }));
      await p.train(
        assemble(
          mbId++,
          parts,
          parts.reduce((a, x) => a + x.mb.numTokens, 0),
        ),
      );
    } else if (concurrent) {
      await Promise.all(
        ids.map((id) =>
          p.train(assemble(mbId++, [{ adapter: id, serial: s, mb: mbs.get(id)! }], mbs.get(id)!.numTokens)),
        ),
      );
    } else {
      for (const id of ids)
        await p.train(assemble(mbId++, [{ adapter: id, serial: s, mb: mbs.get(id)! }], mbs.get(id)!.numTokens));
    }
    for (const id of ids) await p.step(id, { ...STEP, step: s + 1 });
  }
  return performance.now() - t;
}

export async function batchloraScenario(
  o: {
    adapters: number[];
    rank: number;
    shapes: Array<{ micro: number; seqLen: number }>;
    steps: number;
    threads: number;
    packWeights?: PackWeights;
  },
  log: (s: string) => void,
): Promise<TrainBenchRecord[]> {
  const modelDir = await ensureModel(cacheModels(), 'bench', 0, log);
  const dir = openModelDir(modelDir);
  const c = dir.config;
  const ceiling = await gemmCeiling(o.threads);
  log(`GEMM ceiling (1536³ sgemm, ${o.threads} thread${o.threads > 1 ? 's' : ''}): ${ceiling.toFixed(1)} GFLOP/s`);
  const device = openDevice('cpu:0', { threads: o.threads });
  const plan = { lo: 0, hi: c.numLayers, first: true, last: true };
  const base = o.packWeights !== undefined ? { packWeights: o.packWeights } : {};
  const program = new StageProgram(device, c, plan, await loadStageWeights(device, dir, plan, base));
  const p = new LocalPipeline(c, [program]);
  const out: TrainBenchRecord[] = [];
  const maxK = Math.max(...o.adapters);
  const spec = benchLoraSpec(o.rank);
  for (let id = 1; id <= maxK; id++)
    await p.addAdapter(id, { ...spec, seed: id }, freshState(c, { ...spec, seed: id }));
  for (const shape of o.shapes) {
    const rng = new Rng(1, shape.micro, shape.seqLen);
    const mbs = new Map<number, SourceMicroBatch>();
    for (let id = 1; id <= maxK; id++) mbs.set(id, syntheticMicroBatch(rng, c, shape.micro, shape.seqLen));
    const flops = trainFlopsPerToken(c, spec, shape.seqLen);
    for (const K of o.adapters) {
      const ids = Array.from({ length: K }, (_, i) => i + 1);
      // warm-up (buffers, caches), then the two modes step by step in turn, so drifting
      // machine load hits both alike
      await runSteps(p, ids, mbs, 1, false, false);
      await runSteps(p, ids, mbs, 1, true, false);
      const ms = { sequential: 0, batched: 0 };
      const split = new Map<string, OpTime>();
      for (let s = 0; s < o.steps; s++) {
        ms.sequential += await runSteps(p, ids, mbs, 1, false, false);
        device.opProfile(true);
        ms.batched += await runSteps(p, ids, mbs, 1, true, false);
        for (const t of device.opProfile(true)) {
          const acc = split.get(t.op) ?? { op: t.op, calls: 0, ms: 0 };
          acc.calls += t.calls;
          acc.ms += t.ms;
          split.set(t.op, acc);
        }
      }
      if (split.size) logOpSplit(`batched K=${K} ${shape.micro}×${shape.seqLen}`, [...split.values()], ms.batched, log);
      for (const mode of ['sequential', 'batched'] as const) {
        const tokens = K * shape.micro * shape.seqLen * o.steps;
        const tps = tokens / (ms[mode] / 1000);
        const rec: TrainBenchRecord = {
          scenario: 'batchlora',
          mode,
          adapters: K,
          micro_batch: shape.micro,
          seq_len: shape.seqLen,
          stages: 1,
          threads: o.threads,
          tokens_per_s: Math.round(tps),
          mfu: (tps * flops) / (ceiling * 1e9),
          gemm_ceiling_gflops: Math.round(ceiling * 10) / 10,
          step_ms: Math.round(ms[mode] / o.steps),
        };
        out.push(rec);
        log(
          `batchlora ${mode.padEnd(10)} K=${K} ${shape.micro}×${shape.seqLen}: ${rec.tokens_per_s} tok/s, MFU ${(100 * rec.mfu).toFixed(1)}%, ${rec.step_ms} ms/step`,
        );
      }
    }
  }
  await p.close();
  return out;
}

/** The time split of MLORA_PROFILE_OPS=1 runs: each op kind's share of the measured wall time;
 *  what no op accounts for is the JS side (building op lists, messages, waiting on promises). */
export function logOpSplit(what: string, split: OpTime[], wallMs: number, log: (s: string) => void): void {
  const total = split.reduce((a, t) => a + t.ms, 0);
  log(`time split of ${what} (MLORA_PROFILE_OPS: every op synchronizes), ${wallMs.toFixed(0)} ms wall:`);
  for (const t of [...split].sort((a, b) => b.ms - a.ms))
    log(
      `  ${t.op.padEnd(40)} ${String(t.calls).padStart(6)} calls ${t.ms.toFixed(1).padStart(9)} ms ${((100 * t.ms) / wallMs).toFixed(1).padStart(5)}%`,
    );
  log(
    `  ${'(outside ops: JS, messages)'.padEnd(53)} ${(wallMs - total).toFixed(1).padStart(9)} ms ${((100 * (wallMs - total)) / wallMs).toFixed(1).padStart(5)}%`,
  );
}
