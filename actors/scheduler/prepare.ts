// What turns an adapter config into a running job: its tokenized data and loader, its
// held-out data, and its starting state (fresh PEFT init, an `init` adapter, or a checkpoint
// to resume from). Also the hooks that save checkpoints and finished adapters.
import path from 'node:path';
import type { AdapterConfig } from '../../lib/config.js';
import type { LoraSpec } from '../../lib/lora/adapter.js';
import type { LlamaConfig } from '../../lib/model/config.js';
import { loadTrainingData } from '../../lib/data/pool.js';
import { AdapterDataLoader, type LoaderState } from '../../lib/data/loader.js';
import { checkAdapterAgainstModel, loadAdapter, writeAdapterFiles } from '../../lib/io/peft.js';
import {
  latestCheckpoint,
  loadCheckpoint,
  readCheckpointMeta,
  saveCheckpoint,
  hashConfig,
} from '../../lib/io/checkpoint.js';
import {
  freshState,
  fromAdapterWeights,
  startingState,
  toAdapterWeights,
  type AdapterState,
} from '../../lib/lora/state.js';
import { API_WORDING, dropSetAside, refusal, setAside } from '../../lib/io/output.js';
import { loadTokenizer, type Tokenizer } from '../../lib/data/tokenizer.js';
import { ADAPTER_ID, openSingleModel, type SingleModel } from '../../lib/model/single.js';
import { encodePrompt, generate } from '../../lib/model/generate.js';
import type { JobView, PreparedJob, SchedulerHooks } from './job-types.js';

export function loraSpec(c: AdapterConfig): LoraSpec {
  return {
    r: c.lora.r,
    alpha: c.lora.alpha,
    dropout: c.lora.dropout,
    targets: [...c.lora.targets],
    useRslora: c.lora.use_rslora,
    seed: c.seed,
  };
}

/** The fields whose change makes a checkpoint unusable for resuming (data order, shapes). */
function resumeKey(c: AdapterConfig) {
  return {
    data: c.data,
    template: c.template,
    lora: c.lora,
    batch_size: c.batch_size,
    micro_batch_size: c.micro_batch_size,
    seq_len: c.seq_len,
    shuffle: c.shuffle,
    seed: c.seed,
    epochs: c.epochs,
    train_on_inputs: c.train_on_inputs,
  };
}

export interface JobEnvironment {
  modelDir: string;
  model: LlamaConfig;
  /** Where <adapter>/ folders go; undefined: nothing is written. */
  output?: string;
  /** Continue from the newest complete checkpoint of each adapter. */
  resume?: boolean;
  /**
   * Train adapters that have results in the output again from the start: their earlier
   * results move to <output>/.overwritten-<runId>/<adapter>/ until the new adapter is written.
   * Without resume or overwrite, an adapter with earlier results is refused.
   */
  overwrite?: boolean;
  /** This run's id (names the set-aside folder of overwrite). */
  runId?: string;
  /** Tokenizer pool threads for large datasets. */
  dataThreads?: number;
}

export async function prepareJob(env: JobEnvironment, c: AdapterConfig): Promise<PreparedJob> {
  const spec = loraSpec(c);
  const data = await loadTrainingData(c.data, {
    modelDir: env.modelDir,
    template: c.template,
    seqLen: c.seq_len,
    trainOnInputs: c.train_on_inputs,
    skipBad: c.skip_bad_records,
    ...(env.dataThreads ? { threads: env.dataThreads } : {}),
  });
  if (!data.examples.length) {
    throw new Error(
      `${c.data}: no usable examples for '${c.name}'${data.warnings.length ? `: ${data.warnings.join('; ')}` : ''}${data.dropped ? ` (raise seq_len, now ${c.seq_len})` : ''}`,
    );
  }
  const loader = new AdapterDataLoader(data.examples, {
    batchSize: c.batch_size,
    microBatchSize: c.micro_batch_size,
    epochs: c.epochs,
    shuffle: c.shuffle,
    seed: c.seed,
    ...(c.max_steps !== undefined ? { maxSteps: c.max_steps } : {}),
  });
  let initial: AdapterState;
  let startStep = 0;
  let startTokens = 0;
  let lowered: Pick<PreparedJob, 'lrScale' | 'rollbacks'> = {};
  const ckpt = env.resume && env.output ? latestCheckpoint(path.join(env.output, c.name)) : undefined;
  if (ckpt) {
    // The config check comes before the tensors are read: a changed r or targets must say so, not fail on a shape.
    if (readCheckpointMeta(ckpt.dir).configHash !== hashConfig(resumeKey(c))) {
      throw new Error(
        `${ckpt.dir}: was written with a different data/LoRA/batch config for '${c.name}'; cannot resume (move it away to start over)`,
      );
    }
    const { state, meta } = loadCheckpoint(ckpt.dir, env.model, spec);
    loader.restore(meta.loader as LoaderState);
    initial = state;
    startStep = meta.step;
    startTokens = typeof meta.tokens === 'number' ? meta.tokens : 0;
    // a run that rolled back after NaNs goes on with the learning rate it had lowered to
    if (meta.rollbacks) {
      const s = meta.lrScale;
      if (typeof s !== 'number' || !(s > 0 && s <= 1))
        throw new Error(`${ckpt.dir}/state.msgpack: lrScale must be a number in (0, 1], got ${JSON.stringify(s)}`);
      lowered = { rollbacks: meta.rollbacks, lrScale: s };
    }
  } else if (c.lora.init) {
    const ad = loadAdapter(c.lora.init);
    checkAdapterAgainstModel(ad, env.model, env.modelDir);
    const missing = spec.targets.filter((t) => !ad.targetModules.includes(t));
    if (missing.length)
      throw new Error(
        `${c.lora.init}: adapter has no ${missing.join(', ')} (the job targets ${spec.targets.join(', ')})`,
      );
    initial = startingState(fromAdapterWeights(env.model, spec, ad, c.lora.init));
  } else {
    initial = freshState(env.model, spec);
  }
  const job: PreparedJob = { spec, source: loader, initial, startStep, startTokens, ...lowered };
  if (c.eval?.data) {
    const ev = await loadTrainingData(c.eval.data, {
      modelDir: env.modelDir,
      template: c.template,
      seqLen: c.seq_len,
      trainOnInputs: c.train_on_inputs,
      skipBad: c.skip_bad_records,
    });
    job.evalSource = () =>
      new AdapterDataLoader(ev.examples, { batchSize: c.micro_batch_size, shuffle: false, epochs: 1 });
  }
  return job;
}

