// `mlora bench --scenario pipeline`: 2 stage actors (1 thread each) vs 1 stage with 1 and 2
// threads, K adapters scheduled as the supervisor does (trainInGroups); tokens/s, model FLOP
// utilisation, each stage's busy fraction and the bubble ratio over the steady-state window of
// the run's schedule (lib/schedule/grid.ts), and for one adapter the within-step pipelining of
// several micro-batches per step.
import { openModelDir } from '../../lib/io/hf-model.js';
import type { LlamaConfig } from '../../lib/model/config.js';
import type { StagePlan } from '../../lib/model/stage.js';
import type { PackWeights } from '../../lib/model/weights.js';
import { freshState } from '../../lib/lora/state.js';
import { ActorPipeline } from '../../actors/runtime.js';
import { assemble } from '../../actors/scheduler/assemble.js';
import type { SourceMicroBatch } from '../../actors/scheduler/job-types.js';
import { Rng } from '../../lib/rng.js';
import { ensureModel } from './make-model.js';
import { steadyWindow, utilisation } from '../../lib/schedule/grid.js';
import { adaptersPerMessage } from '../../lib/schedule/packing.js';
import { balanceSplit } from '../../lib/schedule/split.js';
import { native } from '../../lib/native.js';
import type { StageStats } from '../../actors/rpc.js';
import { machineIdle, threadTimes, threadTimesSince, type ThreadKind, type ThreadTime } from './thread-cpu.js';
import {
  benchLoraSpec,
  cacheModels,
  gemmCeiling,
  STEP,
  syntheticMicroBatch,
  trainFlopsPerToken,
  trainInGroups,
  type TrainBenchRecord,
} from './bench-common.js';

const ONE_STAGE = '1 stage × 1 thread';

/** Micro-batches in one step of the single adapter in the A = 1 within-step pipelining run. */
const GPIPE_MICRO = 4;

