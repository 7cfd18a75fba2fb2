// mlora train [CONFIG] [--devices cpu:0,cpu:1|cuda:0,cuda:1|auto] [--output DIR] [--resume|--overwrite] [--dry-run] [--fault SPEC]...
// With no CONFIG: the embedded demo (four adapters fine-tuning the shipped stories260K on the
// story datasets in data/demo/stories/).
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import YAML from 'yaml';
import { parseTrainConfig, type TrainConfig } from '../../lib/config.js';
import { openModelDir } from '../../lib/io/hf-model.js';
import { resolveClusterLayout, resolveLayout } from '../../actors/scheduler/layout.js';
import { JobScheduler } from '../../actors/scheduler/scheduler.js';
import type { Job } from '../../actors/scheduler/job.js';
import type { ClusterOptions } from '../../actors/transport/remote.js';
import { describeSplit, type SplitProfile } from '../../lib/schedule/split.js';
import { adaptersPerMessage } from '../../lib/schedule/packing.js';
import { formatBytes } from '../../lib/tensor.js';
import { activationBytes, scratchBytes, workBytes } from '../../lib/model/stage.js';
import { linearQuantization, stageWeightBreakdown } from '../../lib/model/weights.js';
import { StageAdapter } from '../../lib/lora/adapter.js';
import { loraSpec } from '../../actors/scheduler/prepare.js';
import { parseFault } from '../../lib/faults.js';
import { LORA_TARGETS } from '../../lib/model/config.js';
import { parseCommandArgs, usageError, type Command } from './args.js';
import { Progress } from './progress.js';
import { renderGrid, utilisation } from '../../lib/schedule/grid.js';
import { writeReport, type MemorySample, type ReportFault } from './report.js';
import type { JobEvent } from '../../actors/protocol.js';
import {
  CLI_WORDING,
  dropAllSetAside,
  earlierResults,
  newRunId,
  refusal,
  setAsideDir,
  setAsideFile,
} from '../../lib/io/output.js';
import { hashConfig } from '../../lib/io/checkpoint.js';
import { machineInfo, mloraVersion } from '../../lib/machine.js';

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../../..');

const USAGE = `usage: mlora train [CONFIG] [options]

CONFIG is a JSON or YAML training config (see README). Without it, the embedded demo runs.

options:
  --devices LIST     cpu:0,cpu:1 | cuda:0,cuda:1 | auto (default: the config's, else auto)
  --output DIR       where adapters, checkpoints, metrics.jsonl and report.html go
  --resume           continue every adapter from its newest complete checkpoint
  --overwrite        train again from the start into an output that holds earlier results
                     (they move to OUTPUT/.overwritten-<run>/ until the new ones are complete)
  --dry-run          print the plan (stage split, memory per stage, admission order) and exit
  --fault SPEC       inject a fault (repeatable), e.g. crash:stage=1,after=7 (see README)
  --threads N        CPU threads per device
  --memory BYTES     byte budget per device (e.g. 4GiB)
  --compute-dtype D  f32 | bf16: precision of the frozen base (config compute_dtype)
  --quantize Q       nf4 | nf4-dq | int8: quantize the base's decoder linears at load (config quantize)
  --fast             the demo in a few small steps (tests, smoke checks)
  --progress MODE    auto | bar | plain | none
  --cluster URL      run the stages on stage hosts (mlora stage serve) registered at this NATS
                     server: nats://user:password@host:4222; devices then are HOST/cpu:N or 'cluster'
  --tls-ca FILE      (with --cluster) CA of the server's certificate; --tls-cert/--tls-key FILE for mutual TLS
  --nkey FILE        (with --cluster) authenticate with this nkey seed file`;

/** The base model of the demo: stories260K, shipped in data/models/ (a real pretrained LLaMA). */
export const DEMO_MODEL = path.join(root, 'data/models/stories260K');

/**
 * The embedded demo: four adapters on stories260K, each teaching it something a greedy
 * sample shows (a new character, a setting, a style, a format), with different LoRA settings;
 * held-out loss on each adapter's eval split and a greedy sample, before and after training.
 * `fast`: a few steps of small batches and short samples (tests).
 */
