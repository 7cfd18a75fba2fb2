// An adapter's LoRA settings as the stage program sees them. A file of its own so that the
// micro-batch types (lib/model/batch.ts) can name it without importing the adapter, which
// imports them.
import type { LoraTarget } from '../model/config.js';

/** What the stage needs to know about an adapter (the rest lives with the supervisor). */
export interface LoraSpec {
  r: number;
  alpha: number;
  dropout: number;
  targets: LoraTarget[];
  useRslora: boolean;
  /** Seeds init and dropout masks. */
  seed: number;
}
