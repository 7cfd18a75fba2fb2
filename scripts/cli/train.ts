// mlora train [CONFIG] [--devices cpu:0,cpu:1|cuda:0,cuda:1|auto] [--output DIR] [--resume|--overwrite] [--dry-run] [--fault SPEC]...
// With no CONFIG: the embedded demo (four adapters fine-tuning the shipped stories260K on the
// story datasets in data/demo/stories/; train-demo.ts).
// This file: the options, the config with the command line's overrides, and the run itself
// (output folder, scheduler, signals, memory samples, metrics, report). Reading a config file
// is train-config.ts, --dry-run's plan train-plan.ts, the end-of-run summary train-summary.ts.
import fs from 'node:fs';
import path from 'node:path';
import { parseTrainConfig } from '../../lib/config.js';
import { JobScheduler } from '../../actors/scheduler/scheduler.js';
import type { ClusterOptions } from '../../actors/transport/remote.js';
import { describeSplit } from '../../lib/schedule/split.js';
import { parseFault } from '../../lib/faults.js';
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
import { DEMO_MODEL, demoConfig } from './train-demo.js';
import { checkPaths, readConfigFile } from './train-config.js';
import { splitProfile } from './train-split.js';
import { plan } from './train-plan.js';
import { earlierEvents, summaryTable } from './train-summary.js';

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
    const { profile } = await splitProfile(cfg, !!cluster);
    sup = await JobScheduler.start({
      model: cfg.model,
      devices: cfg.devices,
      split: cfg.pipeline.split,
      splitProfile: profile,
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
      packWeights: cfg.pack_weights,
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
  // what the summary's bubble ratio is made of: each stage's busy share of the training span, of it evaluation
  if (u && p.plans.length > 1)
    writeMetric({
      type: 'pipeline',
      span_ms: Math.round(u.spanMs),
      busy: u.busy.map((b) => Math.round(1000 * b) / 1000),
      eval_busy: u.evalBusy.map((b) => Math.round(1000 * b) / 1000),
      bubble: Math.round(1000 * u.bubble) / 1000,
      split: describeSplit(p.plans, p.devices).split('\n'),
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
