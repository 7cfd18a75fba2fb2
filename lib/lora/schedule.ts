// Learning-rate schedules with Hugging Face semantics (get_{constant,linear,cosine}_schedule
// _with_warmup): the lr used by optimizer step t (0-based) is base·λ(t).

export interface ScheduleConfig {
  type: 'constant' | 'linear' | 'cosine';
  warmup_steps: number;
}

export function lrAt(base: number, s: ScheduleConfig, step: number, totalSteps: number): number {
  const w = s.warmup_steps;
  if (step < w) return (base * step) / Math.max(1, w);
  if (s.type === 'constant') return base;
  const progress = (step - w) / Math.max(1, totalSteps - w);
  if (s.type === 'linear') return base * Math.max(0, 1 - progress);
  return base * Math.max(0, 0.5 * (1 + Math.cos(Math.PI * progress)));
}
