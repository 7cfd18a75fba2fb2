// The training configuration: the per-adapter fields (the public interface shared by the
// config file, Supervisor.submit() and the PEFT output) and the run's top level. Validated
// with zod before anything loads; an error names the field and the allowed values.
import { z } from 'zod';
import { LORA_TARGETS } from './model/config.js';
import { QUANTIZE_MODES } from './io/bnb.js';

/** Adapter names become folder names: letters, digits, '.', '_', '-'; no leading dot. */
export const SAFE_NAME = /^[A-Za-z0-9_][A-Za-z0-9._-]{0,63}$/;

const target = z.enum(LORA_TARGETS);

export const LoraSchema = z
  .object({
    r: z
      .number()
      .int('must be an integer from 1 to 1024')
      .min(1, 'must be an integer from 1 to 1024')
      .max(1024, 'must be an integer from 1 to 1024')
      .default(8),
    alpha: z.number().positive().default(16),
    dropout: z.number().min(0).max(0.99).default(0.05),
    targets: z.array(target).min(1).default(['q_proj', 'k_proj', 'v_proj', 'o_proj']),
    use_rslora: z.boolean().default(false),
    /** An existing PEFT adapter directory to start from; none = PEFT init (seeded). */
    init: z.string().min(1).optional(),
  })
  .strict();

export const OptimizerSchema = z
  .object({
    lr: z.number().positive().max(10).default(2e-4),
    betas: z.tuple([z.number().min(0).lt(1), z.number().min(0).lt(1)]).default([0.9, 0.999]),
    eps: z.number().positive().default(1e-8),
    weight_decay: z.number().min(0).default(0),
  })
  .strict();

export const ScheduleSchema = z
  .object({
    type: z.enum(['constant', 'linear', 'cosine']).default('constant'),
    warmup_steps: z.number().int().min(0).default(0),
  })
  .strict();

/**
 * Held-out evaluation: the loss on `data` before the first step, every `every` steps and after
 * the last; greedy completions of `prompts` (each fed as is, with the tokenizer's BOS) before
 * training and after it, up to `max_new_tokens` tokens each.
 */
export const EvalSchema = z
  .object({
    data: z.string().min(1).optional(),
    every: z.number().int().min(1).default(50),
    prompts: z.array(z.string()).default([]),
    max_new_tokens: z.number().int().min(1).default(48),
  })
  .strict()
  .refine((e) => e.data !== undefined || e.prompts.length > 0, {
    message: 'needs data (held-out examples) or prompts (to sample), or both',
  });

/**
 * What happens when an adapter's loss or gradient norm becomes NaN/Inf: 'stop' that adapter, or
 * 'rollback' to its last checkpoint (the save_every step, else its start) with the learning rate
 * multiplied by lr_factor, at most max_rollbacks times (then it stops). A string is the action
 * with the defaults.
 */
const OnNanObject = z
  .object({
    action: z.enum(['stop', 'rollback']).default('stop'),
    lr_factor: z.number().gt(0, 'must be in (0, 1)').lt(1, 'must be in (0, 1)').default(0.5),
    max_rollbacks: z.number().int().min(1).default(3),
  })
  .strict();
export const OnNanSchema = z.preprocess((v) => (typeof v === 'string' ? { action: v } : v), OnNanObject);

export const AdapterSchema = z
  .object({
    name: z
      .string()
      .regex(SAFE_NAME, 'must be a safe folder name: letters, digits, ".", "_", "-" (no leading dot, at most 64)'),
    data: z.string().min(1),
    template: z.string().min(1).optional(),
    lora: LoraSchema.default(LoraSchema.parse({})),
    optimizer: OptimizerSchema.default(OptimizerSchema.parse({})),
    schedule: ScheduleSchema.default(ScheduleSchema.parse({})),
    batch_size: z.number().int().min(1).default(8),
    micro_batch_size: z.number().int().min(1).optional(),
    seq_len: z.number().int().min(2).default(512),
    epochs: z.number().int().min(1).default(1),
    max_steps: z.number().int().min(1).optional(),
    shuffle: z.boolean().default(true),
    seed: z.number().int().min(0).default(0),
    train_on_inputs: z.boolean().default(false),
    max_grad_norm: z.number().positive().optional(),
    save_every: z.number().int().min(1).optional(),
    eval: EvalSchema.optional(),
    priority: z.number().int().default(0),
    on_nan: OnNanSchema.default(OnNanObject.parse({})),
    /** Skip malformed dataset records (counted) instead of failing. */
    skip_bad_records: z.boolean().default(false),
  })
  .strict()
  .superRefine((a, ctx) => {
    const micro = a.micro_batch_size ?? a.batch_size;
    if (micro > a.batch_size) {
      ctx.addIssue({
        code: 'custom',
        path: ['micro_batch_size'],
        message: `must be ≤ batch_size (${a.batch_size}), got ${micro}`,
      });
    }
  });