export function demoConfig(modelDir: string, output: string, fast: boolean): unknown {
  const data = (n: string) => path.join(root, 'data/demo/stories', `${n}.jsonl`);
  const steps = fast ? 8 : 60;
  const common = {
    seq_len: 256,
    batch_size: fast ? 4 : 8,
    epochs: fast ? 1 : 3,
    max_steps: steps,
    save_every: fast ? 4 : 20,
    schedule: { type: 'cosine', warmup_steps: fast ? 0 : 4 },
  };
  // held-out loss before the first step, every 20 steps and after the last; a greedy sample
  // from the prompt before training and after it shows what the adapter taught
  const adapter = (name: string, seed: number, prompt: string, rest: Record<string, unknown>) => ({
    name,
    data: data(name),
    eval: { data: data(`${name}.eval`), every: fast ? steps : 20, prompts: [prompt], max_new_tokens: fast ? 24 : 48 },
    ...common,
    seed,
    ...rest,
  });
  // alpha = 2r: every adapter's update has the same scale, whatever its rank
  const lora = (r: number, targets: readonly string[]) => ({ r, alpha: 2 * r, dropout: 0, targets });
  return {
    model: modelDir,
    output,
    adapters: [
      adapter('robot', 1, 'Once upon a time,', { lora: lora(8, LORA_TARGETS), optimizer: { lr: 3e-3 } }),
      adapter('sea', 2, 'Once upon a time,', {
        lora: lora(4, ['q_proj', 'v_proj', 'o_proj', 'up_proj', 'down_proj']),
        optimizer: { lr: 5e-3 },
      }),
      adapter('rhyme', 3, 'Once upon a time,', {
        lora: lora(16, LORA_TARGETS),
        optimizer: { lr: 4e-3, weight_decay: 0.01 },
        micro_batch_size: fast ? 2 : 4,
      }),
      adapter('dialogue', 4, 'Mom:', { lora: lora(8, LORA_TARGETS), optimizer: { lr: 4e-3 }, max_grad_norm: 1 }),
    ],
    pipeline: {},
    log: { every: fast ? 1 : 5, progress: 'auto' },
  };
}

/** Reads a config file and resolves its relative paths against the file's folder. */
export function readConfigFile(file: string): unknown {
  let text: string;
  try {
    text = fs.readFileSync(file, 'utf8');
  } catch (e) {
    throw new Error(
      `${file}: ${(e as NodeJS.ErrnoException).code === 'ENOENT' ? 'no such file' : (e as Error).message}`,
    );
  }
  let raw: unknown;
  try {
    raw = /\.ya?ml$/i.test(file) ? YAML.parse(text) : JSON.parse(text);
  } catch (e) {
    throw new Error(`${file}: not valid ${/\.ya?ml$/i.test(file) ? 'YAML' : 'JSON'}: ${(e as Error).message}`);
  }
  if (!raw || typeof raw !== 'object' || Array.isArray(raw))
    throw new Error(`${file}: the config must be an object with model, adapters, ...`);
  const base = path.dirname(path.resolve(file));
  const abs = (p: unknown) => (typeof p === 'string' && !path.isAbsolute(p) ? path.resolve(base, p) : p);
  const c = raw as Record<string, unknown>;
  c.model = abs(c.model);
  if (c.output !== undefined) c.output = abs(c.output);
  if (Array.isArray(c.adapters)) {
    for (const a of c.adapters as Array<Record<string, unknown>>) {
      if (!a || typeof a !== 'object') continue;
      a.data = abs(a.data);
      if (a.template && typeof a.template === 'string' && /[/\\.]/.test(a.template)) a.template = abs(a.template);
      if (a.eval && typeof a.eval === 'object')
        (a.eval as Record<string, unknown>).data = abs((a.eval as Record<string, unknown>).data);
      if (a.lora && typeof a.lora === 'object' && (a.lora as Record<string, unknown>).init)
        (a.lora as Record<string, unknown>).init = abs((a.lora as Record<string, unknown>).init);
    }
  }
  return c;
}