export async function pipelineScenario(
  o: {
    adapters: number[];
    rank: number;
    micro: number;
    seqLen: number;
    steps: number;
    /**
     * Measurements of each layout per A, taken in turn (1 stage, then 2 stages, then again): the
     * machine's speed drifts by ±10% over seconds on shared VMs, so a ratio is taken within one
     * round and the median round is reported.
     */
    rounds?: number;
    /** Only these layouts (their `name`s); default all. */
    layouts?: string[];
    packWeights?: PackWeights;
  },
  log: (s: string) => void,
): Promise<TrainBenchRecord[]> {
  const modelDir = await ensureModel(cacheModels(), 'bench', 0, log);
  const dir = openModelDir(modelDir);
  const c = dir.config;
  const ceiling1 = await gemmCeiling(1);
  log(`GEMM ceiling (1 thread): ${ceiling1.toFixed(1)} GFLOP/s`);
  const spec = benchLoraSpec(o.rank);
  const flops = trainFlopsPerToken(c, spec, o.seqLen);
  const rounds = Math.max(1, o.rounds ?? 1);
  const out: TrainBenchRecord[] = [];
  const layouts = [
    { name: ONE_STAGE, devices: ['cpu:0'], threads: [1] },
    { name: '1 stage × 2 threads', devices: ['cpu:0'], threads: [2] },
    { name: '2 stages × 1 thread', devices: ['cpu:0', 'cpu:1'], threads: [1, 1] },
  ].filter((l) => !o.layouts || o.layouts.includes(l.name));
  const maxK = Math.max(...o.adapters);
  const rng = new Rng(2);
  const mbs = new Map<number, SourceMicroBatch>();
  for (let id = 1; id <= maxK; id++) mbs.set(id, syntheticMicroBatch(rng, c, o.micro, o.seqLen));
  // every layout's pipeline is up at once, so that the rounds can take turns
  const pipes: Array<{
    L: (typeof layouts)[number];
    plans: StagePlan[];
    p: ActorPipeline;
    versions: Map<number, number>;
  }> = [];
  try {
    for (const L of layouts) {
      // every row of the synthetic data but the last of each sequence has a target
      const plans = balanceSplit(c, L.threads, { seqLen: o.seqLen, targetFraction: (o.seqLen - 1) / o.seqLen }).plans;
      const maxTokens = Math.ceil(maxK / plans.length) * o.micro * o.seqLen;
      const p = await ActorPipeline.start({
        modelDir,
        config: c,
        plans,
        devices: L.devices,
        threads: L.threads,
        budgets: L.devices.map(() => 8 * 2 ** 30),
        maxTokens: Math.max(maxTokens, maxK * o.micro * o.seqLen),
        inflight: 2 * plans.length,
        ...(o.packWeights !== undefined ? { base: { packWeights: o.packWeights } } : {}),
      });
      pipes.push({ L, plans, p, versions: new Map() });
      for (let id = 1; id <= maxK; id++)
        await p.addAdapter(id, { ...spec, seed: id }, freshState(c, { ...spec, seed: id }));
    }
    for (const K of o.adapters) {
      const ids = Array.from({ length: K }, (_, i) => i + 1);
      // mLoRA scheduling, as the supervisor does it (lib/schedule/packing.ts): one device takes
      // every adapter in one message; a pipeline spreads them over about 2 messages per stage,
      // all in flight, each adapter stepping as soon as its own micro-batch is back (no flush)
      // while the other messages keep the stages busy
      const groupsFor = (stages: number) => {
        const perMessage = adaptersPerMessage(K, stages);
        const g: number[][] = Array.from({ length: Math.ceil(K / perMessage) }, () => []);
        ids.forEach((id, i) => g[i % g.length]!.push(id));
        return g;
      };
      const rowsPer = (g: number[][]) => Math.max(...g.map((x) => x.length)) * o.micro * o.seqLen;
      /** One go of the groups' steps: its steady rate (steadyRate) and where its time went. */
      const measure = async (pipe: (typeof pipes)[number], g: number[][]) => {
        const { p, plans, versions } = pipe;
        const tokensPerStep = K * o.micro * o.seqLen;
        const from = p.schedule().at(-1)?.end ?? 0;
        await p.stats(true);
        const cpu0 = threadTimes();
        const idle0 = machineIdle();
        const ms = await trainInGroups(p, g, mbs, o.steps + 2, versions);
        const idle1 = machineIdle();
        const idle = { idleMs: idle1.idleMs - idle0.idleMs, stealMs: idle1.stealMs - idle0.stealMs };
        const account = timeAccount(ms, await p.stats(), threadTimesSince(cpu0, threadTimes()), idle);
        return { ...steadyRate(p, from, ids, tokensPerStep, o.steps, ms, plans.length), account };
      };
      type Measured = Awaited<ReturnType<typeof measure>>;
      for (const pipe of pipes) await trainInGroups(pipe.p, groupsFor(pipe.plans.length), mbs, 1, pipe.versions);
      const runs = pipes.map(() => [] as Measured[]);
      /** Per round, 1 stage × 1 thread at the 2-stage packing (fewer rows per message than one stage packs). */
      const at2: number[] = [];
      const g2 = groupsFor(2);
      for (let r = 0; r < rounds; r++)
        for (const [i, pipe] of pipes.entries()) {
          runs[i]!.push(await measure(pipe, groupsFor(pipe.plans.length)));
          if (pipe.L.name !== ONE_STAGE) continue;
          // (A = 1) nothing to measure again
          const same = rowsPer(g2) === rowsPer(groupsFor(1));
          at2.push(same ? runs[i]!.at(-1)!.tps : (await measure(pipe, g2)).tps);
        }
      const one = pipes.findIndex((x) => x.L.name === ONE_STAGE);
      for (const [i, pipe] of pipes.entries()) {
        const L = pipe.L;
        const mine = runs[i]!;
        const { tps, u, account } = mine[medianIndex(mine.map((x) => x.tps))]!;
        const threads = L.threads.reduce((a, b) => a + b, 0);
        const rec: TrainBenchRecord = {
          scenario: 'pipeline',
          mode: L.name,
          adapters: K,
          micro_batch: o.micro,
          seq_len: o.seqLen,
          stages: pipe.plans.length,
          threads,
          tokens_per_s: Math.round(tps),
          mfu: (tps * flops) / (ceiling1 * threads * 1e9),
          gemm_ceiling_gflops: Math.round(ceiling1 * threads * 10) / 10,
          step_ms: Math.round((K * o.micro * o.seqLen * 1000) / tps),
          busy: u.busy.map((b) => Math.round(b * 1000) / 1000),
          bubble: Math.round(u.bubble * 1000) / 1000,
          time_account: account,
        };
        out.push(rec);
        const spread =
          rounds > 1 ? ` (median of ${rounds} rounds: ${mine.map((x) => Math.round(x.tps)).join(', ')})` : '';
        log(
          `pipeline ${L.name.padEnd(20)} A=${K}: ${rec.tokens_per_s} tok/s${spread}, busy ${u.busy.map((b) => `${Math.round(100 * b)}%`).join('/')}, bubble ${(100 * u.bubble).toFixed(1)}%`,
        );
        for (const line of describeAccount(account)) log(`  ${line}`);
        if (L.name === ONE_STAGE) {
          const a = median(at2);
          rec.at_two_stage_packing = { rows_per_message: rowsPer(g2), tokens_per_s: Math.round(a) };
          log(`  at the 2-stage packing (${rowsPer(g2)} rows per message): ${Math.round(a)} tok/s`);
        }
        if (pipe.plans.length === 2 && one >= 0) {
          // within each round: the same minutes of the machine's speed
          const ratios = mine.map((x, r) => x.tps / runs[one]![r]!.tps);
          const ceilings = at2.map((a, r) => (2 * a) / runs[one]![r]!.tps);
          rec.ratio_to_one_stage = Math.round(1000 * median(ratios)) / 1000;
          rec.ceiling_ratio = Math.round(1000 * median(ceilings)) / 1000;
          const each = rounds > 1 ? ` (rounds: ${ratios.map((x) => x.toFixed(2)).join(', ')})` : '';
          log(
            `  vs 1 stage × 1 thread: ${rec.ratio_to_one_stage.toFixed(2)}×${each}; ceiling at ${rowsPer(g2)} rows per message` +
              ` 2 × (1 stage at that packing) / (1 stage at its own) = ${rec.ceiling_ratio.toFixed(2)}×`,
          );
        }
        if (K === 1 && pipe.plans.length > 1) {
          const { tps: tps2, u: u2 } = await gpipeRun(pipe.p, pipe.versions, c, o, ids[0]!, pipe.plans.length);
          const { time_account: _a, ratio_to_one_stage: _r, ceiling_ratio: _c, ...plain } = rec;
          out.push({
            ...plain,
            mode: `${L.name}, ${GPIPE_MICRO} micro-batches per step`,
            tokens_per_s: Math.round(tps2),
            mfu: (tps2 * flops) / (ceiling1 * threads * 1e9),
            step_ms: Math.round((GPIPE_MICRO * o.micro * o.seqLen * 1000) / tps2),
            busy: u2.busy,
            bubble: u2.bubble,
          });
          log(
            `pipeline ${L.name.padEnd(20)} A=1, ${GPIPE_MICRO} micro-batches per step: ${Math.round(tps2)} tok/s, busy ${u2.busy.map((b) => `${Math.round(100 * b)}%`).join('/')}, bubble ${(100 * u2.bubble).toFixed(1)}%`,
          );
        }
      }
    }
  } finally {
    for (const { p } of pipes) await p.close();
  }
  return out;
}