export type AdapterConfigInput = z.input<typeof AdapterSchema>;
export type AdapterConfig = z.output<typeof AdapterSchema> & { micro_batch_size: number };

export const PipelineSchema = z
  .object({
    /** Layer split: number of layers per stage (sums to the model's layers; halves split a layer after its attention), or 'auto' (cost model). */
    split: z
      .union([z.literal('auto'), z.array(z.number().min(0).multipleOf(0.5))], {
        error: 'must be "auto" or a list of layer counts per stage, e.g. [2, 2] or [2.5, 2.5]',
      })
      .default('auto'),
    /**
     * What the 'auto' split balances: 'measured' times a layer's attention and MLP halves and the
     * head on this machine at the data's sequence lengths (CPU stages of this process; a fraction
     * of a second on a small model), 'flops' counts FLOPs (the same split on every machine). GPU
     * and cluster stages balance FLOPs.
     */
    split_costs: z.enum(['measured', 'flops']).default('measured'),
    /** Micro-batches of one adapter's step in flight at once (default: more only when the adapters cannot fill the stages; lib/schedule/packing.ts). */
    inflight_per_adapter: z.number().int().min(1).optional(),
    /** Micro-batch messages in flight in the whole pipeline (default: 2 × stages). */
    inflight: z.number().int().min(1).optional(),
    /** BatchLoRA: several adapters' rows share one micro-batch message. */
    batchlora: z.boolean().default(true),
    /** Activation recomputation: keep only each layer's input between forward and backward. */
    recompute: z.boolean().default(false),
    /** Most adapters in one BatchLoRA micro-batch (default: spread adapters so every stage has work). */
    adapters_per_micro_batch: z.number().int().min(1).optional(),
    /** Threads per device (CPU). */
    threads: z.number().int().min(1).optional(),
    /** Byte budget per device, e.g. "4GiB". */
    memory: z.union([z.string(), z.number()], { error: 'must be a byte count or a size like "4GiB"' }).optional(),
  })
  .strict();

export const LogSchema = z
  .object({
    every: z.number().int().min(1).default(1),
    progress: z.enum(['auto', 'bar', 'plain', 'none']).default('auto'),
  })
  .strict();

export const TrainConfigSchema = z
  .object({
    model: z.string().min(1),
    devices: z
      // HOST/cpu:N and 'cluster' (every registered device) name stage hosts of a --cluster run
      .union(
        [
          z.literal('auto'),
          z.literal('cluster'),
          z
            .array(
              z
                .string()
                .regex(/^([A-Za-z0-9_-]{1,64}\/)?(cpu|cuda)(:\d+)?$/, 'must be cpu:N or cuda:N (e.g. cpu:0, cuda:1)'),
            )
            .min(1),
        ],
        {
          error: 'must be "auto" or a list of devices like ["cpu:0", "cpu:1"] or ["cuda:0", "cuda:1"]',
        },
      )
      .default('auto'),
    output: z.string().min(1).default('mlora-output'),
    /**
     * Precision of the frozen base: f32, or bf16 (bf16 base weights, bf16 GEMM operands with f32
     * accumulation; LoRA weights, gradients, AdamW state and the loss stay f32).
     */
    compute_dtype: z.enum(['f32', 'bf16']).default('f32'),
    /** Quantize the base's decoder linears at load (QLoRA): nf4, nf4-dq (double quantization) or int8 (LLM.int8 row-wise). */
    quantize: z.enum(QUANTIZE_MODES).optional(),
    /**
     * Pack the frozen linears and the LM head once at load into the CPU GEMM's panels, so the
     * GEMMs stop re-packing them on every call: "auto" (where the panels are no larger than the
     * weights and fit in half the memory left), true (always, whatever the memory) or false.
     */
    pack_weights: z.union([z.literal('auto'), z.boolean()], { error: 'must be "auto", true or false' }).default('auto'),
    adapters: z.array(AdapterSchema).min(1),
    pipeline: PipelineSchema.default(PipelineSchema.parse({})),
    log: LogSchema.default({ every: 1, progress: 'auto' }),
  })
  .strict()
  .superRefine((c, ctx) => {
    const seen = new Set<string>();
    c.adapters.forEach((a, i) => {
      if (seen.has(a.name))
        ctx.addIssue({
          code: 'custom',
          path: ['adapters', i, 'name'],
          message: `'${a.name}' is used by two adapters; names must be unique`,
        });
      seen.add(a.name);
    });
  });

export type TrainConfig = Omit<z.output<typeof TrainConfigSchema>, 'adapters'> & { adapters: AdapterConfig[] };