/**
 * The paths a config names exist (model dir with config.json, each dataset, init adapter,
 * template file): checked before anything loads, each error naming the field.
 */
export function checkPaths(cfg: TrainConfig, where: string): void {
  const problems: string[] = [];
  const st = (p: string) => fs.statSync(p, { throwIfNoEntry: false });
  const m = st(cfg.model);
  if (!m) problems.push(`model: ${cfg.model}: no such directory`);
  else if (!m.isDirectory())
    problems.push(
      `model: ${cfg.model} is not a directory (expected a Hugging Face model directory: config.json, model.safetensors, tokenizer.json)`,
    );
  else if (!st(path.join(cfg.model, 'config.json')))
    problems.push(
      `model: ${cfg.model} has no config.json (expected a Hugging Face model directory: config.json, model.safetensors, tokenizer.json)`,
    );
  cfg.adapters.forEach((a, i) => {
    const file = (field: string, p: string) => {
      const s = st(p);
      if (!s) problems.push(`adapters[${i}].${field}: ${p}: no such file`);
      else if (!s.isFile()) problems.push(`adapters[${i}].${field}: ${p} is not a file`);
    };
    file('data', a.data);
    if (a.eval?.data) file('eval.data', a.eval.data);
    if (a.template && /[/\\]/.test(a.template)) file('template', a.template);
    if (a.lora.init) {
      const s = st(a.lora.init);
      if (!s || !s.isDirectory()) problems.push(`adapters[${i}].lora.init: ${a.lora.init}: no such adapter directory`);
      else if (!st(path.join(a.lora.init, 'adapter_config.json')))
        problems.push(
          `adapters[${i}].lora.init: ${a.lora.init} has no adapter_config.json (expected a PEFT adapter directory)`,
        );
    }
  });
  if (problems.length) throw new Error(problems.map((p) => `${where}: ${p}`).join('\n'));
}

/** The cost model's view of the data: the longest sequences the adapters train on. */
function splitProfile(cfg: TrainConfig): SplitProfile {
  return { seqLen: Math.max(...cfg.adapters.map((a) => a.seq_len)) };
}

