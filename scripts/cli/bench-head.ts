// `mlora bench --scenario head`: the LM head on the targeted rows only vs on every row.
import { StageProgram } from '../../lib/model/stage.js';
import { freshState } from '../../lib/lora/state.js';
import { LocalPipeline } from '../../actors/local.js';
import { assemble } from '../../actors/scheduler/assemble.js';
import { Rng } from '../../lib/rng.js';
import { bestOfAlternating, oneStageBench, syntheticMicroBatch } from './bench-common.js';

export interface HeadBenchRecord {
  scenario: 'head';
  targeted: number;
  tokens: number;
  every_row_ms: number;
  targeted_rows_ms: number;
  speedup: number;
}

/**
 * "head": one training micro-batch through the whole bench model on one device, with the LM
 * head on every row (the plain computation) vs on the targeted rows only (gathered), for
 * several fractions of targeted rows: instruction data with masked prompts targets a
 * fraction of its rows. Both programs run in turn in the same process.
 */
export async function headScenario(
  o: { threads: number; steps: number; micro: number; seqLen: number; fractions: number[] },
  log: (s: string) => void,
): Promise<HeadBenchRecord[]> {
  const { c, device, plan, weights, spec } = await oneStageBench(o.threads, log);
  // one program, its gatherTargets switched between runs: both variants use the same memory
  const program = new StageProgram(device, c, plan, weights);
  const p = new LocalPipeline(c, [program]);
  await p.addAdapter(1, spec, freshState(c, spec));
  const out: HeadBenchRecord[] = [];
  log(
    `head: bench model, ${o.micro}×${o.seqLen} tokens per micro-batch, ${o.threads} thread(s); LM head ${c.vocabSize}×${c.hiddenSize}`,
  );
  for (const f of o.fractions) {
    const mb = syntheticMicroBatch(new Rng(4), c, o.micro, o.seqLen);
    // a prompt of (1 − f) of each sequence is masked, as train_on_inputs: false does
    const labels = mb.labels.slice();
    for (let i = 0; i < mb.numTokens; i++) if (i % o.seqLen < Math.round((1 - f) * o.seqLen)) labels[i] = -100;
    const src = { ...mb, labels };
    const data = assemble(1, [{ adapter: 1, serial: 0, mb: src }], src.numTokens);
    const targeted = data.targets.filter((x) => x >= 0).length;
    const ms = await bestOfAlternating(['every', 'gathered'] as const, o.steps, async (name) => {
      program.gatherTargets = name === 'gathered';
      await p.train(data);
    });
    const rec: HeadBenchRecord = {
      scenario: 'head',
      targeted: targeted / data.targets.length,
      tokens: data.targets.length,
      every_row_ms: Math.round(ms.every * 10) / 10,
      targeted_rows_ms: Math.round(ms.gathered * 10) / 10,
      speedup: Math.round((ms.every / ms.gathered) * 100) / 100,
    };
    out.push(rec);
    log(
      `head: ${(100 * rec.targeted).toFixed(0).padStart(3)}% of rows targeted: every row ${rec.every_row_ms} ms, targeted rows only ${rec.targeted_rows_ms} ms per micro-batch (${rec.speedup}×)`,
    );
  }
  await p.close();
  return out;
}