/** The index of the median of xs (the lower one of an even count). */
function medianIndex(xs: number[]): number {
  const order = xs.map((_, i) => i).sort((a, b) => xs[a]! - xs[b]!);
  return order[Math.floor((xs.length - 1) / 2)]!;
}

function median(xs: number[]): number {
  return xs[medianIndex(xs)]!;
}

/**
 * One adapter whose step is GPIPE_MICRO micro-batches, all in flight at once (what the scheduler
 * does when the adapters are too few to fill the stages), then its step: tokens/s and utilisation
 * of the steady window.
 */
async function gpipeRun(
  p: ActorPipeline,
  versions: Map<number, number>,
  c: LlamaConfig,
  o: { micro: number; seqLen: number; steps: number },
  id: number,
  stages: number,
) {
  const from = p.schedule().at(-1)?.end ?? 0;
  const sub = syntheticMicroBatch(new Rng(3), c, o.micro, o.seqLen);
  const steps = o.steps + 2;
  let mbId = 1;
  const t0 = performance.now();
  for (let s = 0; s < steps; s++) {
    await Promise.all(
      Array.from({ length: GPIPE_MICRO }, () =>
        p.train(assemble(mbId++, [{ adapter: id, serial: s, mb: sub }], sub.numTokens)),
      ),
    );
    versions.set(id, (versions.get(id) ?? 0) + 1);
    await p.step(id, { ...STEP, step: versions.get(id)! });
  }
  const ms = performance.now() - t0;
  return steadyRate(p, from, [id], GPIPE_MICRO * o.micro * o.seqLen, o.steps, ms, stages);
}

