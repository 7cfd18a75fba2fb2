// An independent loss for checking the tools and the model: the model's full logits
// (StageProgram.logits, one sequence at a time) with a float64 log-softmax and the HF label
// shift done here.
import { batchOnDevice, freeBatch, type SingleModel } from '../../lib/model/single.js';

/** Logits [n, vocab] of one whole sequence (positions 0..n-1), by a full recomputation. */
export async function fullLogits(m: SingleModel, ids: ArrayLike<number>): Promise<Float32Array> {
  const n = ids.length;
  const b = batchOnDevice(
    m,
    {
      tokens: Int32Array.from(ids),
      positions: Int32Array.from({ length: n }, (_, i) => i),
      cuSeqlens: Int32Array.from([0, n]),
      targets: new Int32Array(n).fill(-100),
    },
    900_000 + n,
  );
  try {
    return await m.program.logits(b.mb, b.tokens);
  } finally {
    freeBatch(b);
  }
}

/** Σ −log p(label[j+1] | ids[..j]) over labels ≠ −100 (float64 log-softmax), and the count. */
export async function referenceLoss(
  m: SingleModel,
  seqs: Array<{ inputIds: ArrayLike<number>; labels?: ArrayLike<number> }>,
) {
  const V = m.config.vocabSize;
  let sum = 0,
    count = 0;
  for (const s of seqs) {
    const labels = s.labels ?? s.inputIds;
    const lg = await fullLogits(m, s.inputIds);
    for (let j = 0; j + 1 < s.inputIds.length; j++) {
      const y = labels[j + 1]!;
      if (y === -100) continue;
      let mx = -Infinity;
      for (let v = 0; v < V; v++) mx = Math.max(mx, lg[j * V + v]!);
      let z = 0;
      for (let v = 0; v < V; v++) z += Math.exp(lg[j * V + v]! - mx);
      sum += mx + Math.log(z) - lg[j * V + y]!;
      count++;
    }
  }
  return { sum, count, loss: sum / count };
}
