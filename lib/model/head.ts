// The last stage's end of the model: final norm, LM head and loss (forward, and with grad the
// backward into dL/d(final hidden states)), one row-block of logits at a time so the [N, vocab]
// logits never exist at once.
import type { Tensor } from '../tensor.js';
import type { Op } from '../native.js';
import type { LlamaConfig } from './config.js';
import type { MicroBatch } from './batch.js';
import { tmp, view, type Scratch } from './views.js';

export interface HeadContext {
  readonly config: LlamaConfig;
  /** The final RMSNorm weight [hidden]. */
  readonly norm: Tensor;
  /** [vocab, hidden]; the embedding table itself when the model ties them. */
  readonly head: Tensor;
  /** Rows of logits materialised at once. */
  readonly headBlockRows: number;
  /** Logits only for rows that have a target; false: for every row. */
  readonly gatherTargets: boolean;
  /** The head's GEMMs with bf16 operands (StageOptions.computeDtype); the loss stays f32. */
  readonly bf16: boolean;
}

/**
 * Rows of a micro-batch of N rows, T of them targeted, that the LM head runs on (headOps): the
 * targeted ones, gathered, unless nearly every row is targeted (a few untargeted rows, one per
 * sequence as in pre-training data, are not worth the copies). Fractions work too (N = 1).
 */
export function headRows(N: number, T: number, gather = true): number {
  return gather && T <= 0.9 * N ? T : N;
}

/** Rows of logits per head block: 32 MiB of them (at most 1024 rows). Each block's GEMMs pack the
 *  whole [vocab, hidden] head weight again, so fewer, taller blocks amortise that: at vocab 8192,
 *  1024-row blocks run the head ~5% faster than 256-row ones (8 MiB). */
export function defaultHeadBlockRows(c: LlamaConfig): number {
  return Math.max(16, Math.min(1024, Math.floor((32 << 20) / (4 * c.vocabSize))));
}

/**
 * Final norm, LM head and loss, one row-block of logits at a time; with grad, dres = dL/d(xFinal).
 * Only rows that have a target pay for logits: with prompts masked (train_on_inputs: false)
 * and one untargeted row per sequence, that is often well under half of the head's GEMMs. The
 * targeted rows are gathered, their losses and gradients scattered back (rows are independent
 * in every head kernel, so the numbers are those of the full computation).
 */
export function headOps(
  h: HeadContext,
  ops: Op[],
  mb: MicroBatch,
  xFinal: Tensor,
  losses: Tensor,
  dres: Tensor | null,
  withGrad: boolean,
  s: Scratch,
): void {
  const c = h.config;
  const H = c.hiddenSize;
  const N = mb.numTokens;
  const { targets, weights } = mb.tensors;
  const xf = view(s.xf!, [N, H]);
  const rstdf = view(s.rstdf!, [N]);
  const dxf = view(s.dxf!, [N, H]);
  ops.push({ op: 'rmsnorm_forward', y: xf, rstd: rstdf, x: xFinal, w: h.norm, eps: c.rmsNormEps });
  const labels = targets!.read() as Int32Array;
  let T = 0;
  for (let i = 0; i < N; i++) if (labels[i]! >= 0) T++;
  // x: the rows the head runs on; with grad, their dL/dx replaces them in place, block by block
  let x = xf,
    lab = targets!,
    wt = weights!,
    loss = losses,
    idx: Tensor | undefined;
  const gathered = headRows(N, T, h.gatherTargets) < N;
  if (gathered && T > 0) {
    const rows = new Int32Array(T),
      gl = new Int32Array(T),
      gw = new Float32Array(T);
    const w = withGrad ? (weights!.read() as Float32Array) : undefined;
    for (let i = 0, k = 0; i < N; i++) {
      if (labels[i]! < 0) continue;
      rows[k] = i;
      gl[k] = labels[i]!;
      if (w) gw[k] = w[i]!;
      k++;
    }
    idx = view(s.headRows!, [T]);
    idx.write(rows);
    lab = view(s.headLabels!, [T]);
    lab.write(gl);
    wt = view(s.headWeights!, [T]);
    if (withGrad) wt.write(gw);
    loss = view(s.headLosses!, [T]);
    x = view(s.xg!, [T, H]);
    ops.push({ op: 'embedding_forward', y: x, ids: idx, table: xf });
  }
  const M = gathered ? T : N;
  for (let b = 0; b < M; b += h.headBlockRows) {
    const e = Math.min(M, b + h.headBlockRows);
    const logits = view(s.logits!, [e - b, c.vocabSize]);
    const xb = tmp(x.rows(b, e));
    ops.push({ op: 'linear_forward', y: logits, x: xb, w: h.head, bf16: h.bf16 });
    if (withGrad) {
      ops.push({
        op: 'cross_entropy_backward',
        losses: tmp(loss.rows(b, e)),
        dlogits: logits,
        logits,
        labels: tmp(lab.rows(b, e)),
        weights: tmp(wt.rows(b, e)),
      });
      ops.push({ op: 'linear_backward', dx: gathered ? xb : tmp(dxf.rows(b, e)), dy: logits, w: h.head, bf16: h.bf16 });
    } else {
      ops.push({ op: 'cross_entropy_forward', losses: tmp(loss.rows(b, e)), logits, labels: tmp(lab.rows(b, e)) });
    }
  }
  if (gathered) {
    // untargeted rows: loss 0 and no gradient, as cross-entropy gives an ignored label
    ops.push({ op: 'fill', y: losses, value: 0 });
    if (withGrad) ops.push({ op: 'fill', y: dxf, value: 0 });
    if (idx) {
      ops.push({
        op: 'embedding_backward',
        dtable: tmp(losses.reshape([N, 1])),
        dy: tmp(loss.reshape([T, 1])),
        ids: idx,
      });
      if (withGrad) ops.push({ op: 'embedding_backward', dtable: dxf, dy: x, ids: idx });
    }
  }
  if (withGrad && dres) {
    ops.push({ op: 'rmsnorm_backward', dx: dres, dy: dxf, x: xFinal, w: h.norm, rstd: rstdf });
  }
}

/** Logits [N, vocab] of every row into `out`, no loss (evaluation tools, generation). */
export function logitsOps(h: HeadContext, ops: Op[], N: number, xFinal: Tensor, out: Tensor, s: Scratch): void {
  const c = h.config;
  const xf = view(s.xf!, [N, c.hiddenSize]);
  ops.push({ op: 'rmsnorm_forward', y: xf, rstd: view(s.rstdf!, [N]), x: xFinal, w: h.norm, eps: c.rmsNormEps });
  ops.push({ op: 'linear_forward', y: out, x: xf, w: h.head, bf16: h.bf16 });
}