/**
 * Tokens/s and utilisation of `steps` steps in the steady state of a go of steps + 2 that took
 * `ms` (its records start at `from`): one step before and one after them run in the same go, and
 * only the window between (steadyWindow) counts; the whole go where no window is found.
 */
function steadyRate(
  p: ActorPipeline,
  from: number,
  adapters: number[],
  tokensPerStep: number,
  steps: number,
  ms: number,
  stages: number,
) {
  const recs = p.schedule().filter((r) => r.start >= from);
  const w = steadyWindow(recs, adapters, 1, steps);
  if (!w) return { tps: (tokensPerStep * (steps + 2)) / (ms / 1000), u: utilisation(recs, stages) };
  return { tps: (tokensPerStep * steps) / ((w.to - w.from) / 1000), u: utilisation(recs, stages, w.from, w.to) };
}

/**
 * Where the run's time went, as fractions of its wall time: per stage, the time it spent on
 * messages (busy) split into its device's op lists (the compute thread on a core, or runnable but
 * waiting for one), the hand-offs to and from the compute thread, and the stage's own JavaScript
 * (the rest of busy); per kind of thread (thread-cpu.ts), its time on a CPU and waiting for one, in
 * cores (1 = one core for the whole run); and the cores' time that no thread of this process used:
 * idle, given to other guests by the hypervisor (steal), or used by other processes (the rest).
 */
export interface TimeAccount {
  wall_ms: number;
  stages: Array<{
    busy: number;
    compute: number;
    preempted: number;
    handoff: number;
    js: number;
    messages: number;
    js_ms_per_message: number;
  }>;
  threads: Partial<Record<ThreadKind, { run: number; wait: number }>>;
  unused_cores: number;
  idle_cores: number;
  steal_cores: number;
}

function timeAccount(
  wallMs: number,
  stats: StageStats[],
  threads: Map<ThreadKind, ThreadTime>,
  machine: { idleMs: number; stealMs: number },
): TimeAccount {
  const f = (ms: number) => Math.round((1000 * ms) / wallMs) / 1000;
  const stages = stats.map((s) => {
    const inRuns = s.toLeaderMs + s.wallMs + s.backMs;
    return {
      busy: f(s.busyMs),
      compute: f(s.cpuMs),
      preempted: f(s.wallMs - s.cpuMs),
      handoff: f(s.toLeaderMs + s.backMs),
      js: f(s.busyMs - inRuns),
      messages: s.messages,
      js_ms_per_message: Math.round((100 * (s.busyMs - inRuns)) / Math.max(1, s.messages)) / 100,
    };
  });
  const out: TimeAccount['threads'] = {};
  let used = 0;
  for (const [k, t] of threads) {
    out[k] = { run: f(t.runMs), wait: f(t.waitMs) };
    used += t.runMs;
  }
  const cores = native().info().cpu.allowedCores.length;
  return {
    wall_ms: Math.round(wallMs),
    stages,
    threads: out,
    unused_cores: f(cores * wallMs - used),
    idle_cores: f(machine.idleMs),
    steal_cores: f(machine.stealMs),
  };
}

function describeAccount(a: TimeAccount): string[] {
  const pc = (x: number) => `${(100 * x).toFixed(1)}%`;
  const lines = a.stages.map(
    (s, i) =>
      `stage ${i}: busy ${pc(s.busy)} of wall = op lists on a core ${pc(s.compute)} + waiting for a core ${pc(s.preempted)}` +
      ` + hand-offs ${pc(s.handoff)} + stage JS ${pc(s.js)} (${s.js_ms_per_message} ms × ${s.messages} messages)`,
  );
  const kinds = Object.entries(a.threads).map(([k, t]) => `${k} ${t.run.toFixed(2)} (waited ${t.wait.toFixed(2)})`);
  lines.push(
    `cores used by: ${kinds.join(', ')}; not by this process ${a.unused_cores.toFixed(2)}` +
      ` (idle ${a.idle_cores.toFixed(2)}, stolen by the hypervisor ${a.steal_cores.toFixed(2)}, the rest other processes)`,
  );
  return lines;
}
