// A reference fixture's batch (rows of equal length, HF labels with -100) as one micro-batch of
// one adapter on a stage program, as the supervisor assembles it (not a test file itself).
import { assemble } from '../../actors/supervisor.js';
import type { MicroBatch, StageProgram } from '../../lib/model/stage.js';
import type { Tensor } from '../../lib/tensor.js';

/**
 * The rows packed as sequences of adapter 1 (`adapter` false: no segment, the base model
 * alone); `count` = the target tokens (the HF loss is their mean).
 */
export function fixtureBatch(program: StageProgram, inputIds: number[][], labelRows: number[][], adapter = true): { mb: MicroBatch; tokens: Tensor; count: number } {
  const T = inputIds[0]!.length;
  const B = inputIds.length;
  let count = 0;
  for (const row of labelRows) for (let i = 1; i < row.length; i++) if (row[i] !== -100) count++;
  const N = B * T;
  const data = assemble(
    7,
    [{ adapter: 1, serial: 0, mb: {
      step: 0, microIndex: 0, microCount: 1, inputIds: Int32Array.from(inputIds.flat()), labels: Int32Array.from(labelRows.flat()),
      cuSeqlens: Int32Array.from({ length: B + 1 }, (_, b) => b * T), positions: Int32Array.from({ length: N }, (_, i) => i % T),
      numTokens: N, numTargetTokens: count, stepTargetTokens: count, lastOfStep: true,
    } }],
    N,
  );
  const d = program.device;
  const mb: MicroBatch = {
    id: 7, numTokens: N, segments: adapter ? data.segments : [],
    tensors: {
      positions: d.fromArray('i32', [N], data.positions), cuSeqlens: d.fromArray('i32', [B + 1], data.cuSeqlens),
      targets: d.fromArray('i32', [N], data.targets), weights: d.fromArray('f32', [N], data.weights),
    },
  };
  return { mb, tokens: d.fromArray('i32', [N], data.tokens), count };
}
