// What JobScheduler.start opens before the scheduler exists: the model directory, the layout
// (layout.ts), the pipeline of stages (worker threads, a cluster's stage hosts, or this thread),
// the hooks that prepare jobs and write their output (prepare.ts), and the faults the scheduler
// injects itself.
import type { QuantizeMode } from '../../lib/io/bnb.js';
import { openModelDir } from '../../lib/io/hf-model.js';
import { newRunId } from '../../lib/io/output.js';
import { parseFault, type FaultSpec } from '../../lib/faults.js';
import { StageProgram } from '../../lib/model/stage.js';
import { linearQuantization, loadStageWeights, type BaseFormat, type PackWeights } from '../../lib/model/weights.js';
import { openDevice } from '../../lib/tensor.js';
import { LocalPipeline } from '../local.js';
import type { Pipeline } from '../pipeline.js';
import type { JobEvent } from '../protocol.js';
import { ActorPipeline, type FaultEvent, type StageWorker } from '../runtime.js';
import type { SchedulerOptions } from './context.js';
import type { SchedulerHooks } from './job-types.js';
import { resolveClusterLayout, resolveLayout, type LayoutOptions } from './layout.js';
import { outputHooks, prepareJob, promptSampler } from './prepare.js';

export interface StartOptions extends LayoutOptions {
  /** Hugging Face model directory. */
  model: string;
  batchlora?: boolean;
  /** Activation recomputation on every stage: less memory per micro-batch, one more layer forward per layer backward. */
  recompute?: boolean;
  /** f32 (default) or bf16: bf16 base weights and GEMM operands, f32 accumulation; LoRA, gradients, AdamW and the loss stay f32. */
  computeDtype?: 'f32' | 'bf16';
  /** Quantize the base's decoder linears at load (QLoRA style): nf4, nf4-dq (double quantization) or int8. */
  quantize?: QuantizeMode;
  /** Pack the frozen linears once into the CPU GEMM's panels (BaseFormat.packWeights; default 'auto'). */
  packWeights?: PackWeights;
  inflight?: number;
  inflightPerAdapter?: number;
  adaptersPerMicroBatch?: number;
  /** Most tokens in one micro-batch message (sizes the shared slots). Default 4096. */
  maxTokens?: number;
  /** Where finished adapters and checkpoints go (none: nothing written). */
  output?: string;
  /** Continue each submitted adapter from its newest complete checkpoint under `output`. */
  resume?: boolean;
  /**
   * Train submitted adapters that already have results under `output` again from the start;
   * their earlier results move to <output>/.overwritten-<runId>/ until the new ones are
   * written. Without resume or overwrite, submit() refuses such an adapter.
   */
  overwrite?: boolean;
  /** This run's id (default: a new one, lib/io/output.ts newRunId). */
  runId?: string;
  /** Fault injection specs (lib/faults.ts grammar), for testing recovery. */
  faults?: Array<string | FaultSpec>;
  /** Run the stages in this thread instead of worker threads (tests, single device). */
  inProcess?: boolean;
  onEvent?: (ev: JobEvent) => void;
  onFault?: (ev: FaultEvent) => void;
  heartbeatMs?: number;
  hangTimeoutMs?: number;
  /** Failures of one stage tolerated before the run stops (default 3). */
  maxStageFailures?: number;
  /** Tokenizer pool threads for large datasets. */
  dataThreads?: number;
}

/** What a JobScheduler is made of (JobScheduler.start builds one from it). */
export interface OpenedRun {
  pipeline: Pipeline;
  hooks: SchedulerHooks;
  options: SchedulerOptions;
  /** The `nan:` faults, which the scheduler injects itself (rollback.ts). */
  nanFaults: FaultSpec[];
  runId: string;
}

/** Faults the scheduler injects itself (the others go to the stages). */
const SCHEDULER_FAULTS: Array<FaultSpec['kind']> = ['nan', 'kill', 'pause'];