/** What a required field holds, said when it is missing. */
const REQUIRED_HINTS: Record<string, string> = {
  model: 'a Hugging Face model directory (config.json, model.safetensors, tokenizer.json)',
  adapters: 'a list of adapters, each with at least name and data',
  name: 'a safe folder name for the adapter',
  data: 'the path of a JSON/JSONL dataset file',
};

/** The fields an object at a config path may have (for 'unknown field' messages). */
function allowedFields(path: PropertyKey[]): string[] | undefined {
  const key = path.filter((p) => typeof p === 'string').join('.');
  const shapes: Record<string, { shape: Record<string, unknown> }> = {
    '': TrainConfigSchema,
    adapters: AdapterSchema,
    'adapters.lora': LoraSchema,
    'adapters.optimizer': OptimizerSchema,
    'adapters.schedule': ScheduleSchema,
    'adapters.eval': EvalSchema,
    'adapters.on_nan': OnNanObject,
    pipeline: PipelineSchema,
    log: LogSchema,
  };
  const s = shapes[key];
  return s ? Object.keys(s.shape) : undefined;
}

const show = (v: unknown) => (typeof v === 'string' ? JSON.stringify(v) : (JSON.stringify(v) ?? String(v)));

/** A readable one-line-per-problem message from a zod error: the field's path, what it must be, what it got. */
export function formatIssues(err: z.ZodError, where: string, input?: unknown): string {
  const lines = err.issues.map((i) => {
    const path = i.path.length
      ? i.path
          .map((p) => (typeof p === 'number' ? `[${p}]` : `.${String(p)}`))
          .join('')
          .replace(/^\./, '')
      : '(top level)';
    let value: unknown = input;
    // a shorthand value (on_nan: "bogus") is checked as an object: show what was written
    for (const k of i.path) {
      if (!value || typeof value !== 'object') break;
      value = (value as Record<PropertyKey, unknown>)[k as PropertyKey];
    }
    const got = input === undefined ? '' : `, got ${show(value)}`;
    const last = i.path.at(-1);
    let msg = i.message;
    if (i.code === 'invalid_value' && 'values' in i)
      msg = `must be one of ${(i.values as unknown[]).map(show).join(', ')}${got}`;
    else if (i.code === 'unrecognized_keys' && 'keys' in i) {
      const allowed = allowedFields(i.path);
      msg = `unknown field(s) ${(i.keys as string[]).map((k) => `'${k}'`).join(', ')}${allowed ? ` (allowed: ${allowed.join(', ')})` : ''}`;
    } else if (i.code === 'invalid_type' && input !== undefined && value === undefined) {
      msg = `is required${typeof last === 'string' && REQUIRED_HINTS[last] ? `: ${REQUIRED_HINTS[last]}` : ''}`;
    } else if (i.code === 'invalid_type' && 'expected' in i) {
      const e = String(i.expected);
      if (!/^Invalid input/.test(i.message)) msg = `${i.message}${got}`;
      else
        msg = `must be ${e === 'int' ? 'an integer' : e === 'array' ? 'a list' : e === 'object' ? 'an object' : `a ${e}`}${got}`;
    } else if ((i.code === 'too_small' || i.code === 'too_big') && 'origin' in i) {
      const small = i.code === 'too_small';
      const bound = Number(small ? (i as { minimum: unknown }).minimum : (i as { maximum: unknown }).maximum);
      const inclusive = (i as { inclusive?: boolean }).inclusive !== false;
      const op = small ? (inclusive ? '≥' : '>') : inclusive ? '≤' : '<';
      if (i.origin === 'array')
        msg = small ? `must have at least ${bound} item${bound === 1 ? '' : 's'}` : `must have at most ${bound} items`;
      else if (i.origin === 'string') msg = small ? 'must not be empty' : `must be at most ${bound} characters`;
      else msg = `must be ${op} ${bound}${got}`;
      if (i.message && !/^Too (small|big)/.test(i.message)) msg = `${i.message}${got}`;
    } else if (
      (i.code === 'invalid_format' || i.code === 'invalid_union') &&
      input !== undefined &&
      !/, got /.test(msg)
    ) {
      msg = `${msg}${got}`;
    }
    return `${where}: ${path}: ${msg}`;
  });
  return lines.join('\n');
}

export function parseAdapterConfig(input: unknown, where = 'adapter'): AdapterConfig {
  const r = AdapterSchema.safeParse(input);
  if (!r.success) throw new Error(formatIssues(r.error, where, input));
  return { ...r.data, micro_batch_size: r.data.micro_batch_size ?? r.data.batch_size };
}

export function parseTrainConfig(input: unknown, where = 'config'): TrainConfig {
  const r = TrainConfigSchema.safeParse(input);
  if (!r.success) throw new Error(formatIssues(r.error, where, input));
  return {
    ...r.data,
    adapters: r.data.adapters.map((a) => ({ ...a, micro_batch_size: a.micro_batch_size ?? a.batch_size })),
  };
}