async function plan(cfg: TrainConfig, out: (s: string) => void, cluster?: ClusterOptions): Promise<void> {
  const dir = openModelDir(cfg.model);
  const c = dir.config;
  const lo = {
    devices: cfg.devices,
    split: cfg.pipeline.split,
    splitProfile: splitProfile(cfg),
    ...(cfg.pipeline.threads ? { threads: cfg.pipeline.threads } : {}),
    ...(cfg.pipeline.memory !== undefined ? { memory: cfg.pipeline.memory } : {}),
  };
  let layout;
  if (cluster) {
    const placed = await resolveClusterLayout(c, { ...lo, cluster });
    layout = placed.layout;
    out(`cluster placement (registered devices: memory and threads as each host registered them):`);
    for (const [s, d] of placed.cluster.placement.entries())
      out(
        `  stage ${s} -> ${d.id} (${d.kind}, ${formatBytes(d.memory)}, ${d.threads} thread${d.threads === 1 ? '' : 's'})`,
      );
    await placed.cluster.close();
  } else layout = resolveLayout(c, lo);
  out(
    `model ${cfg.model}: ${c.numLayers} layers, hidden ${c.hiddenSize}, ${c.numHeads}/${c.numKvHeads} heads, vocab ${c.vocabSize}`,
  );
  out(describeSplit(layout.plans, layout.devices));
  const baseFormat = { computeDtype: cfg.compute_dtype, ...(cfg.quantize ? { quantize: cfg.quantize } : {}) };
  const q = linearQuantization(dir, cfg.quantize);
  const fmt0 = stageWeightBreakdown(dir, layout.plans[0]!, baseFormat);
  out(
    `base: compute ${cfg.compute_dtype}; decoder linears ${q ? `${q}${dir.quantization ? ' (as saved by bitsandbytes)' : ' (quantized at load)'}` : fmt0.linearFormat}; embeddings and LM head ${fmt0.floatFormat}, norms f32`,
  );
  const specs = cfg.adapters.map((a) => ({ a, spec: loraSpec(a), tokens: a.micro_batch_size * a.seq_len }));
  const S = layout.plans.length;
  const per = cfg.pipeline.batchlora
    ? adaptersPerMessage(cfg.adapters.length, S, cfg.pipeline.adapters_per_micro_batch)
    : 1;
  const group = specs.slice(0, per);
  const tokens = group.reduce((s, g) => s + g.tokens, 0);
  out(
    `\nmemory per stage (largest planned micro-batch: ${tokens} tokens from ${group.length} adapter(s), ${cfg.pipeline.inflight ?? 2 * S} in flight):`,
  );
  layout.plans.forEach((p, s) => {
    const parts = stageWeightBreakdown(dir, p, baseFormat);
    const base = parts.linears + parts.other;
    const ad = specs.reduce((sum, g) => sum + StageAdapter.bytes(c, g.spec, p.lo, p.hi), 0);
    const segs = group.map((g) => ({ rows: g.tokens, spec: g.spec }));
    const act = activationBytes(c, p, tokens, segs, cfg.pipeline.recompute);
    const inflight = Math.min(cfg.pipeline.inflight ?? 2 * S, S);
    const scratch = scratchBytes(c, p, tokens) + workBytes(c, tokens, segs, cfg.pipeline.recompute);
    const total = base + ad + act * inflight + scratch;
    const budget = layout.budgets[s]!;
    out(
      `  stage ${s} ${layout.devices[s]} (${layout.threads[s]} thread${layout.threads[s] === 1 ? '' : 's'}): base ${formatBytes(base)} (linears ${formatBytes(parts.linears)} ${parts.linearFormat}, rest ${formatBytes(parts.other)}), adapters ${formatBytes(ad)}, ` +
        `activations ${formatBytes(act)}${cfg.pipeline.recompute ? ' (layer inputs: recompute)' : ''} × ${inflight}, scratch ${formatBytes(scratch)}; total ${formatBytes(total)} of ${budget ? formatBytes(budget) : 'the GPU'}` +
        (budget ? `, headroom ${formatBytes(budget - total)}` : ''),
    );
  });
  const order = [...cfg.adapters].map((a, i) => ({ a, i })).sort((x, y) => y.a.priority - x.a.priority || x.i - y.i);
  out(
    `\nadmission order: ${order.map(({ a }) => `${a.name}${a.priority ? ` (priority ${a.priority})` : ''}`).join(', ')}`,
  );
  const flopsPerToken =
    c.numLayers *
      2 *
      2 *
      (c.hiddenSize * c.numHeads * c.headDim * 2 +
        2 * c.hiddenSize * c.numKvHeads * c.headDim +
        3 * c.hiddenSize * c.intermediateSize) +
    4 * c.hiddenSize * c.vocabSize;
  const gflops = layout.threads.reduce((a, t) => a + t, 0) * 40; // a conservative 40 GFLOP/s per CPU thread
  out(
    `estimated throughput: ~${Math.round((gflops * 1e9) / flopsPerToken)} tokens/s (${(flopsPerToken / 1e6).toFixed(1)} MFLOP per token, ~${gflops} GFLOP/s assumed)`,
  );
}

type Ev<T extends JobEvent['type']> = Extract<JobEvent, { type: T }>;

