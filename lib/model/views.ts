// Handles made while a call builds its ops (views of scratch, row slices). Each holds its
// storage until freed (or garbage-collected), and the device counts those bytes as used, so the
// call frees them once its run is over. Ops are built synchronously: one list is enough.
import type { Tensor } from '../tensor.js';

/** One call's scratch by name (activations.ts scratchShapes); each call has its own, so calls that overlap (in-process pipelines) never share it. */
export type Scratch = Record<string, Tensor>;

let madeViews: Tensor[] = [];

export function tmp(t: Tensor): Tensor {
  madeViews.push(t);
  return t;
}

export function takeViews(): Tensor[] {
  const v = madeViews;
  madeViews = [];
  return v;
}

export function freeViews(views: Tensor[]): void {
  for (const v of views) v.free();
}

/** A view of the first elements of a flat or larger tensor, with the given shape (freed with the call's views). */
export function view(t: Tensor, shape: number[]): Tensor {
  const n = shape.reduce((a, b) => a * b, 1);
  const flat = t.shape.length === 1 ? t : tmp(t.reshape([t.shape.reduce((a, b) => a * b, 1)]));
  return tmp(tmp(flat.rows(0, n)).reshape(shape));
}