/** Opens the pipeline and the hooks for a run; `pauseAll` is what a `pause:` fault does (pause every job). */
export async function openRun(o: StartOptions, pauseAll: () => void): Promise<OpenedRun> {
  if (o.resume && o.overwrite)
    throw new Error(
      'resume and overwrite exclude each other: go on from the checkpoints, or train again from the start',
    );
  const dir = openModelDir(o.model);
  const config = dir.config;
  const placed = o.cluster ? await resolveClusterLayout(config, o) : undefined;
  const layout = placed?.layout ?? resolveLayout(config, o);
  const faults = (o.faults ?? []).map((f) => (typeof f === 'string' ? parseFault(f) : f));
  const S = layout.plans.length;
  const inflight = o.inflight ?? Math.max(1, 2 * S);
  // a head share is a stage actor's round trip; in this thread the last stage runs the whole head
  if (o.inProcess) layout.plans = layout.plans.map(({ headShare: _, ...p }) => p);
  const base: BaseFormat = {
    ...(o.computeDtype ? { computeDtype: o.computeDtype } : {}),
    ...(o.quantize ? { quantize: o.quantize } : {}),
    ...(o.packWeights !== undefined ? { packWeights: o.packWeights } : {}),
  };
  linearQuantization(dir, o.quantize); // a conflict with a pre-quantized checkpoint fails here, before any stage starts
  let pipeline: Pipeline;
  if (o.inProcess) {
    const stages: StageProgram[] = [];
    try {
      for (let s = 0; s < S; s++) {
        const device = openDevice(layout.devices[s]!, {
          threads: layout.threads[s]!,
          ...(layout.budgets[s] ? { budget: layout.budgets[s] } : {}),
        });
        stages.push(
          new StageProgram(
            device,
            config,
            layout.plans[s]!,
            await loadStageWeights(device, dir, layout.plans[s]!, base),
            { recompute: !!o.recompute, ...(o.computeDtype ? { computeDtype: o.computeDtype } : {}) },
          ),
        );
      }
    } catch (e) {
      for (const st of stages) st.free();
      throw e;
    }
    pipeline = new LocalPipeline(config, stages);
  } else {
    const cluster = placed?.cluster;
    pipeline = await ActorPipeline.start({
      ...(cluster
        ? { stageEndpoint: (init, restart) => cluster.endpoint(init, restart) as unknown as StageWorker }
        : {}),
      modelDir: o.model,
      config,
      plans: layout.plans,
      devices: layout.devices,
      threads: layout.threads,
      budgets: layout.budgets,
      maxTokens: o.maxTokens ?? 4096,
      inflight,
      faults: faults.filter((f) => !SCHEDULER_FAULTS.includes(f.kind)),
      ...(o.recompute ? { recompute: true } : {}),
      base,
      ...(o.heartbeatMs ? { heartbeatMs: o.heartbeatMs } : {}),
      ...(o.hangTimeoutMs ? { hangTimeoutMs: o.hangTimeoutMs } : {}),
      ...(o.maxStageFailures !== undefined ? { maxStageFailures: o.maxStageFailures } : {}),
      ...(o.onFault ? { onFault: o.onFault } : {}),
    }).catch(async (e) => {
      await cluster?.close();
      throw e;
    });
    if (cluster) {
      const close = pipeline.close.bind(pipeline);
      pipeline.close = async () => {
        await close();
        await cluster.close();
      };
    }
  }
  const runId = o.runId ?? newRunId();
  const env = {
    modelDir: o.model,
    model: config,
    ...(o.output ? { output: o.output } : {}),
    resume: !!o.resume,
    overwrite: !!o.overwrite,
    runId,
    ...(o.dataThreads ? { dataThreads: o.dataThreads } : {}),
  };
  const at = (kind: FaultSpec['kind'], ev: JobEvent) =>
    faults.some((f) => f.kind === kind && f.adapter === ev.adapter && f.step === (ev as { step?: number }).step);
  const onEvent = !faults.some((f) => f.kind === 'kill' || f.kind === 'pause')
    ? o.onEvent
    : (ev: JobEvent) => {
        o.onEvent?.(ev);
        if (ev.type === 'checkpoint' && at('kill', ev)) process.kill(process.pid, 'SIGKILL');
        if (ev.type === 'step' && at('pause', ev)) pauseAll();
      };
  const hooks: SchedulerHooks = {
    prepare: (c) => prepareJob(env, c),
    ...outputHooks(env),
    ...promptSampler(env),
    ...(onEvent ? { onEvent } : {}),
  };
  const options: SchedulerOptions = {
    batchlora: o.batchlora ?? true,
    inflight,
    ...(o.inflightPerAdapter ? { inflightPerAdapter: o.inflightPerAdapter } : {}),
    ...(o.adaptersPerMicroBatch ? { adaptersPerMicroBatch: o.adaptersPerMicroBatch } : {}),
  };
  return { pipeline, hooks, options, nanFaults: faults.filter((f) => f.kind === 'nan'), runId };
}