/** The end-of-run table; `events` are this run's and, on a resume, the earlier runs' (the step-0 eval, the first samples). */
function summaryTable(jobs: Job[], seconds: number, bubble: number | undefined, events: JobEvent[]): string {
  const rows = [['adapter', 'state', 'steps', 'final loss', 'eval loss before -> after', 'eval ppl', 'tokens', 'time']];
  for (const j of jobs) {
    const t = j.finishedAt && j.startedAt ? (j.finishedAt - j.startedAt) / 1000 : 0;
    const before =
      j.baselineEval ?? events.find((e): e is Ev<'eval'> => e.type === 'eval' && e.adapter === j.name && e.step === 0);
    const evalLoss = j.lastEval ? `${before ? `${before.loss.toFixed(4)} -> ` : ''}${j.lastEval.loss.toFixed(4)}` : '-';
    rows.push([
      j.name,
      j.state,
      `${j.step}/${j.totalSteps}`,
      Number.isFinite(j.lastLoss) ? j.lastLoss.toFixed(4) : '-',
      evalLoss,
      j.lastEval ? j.lastEval.perplexity.toFixed(2) : '-',
      String(j.tokens),
      `${t.toFixed(1)}s`,
    ]);
  }
  const w = rows[0]!.map((_, i) => Math.max(...rows.map((r) => r[i]!.length)));
  const lines = rows.map((r) => r.map((c, i) => (i === 0 ? c.padEnd(w[i]!) : c.padStart(w[i]!))).join('  '));
  lines.splice(1, 0, w.map((n) => '-'.repeat(n)).join('  '));
  const tokens = jobs.reduce((s, j) => s + j.tokens, 0);
  lines.push(
    '',
    `overall: ${tokens} tokens in ${seconds.toFixed(1)} s = ${Math.round(tokens / Math.max(1e-9, seconds))} tokens/s` +
      (bubble !== undefined ? `; bubble ratio ${(100 * bubble).toFixed(1)}%` : ''),
  );
  const samples = events.filter((e): e is Ev<'sample'> => e.type === 'sample');
  const one = (s: string) => JSON.stringify(s.length > 200 ? `${s.slice(0, 200)}…` : s);
  for (const j of jobs) {
    const mine = samples.filter((e) => e.adapter === j.name);
    const prompts = [...new Set(mine.map((e) => e.prompt))];
    if (!prompts.length) continue;
    lines.push('', `[${j.name}] greedy samples`);
    for (const p of prompts) {
      lines.push(`  prompt ${one(p)}`);
      for (const when of ['before', 'after'] as const) {
        const e = mine.filter((x) => x.prompt === p && x.when === when).at(-1);
        if (e) lines.push(`    ${when.padEnd(6)} (step ${e.step}): ${one(e.text)}`);
      }
    }
  }
  return lines.join('\n');
}

/** Metrics records already in an output (a resumed run's earlier runs), as events; none when there is no file. */
function earlierEvents(file: string): JobEvent[] {
  let text: string;
  try {
    text = fs.readFileSync(file, 'utf8');
  } catch {
    return [];
  }
  const out: JobEvent[] = [];
  for (const line of text.split('\n')) {
    if (!line.trim()) continue;
    try {
      const r = JSON.parse(line) as JobEvent & { time: string | number };
      if (typeof r.time === 'string') r.time = Date.parse(r.time);
      out.push(r as JobEvent);
    } catch {
      // a line cut short by a crash: the rest is still read
    }
  }
  return out;
}

const CMD: Command = { name: 'train', usage: USAGE };