/**
 * Scheduler hooks that write checkpoints and finished adapters under env.output, and refuse
 * (or set aside, with overwrite) an adapter's earlier results there before it trains.
 */
export function outputHooks(env: JobEnvironment): Pick<SchedulerHooks, 'claim' | 'checkpoint' | 'finish'> {
  if (!env.output) return {};
  const out = env.output;
  return {
    claim: (c: AdapterConfig) => {
      if (env.overwrite) setAside(out, c.name, env.runId!);
      else if (!env.resume) {
        const e = refusal(out, [c.name], API_WORDING);
        if (e) throw e;
      }
    },
    checkpoint: async (job: JobView, state: AdapterState) =>
      saveCheckpoint({
        adapterDir: path.join(out, job.name),
        config: env.model,
        spec: job.spec,
        baseModel: env.modelDir,
        state,
        meta: {
          step: job.step,
          configHash: hashConfig(resumeKey(job.config)),
          loader: job.sourceState(),
          time: new Date().toISOString(),
          tokens: job.tokens - job.tokensInStep,
          loss: job.lastLoss,
          ...(job.rollbacks ? { rollbacks: job.rollbacks, lrScale: job.lrScale } : {}),
        },
      }),
    finish: async (job: JobView, state: AdapterState) => {
      const dir = path.join(out, job.name);
      writeAdapterFiles(dir, toAdapterWeights(env.model, job.spec, state.params, env.modelDir));
      if (env.overwrite) dropSetAside(out, job.name, env.runId!); // the new results are complete
      return dir;
    },
  };
}

/**
 * Greedy completions of an adapter's eval.prompts: a whole-model copy of the base on one CPU
 * device (opened at the first call, shared by every adapter, one adapter at a time) with the
 * adapter's weights from the state the scheduler exported, decoded with the KV cache
 * (lib/model/generate.ts). Dropout is off, as at inference.
 */
export function promptSampler(env: JobEnvironment): Required<Pick<SchedulerHooks, 'sample' | 'close'>> {
  let opened: Promise<{ model: SingleModel; tok: Tokenizer }> | undefined;
  let queue: Promise<unknown> = Promise.resolve();
  const run = async (job: JobView, state: AdapterState): Promise<Array<{ prompt: string; text: string }>> => {
    const e = job.config.eval!;
    opened ??= openSingleModel(env.modelDir).then((model) => ({ model, tok: loadTokenizer(env.modelDir) }));
    const { model, tok } = await opened;
    model.program.addAdapter(ADAPTER_ID, { ...job.spec, dropout: 0 }, state.params);
    try {
      const m = { ...model, hasAdapter: true };
      const out: Array<{ prompt: string; text: string }> = [];
      for (const prompt of e.prompts) {
        const ids = encodePrompt(tok, env.model, prompt);
        const gen = await generate(m, ids, {
          maxNewTokens: e.max_new_tokens,
          ...(tok.eosId !== undefined ? { eosId: tok.eosId } : {}),
        });
        out.push({ prompt, text: tok.decodeAfter(ids, gen, { skipSpecialTokens: true }) });
      }
      return out;
    } finally {
      model.program.removeAdapter(ADAPTER_ID);
    }
  };
  return {
    sample: (job, state) => {
      const r = queue.then(() => run(job, state));
      queue = r.catch(() => {});
      return r;
    },
    close: async () => {
      await queue;
      if (opened) (await opened.catch(() => undefined))?.model.free();
    },
  };
}
