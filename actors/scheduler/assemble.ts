// Packing: several adapters' micro-batches into one BatchLoRA micro-batch message (one row
// segment per adapter), and the serial that seeds each micro-batch's dropout masks. How many
// adapters share a message is lib/schedule/packing.ts; which ones is admission.ts.
import type { MicroBatchData, Segment } from '../../lib/model/batch.js';
import type { SourceMicroBatch } from './job-types.js';

/**
 * The serial that seeds a micro-batch's dropout masks: a pure function of its place in the
 * adapter's data (step, index in the step), not a counter of this process, so a run resumed
 * from a checkpoint (or a replay) draws exactly the masks the uninterrupted run draws.
 */
export function microSerial(mb: Pick<SourceMicroBatch, 'step' | 'microIndex'>): number {
  if (mb.microIndex >= 2 ** 20)
    throw new Error(`micro-batch index ${mb.microIndex} is too large (at most 2^20 micro-batches per step)`);
  return mb.step * 2 ** 20 + mb.microIndex;
}

/**
 * Concatenates adapters' micro-batches into one BatchLoRA micro-batch: rows of adapter i form
 * segment i; targets are the labels shifted by one within each sequence (HF causal-LM);
 * each target row weighs 1/(target tokens of its adapter's step).
 */
export function assemble(
  id: number,
  parts: Array<{ adapter: number; serial: number; mb: SourceMicroBatch }>,
  numTokens: number,
  evalMode = false,
): MicroBatchData {
  const tokens = new Int32Array(numTokens);
  const positions = new Int32Array(numTokens);
  const targets = new Int32Array(numTokens).fill(-100);
  const weights = new Float32Array(numTokens);
  const nseq = parts.reduce((s, p) => s + p.mb.cuSeqlens.length - 1, 0);
  const cu = new Int32Array(nseq + 1);
  const segments: Segment[] = [];
  let row = 0;
  let q = 0;
  for (const p of parts) {
    const m = p.mb;
    tokens.set(m.inputIds, row);
    positions.set(m.positions, row);
    const w = evalMode ? 1 : 1 / Math.max(1, m.stepTargetTokens);
    for (let s = 0; s + 1 < m.cuSeqlens.length; s++) {
      const b = m.cuSeqlens[s]!,
        e = m.cuSeqlens[s + 1]!;
      cu[q++] = row + b;
      for (let i = b; i + 1 < e; i++) {
        const t = m.labels[i + 1]!;
        if (t !== -100) {
          targets[row + i] = t;
          weights[row + i] = w;
        }
      }
    }
    segments.push({ adapter: p.adapter, rowStart: row, rowEnd: row + m.numTokens, serial: p.serial });
    row += m.numTokens;
  }
  cu[q] = row;
  return { id, segments, tokens, positions, cuSeqlens: cu, targets, weights };
}