export async function main(argv: string[]): Promise<number> {
  const args = parseCommandArgs(
    CMD,
    argv,
    {
      devices: { type: 'string' },
      output: { type: 'string' },
      resume: { type: 'boolean' },
      'dry-run': { type: 'boolean' },
      fault: { type: 'string', multiple: true },
      threads: { type: 'string' },
      memory: { type: 'string' },
      fast: { type: 'boolean' },
      progress: { type: 'string' },
      'in-process': { type: 'boolean' },
      overwrite: { type: 'boolean' },
      cluster: { type: 'string' },
      'tls-ca': { type: 'string' },
      'tls-cert': { type: 'string' },
      'tls-key': { type: 'string' },
      nkey: { type: 'string' },
      'compute-dtype': { type: 'string' },
      quantize: { type: 'string' },
    },
    true,
  );
  if (typeof args === 'number') return args;
  if (args.positionals.length > 1) return usageError(CMD, `one CONFIG at most, got ${args.positionals.join(' ')}`);
  if (args.values.resume && args.values.overwrite)
    return usageError(
      CMD,
      '--resume and --overwrite exclude each other (go on from the checkpoints, or train again from the start)',
    );
  const fast = !!args.values.fast;
  let raw: Record<string, unknown>;
  if (args.positionals[0]) {
    raw = readConfigFile(args.positionals[0]) as Record<string, unknown>;
  } else {
    raw = demoConfig(
      DEMO_MODEL,
      path.resolve(args.values.output ?? (fast ? 'mlora-demo-fast' : 'mlora-demo')),
      fast,
    ) as Record<string, unknown>;
    console.log(
      `mlora demo${fast ? ' (--fast: 8 small steps)' : ''}: fine-tuning stories260K (${DEMO_MODEL}) with 4 adapters on data/demo/stories/ (robot, sea, rhyme, dialogue)`,
    );
  }
  if (args.values.devices)
    raw.devices =
      args.values.devices === 'auto' || args.values.devices === 'cluster'
        ? args.values.devices
        : args.values.devices.split(',').map((s) => s.trim());
  if (args.values.output) raw.output = path.resolve(args.values.output);
  if (args.values['compute-dtype']) raw.compute_dtype = args.values['compute-dtype'];
  if (args.values.quantize) raw.quantize = args.values.quantize;
  const pipe = (raw.pipeline ?? {}) as Record<string, unknown>;
  if (args.values.threads) pipe.threads = Number(args.values.threads);
  if (args.values.memory) pipe.memory = args.values.memory;
  raw.pipeline = pipe;
  const where = args.positionals[0] ?? 'demo config';
  const cfg = parseTrainConfig(raw, where);
  checkPaths(cfg, where);
  const faults = (args.values.fault ?? []).map(parseFault);
  const v = args.values;
  const auth = {
    ...(v['tls-ca'] ? { tlsCa: v['tls-ca'] } : {}),
    ...(v['tls-cert'] ? { tlsCert: v['tls-cert'] } : {}),
    ...(v['tls-key'] ? { tlsKey: v['tls-key'] } : {}),
    ...(v.nkey ? { nkeySeed: v.nkey } : {}),
  };
  const cluster: ClusterOptions | undefined = v.cluster ? { url: v.cluster, auth } : undefined;
  if (args.values['dry-run']) {
    await plan(cfg, (s) => console.log(s), cluster);
    return 0;
  }
  const resume = !!args.values.resume,
    overwrite = !!args.values.overwrite;
  // before anything loads or trains: earlier results are never written over without being asked
  const names = cfg.adapters.map((a) => a.name);
  if (!resume && !overwrite) {
    const e = refusal(cfg.output, names, CLI_WORDING);
    if (e) {
      console.error(`mlora train: ${e.message}`);
      return 1;
    }
  }
  const logSetting = (args.values.progress as 'auto' | 'bar' | 'plain' | 'none' | undefined) ?? cfg.log.progress;
  const progress = new Progress(Progress.pick(logSetting), process.stdout, cfg.log.every);
  const runId = newRunId();
  const startTime = new Date();
  fs.mkdirSync(cfg.output, { recursive: true });
  const metricsFile = path.join(cfg.output, 'metrics.jsonl');
  const aside = setAsideDir(cfg.output, runId);
  const replacing = overwrite ? names.filter((n) => earlierResults(cfg.output, n).length) : [];
  if (overwrite) {
    // printed whatever the progress mode: where earlier results went is never to be missed
    if (replacing.length)
      console.log(
        `--overwrite: the earlier results of ${replacing.join(', ')} move to ${aside}/ (removed once the new ones are complete)`,
      );
    for (const f of ['metrics.jsonl', 'report.html']) setAsideFile(cfg.output, f, runId);
  }
  // a resumed run's summary and report also show what the earlier runs recorded (the step-0 eval, the first samples)
  const earlier = resume ? earlierEvents(metricsFile) : [];
  const metrics = fs.openSync(metricsFile, 'a');
  const writeMetric = (rec: object) => fs.writeSync(metrics, JSON.stringify(rec) + '\n');
  const machine = machineInfo();
  const { output: _o, log: _l, ...hashed } = cfg;
  const header = {
    type: 'run',
    run: runId,
    config_hash: hashConfig(hashed),
    start: startTime.toISOString(),
    mlora: mloraVersion(),
    mode: resume ? 'resume' : overwrite ? 'overwrite' : 'fresh',
    config_file: args.positionals[0] ? path.resolve(args.positionals[0]) : 'demo',
    machine,
  };
  writeMetric(header);
  const history: JobEvent[] = [];
  const faultLog: ReportFault[] = [];
  const memory: MemorySample[] = [];
  const t0 = Date.now();
  let sup: JobScheduler;
  try {
    sup = await JobScheduler.start({
      model: cfg.model,
      devices: cfg.devices,
      split: cfg.pipeline.split,
      splitProfile: splitProfile(cfg),
      output: cfg.output,
      resume,
      overwrite,
      runId,
      faults,
      batchlora: cfg.pipeline.batchlora,
      recompute: cfg.pipeline.recompute,
      ...(cfg.pipeline.inflight_per_adapter ? { inflightPerAdapter: cfg.pipeline.inflight_per_adapter } : {}),
      computeDtype: cfg.compute_dtype,
      ...(cfg.quantize ? { quantize: cfg.quantize } : {}),
      ...(cfg.pipeline.inflight ? { inflight: cfg.pipeline.inflight } : {}),
      ...(cfg.pipeline.adapters_per_micro_batch
        ? { adaptersPerMicroBatch: cfg.pipeline.adapters_per_micro_batch }
        : {}),
      ...(cfg.pipeline.threads ? { threads: cfg.pipeline.threads } : {}),
      ...(cfg.pipeline.memory !== undefined ? { memory: cfg.pipeline.memory } : {}),
      maxTokens: Math.max(4096, ...cfg.adapters.map((a) => a.micro_batch_size * a.seq_len)),
      inProcess: !!args.values['in-process'],
      ...(cluster ? { cluster } : {}),
      onEvent: (ev) => {
        progress.event(ev);
        history.push(ev);
        if (ev.type !== 'state') {
          writeMetric({ ...ev, time: new Date(ev.time).toISOString() });
        }
      },
      onFault: (f) => {
        if (f.fatal)
          progress.log(
            `fault on stage ${f.stage}: ${f.fault} (${f.detail}); too many failures of this stage, the run stops`,
          );
        else
          progress.log(
            `fault on stage ${f.stage}: ${f.fault} (${f.detail}); recovered in ${Math.round(f.recoveredMs ?? 0)} ms, ${f.replayed ?? 0} micro-batch(es) replayed${f.admission !== undefined ? `; admission lowered to ${f.admission} micro-batch(es) in flight` : ''}`,
          );
        faultLog.push({
          time: Date.now(),
          stage: f.stage,
          fault: f.fault,
          detail: f.detail,
          ...(f.recoveredMs !== undefined ? { recoveredMs: f.recoveredMs } : {}),
          ...(f.replayed !== undefined ? { replayed: f.replayed } : {}),
          ...(f.fatal ? { fatal: true } : {}),
        });
        writeMetric({
          type: 'fault',
          stage: f.stage,
          fault: f.fault,
          detail: f.detail,
          detection_ms: f.silentMs,
          recovery_ms: f.recoveredMs,
          replayed: f.replayed,
          ...(f.admission !== undefined ? { admission: f.admission } : {}),
          ...(f.fatal ? { fatal: true } : {}),
          time: new Date().toISOString(),
        });
      },
    });
  } catch (e) {
    progress.stop();
    fs.closeSync(metrics);
    throw e;
  }
  const p = sup.pipeline;
  progress.log(describeSplit(p.plans, p.devices));
  const jobs = cfg.adapters.map((a) => sup.submit(a));
  let interrupted = false;
  const onSignal = (sig: string) => {
    if (interrupted) {
      progress.log(
        `${sig} again: exiting now (checkpoints already complete stay valid; a half-written one is ignored on --resume)`,
      );
      // Die of the signal itself (a shell sees 128+N: 130 for SIGINT). process.exit() would run
      // the teardown, terminating the stage workers under their running native work, which
      // aborts the process; with the default action restored nothing more runs.
      process.removeAllListeners(sig);
      process.kill(process.pid, sig);
      return;
    }
    interrupted = true;
    progress.log(
      `${sig}: stopping; finishing in-flight micro-batches and checkpointing every adapter (${sig} again to exit at once)`,
    );
    void sup.stop();
  };
  const sigint = () => onSignal('SIGINT');
  const sigterm = () => onSignal('SIGTERM');
  process.on('SIGINT', sigint);
  process.on('SIGTERM', sigterm);
  // memory per stage for the report, sampled once a second (one query at a time)
  let sampling: Promise<void> | undefined;
  const sampleMemory = () => {
    sampling ??= p
      .memory()
      .then(
        (m) => void memory.push({ time: Date.now(), stages: m }),
        () => {}, // a stage being restarted: the next sample gets it
      )
      .finally(() => (sampling = undefined));
    return sampling;
  };
  void sampleMemory();
  const util = setInterval(() => {
    void sampleMemory();
    const u = utilisation(
      p.schedule().filter((r) => r.end > p.schedule().at(-1)!.end - 5000),
      p.plans.length,
    );
    if (u.spanMs > 0)
      progress.setFooter(`stages busy ${u.busy.map((b) => `${Math.round(100 * b)}%`).join(' / ')} (last 5 s)`);
  }, 1000);
  util.unref();
  let failed = false;
  try {
    await Promise.race([sup.drain(), sup.stopped()]);
  } catch (e) {
    failed = true;
    progress.log(`run stopped: ${(e as Error).message}`);
  }
  clearInterval(util);
  // a stage that died for good may never answer: the report does without that sample
  const settle = (x: Promise<void> | undefined) =>
    Promise.race([x, new Promise<void>((r) => setTimeout(r, 2000).unref())]);
  await settle(sampling);
  if (!failed) await settle(sampleMemory()); // the peaks at the end
  if (interrupted || failed) {
    await sup.stop();
    for (const { job, state } of await sup.exportAll()) {
      try {
        const dir = await sup.hooks.checkpoint!(job, state);
        progress.log(`[${job.name}] checkpoint at step ${job.step}: ${dir}`);
      } catch (e) {
        progress.log(`[${job.name}] could not write a checkpoint: ${(e as Error).message}`);
      }
    }
  }
  const seconds = (Date.now() - t0) / 1000;
  const sched = p.schedule();
  const u = sched.length ? utilisation(sched, p.plans.length) : undefined;
  await sup.close();
  progress.stop();
  process.off('SIGINT', sigint);
  process.off('SIGTERM', sigterm);
  const peaks = memory.at(-1)?.stages;
  if (peaks)
    writeMetric({
      type: 'memory',
      stages: peaks.map((m) => ({ device: m.device, budget: m.budget, peak: m.peak })),
      time: new Date().toISOString(),
    });
  fs.closeSync(metrics);
  const reportPath = writeReport({
    output: cfg.output,
    header,
    config: cfg,
    events: [...earlier, ...history],
    runEvents: history,
    faults: faultLog,
    schedule: sched,
    stages: p.plans.length,
    devices: p.devices,
    memory,
    t0,
  });
  if (replacing.length || fs.existsSync(aside)) {
    if (jobs.every((j) => j.state === 'done')) dropAllSetAside(cfg.output, runId);
    else
      console.log(
        `the earlier results of the adapters that did not finish are kept in ${aside}/ (move them back to ${cfg.output}/ to use them)`,
      );
  }
  console.log('');
  console.log(summaryTable(jobs, seconds, u?.bubble, [...earlier, ...history]));
  if (sched.length && p.plans.length > 1) console.log('\n' + renderGrid(sched, p.plans.length, 72));
  console.log(
    `\nadapters and checkpoints in ${cfg.output}/<adapter>/, metrics in ${path.join(cfg.output, 'metrics.jsonl')}, report ${reportPath}`,
  );
  if (interrupted) return 130;
  if (failed) return 1;
  return jobs.some((j) => j.state === 'failed') ? 1 : 0;
}
