// A pipeline whose stages run in this thread, one after another. It is the single-device
// trainer (one stage that is first and last) and the reference the actor pipeline is tested
// against: the same StageProgram code, without workers or shared memory.
import type { Tensor, Device } from '../lib/tensor.js';
import type { LoraSpec } from '../lib/lora/adapter.js';
import { allocBytes, StageAdapter } from '../lib/lora/adapter.js';
import type { LlamaConfig } from '../lib/model/config.js';
import { StageProgram, type MicroBatch, type StagePlan } from '../lib/model/stage.js';
import type { Pipeline } from './pipeline.js';
import type { AdapterState, StepParams } from '../lib/lora/state.js';
import type { MicroBatchData, SegmentSpec } from '../lib/model/batch.js';
import type { ScheduleRecord } from '../lib/schedule/record.js';
import { joinSlices } from '../lib/lora/state.js';

export class LocalPipeline implements Pipeline {
  readonly plans: StagePlan[];
  readonly devices: string[];
  readonly maxTokens = Number.POSITIVE_INFINITY;
  private readonly records: ScheduleRecord[] = [];
  private readonly t0 = performance.now();

  constructor(
    readonly config: LlamaConfig,
    readonly stages: StageProgram[],
  ) {
    this.plans = stages.map((s) => s.plan);
    this.devices = stages.map((s) => s.device.name);
  }

  private record(stage: number, kind: ScheduleRecord['kind'], mb: MicroBatchData, start: number) {
    this.records.push({
      stage,
      kind,
      mb: mb.id,
      adapters: mb.segments.map((s) => s.adapter),
      start: start - this.t0,
      end: performance.now() - this.t0,
    });
  }

  async addAdapter(id: number, spec: LoraSpec, state: AdapterState): Promise<void> {
    for (const st of this.stages) st.addAdapterState(id, spec, state);
  }

  async removeAdapter(id: number): Promise<void> {
    for (const st of this.stages) st.removeAdapter(id);
  }

  async exportAdapter(id: number): Promise<AdapterState> {
    return joinSlices(this.stages.map((st) => st.adapter(id).exportState()));
  }

  private tensorsFor(st: StageProgram, mb: MicroBatchData, withTargets: boolean) {
    const d = st.device;
    const N = mb.tokens.length;
    const t: MicroBatch['tensors'] = {
      positions: d.fromArray('i32', [N], mb.positions),
      cuSeqlens: d.fromArray('i32', [mb.cuSeqlens.length], mb.cuSeqlens),
    };
    if (withTargets) {
      t.targets = d.fromArray('i32', [N], mb.targets);
      t.weights = d.fromArray('f32', [N], mb.weights);
    }
    return t;
  }

  /** The micro-batch as each stage's program takes it (its tensors on that stage's device). */
  private messages(mb: MicroBatchData): MicroBatch[] {
    return this.stages.map((st) => ({
      id: mb.id,
      numTokens: mb.tokens.length,
      segments: mb.segments,
      tensors: this.tensorsFor(st, mb, st.plan.last),
    }));
  }

  private static freeAll(ts: Array<Tensor | undefined>) {
    for (const t of ts) t?.free();
  }

  async train(mb: MicroBatchData): Promise<Float32Array> {
    const N = mb.tokens.length;
    const H = this.config.hiddenSize;
    const S = this.stages.length;
    const mbs = this.messages(mb);
    const inputs: Tensor[] = [];
    try {
      let input: Tensor = this.stages[0]!.device.fromArray('i32', [N], mb.tokens);
      for (let s = 0; s < S - 1; s++) {
        inputs.push(input);
        const st = this.stages[s]!;
        const out = st.device.alloc('f32', [N, H], { zero: false });
        const t = performance.now();
        await st.forward(mbs[s]!, input, out);
        this.record(s, 'F', mb, t);
        input = moveTo(out, this.stages[s + 1]!.device);
      }
      inputs.push(input);
      const last = this.stages[S - 1]!;
      let grad: Tensor | undefined = S > 1 ? last.device.alloc('f32', [N, H], { zero: false }) : undefined;
      let t = performance.now();
      const losses = await last.trainLast(mbs[S - 1]!, input, grad);
      this.record(S - 1, 'F', mb, t);
      for (let s = S - 2; s >= 0; s--) {
        grad = moveTo(grad!, this.stages[s]!.device);
        t = performance.now();
        await this.stages[s]!.backward(mbs[s]!, grad);
        this.record(s, 'B', mb, t);
      }
      grad?.free();
      return losses;
    } catch (e) {
      for (const st of this.stages) st.drop(mb.id);
      throw e;
    } finally {
      LocalPipeline.freeAll(inputs);
      for (const m of mbs) LocalPipeline.freeAll(Object.values(m.tensors));
    }
  }

  async evaluate(mb: MicroBatchData): Promise<Float32Array> {
    const N = mb.tokens.length;
    const H = this.config.hiddenSize;
    let input: Tensor = this.stages[0]!.device.fromArray('i32', [N], mb.tokens);
    const mbs = this.messages(mb);
    try {
      for (let s = 0; s < this.stages.length; s++) {
        const st = this.stages[s]!;
        if (st.plan.last) return (await st.evaluate(mbs[s]!, input))!;
        const out = st.device.alloc('f32', [N, H], { zero: false });
        await st.evaluate(mbs[s]!, input, out);
        input.free();
        input = moveTo(out, this.stages[s + 1]!.device);
      }
      throw new Error('evaluate: the pipeline has no last stage');
    } finally {
      input.free();
      for (const m of mbs) LocalPipeline.freeAll(Object.values(m.tensors));
    }
  }

  async gradSumsq(id: number): Promise<number> {
    let s = 0;
    for (const st of this.stages) s += await st.gradSumsq(id);
    return s;
  }

  async step(id: number, p: StepParams, measure = false): Promise<{ sumsq?: number }> {
    let sumsq = 0;
    for (const st of this.stages) sumsq += (await st.step(id, p, measure)) ?? 0;
    return measure ? { sumsq } : {};
  }

  async poison(id: number): Promise<void> {
    const a = this.stages[0]!.adapter(id);
    a.params.write(new Float32Array(a.params.shape[0]!).fill(NaN));
  }

  async memory() {
    return this.stages.map((st) => {
      const m = st.device.memory();
      return { device: st.device.name, budget: m.budget, used: m.used, peak: m.peak };
    });
  }

  /**
   * Bytes a micro-batch holds on each stage's device while in flight, as its allocator counts
   * them: the saved activations, the scratch (see StageProgram.scratchBytes), and the tensors
   * train() makes for the message: positions, cuSeqlens (nseq + 1; without numSeqs, at most
   * numTokens sequences), token ids (first stage), targets, weights and losses (last stage), and
   * the [N, H] hidden states and gradients passed between stages.
   */
  activationBytes(numTokens: number, segments: SegmentSpec[], numSeqs = numTokens): number[] {
    const N = numTokens;
    const i32 = allocBytes(4 * N);
    const hidden = allocBytes(4 * N * this.config.hiddenSize);
    return this.stages.map((st) => {
      let msg = i32 + allocBytes(4 * (numSeqs + 1)); // positions, cuSeqlens
      if (st.plan.first)
        msg += i32; // token ids
      else msg += 2 * hidden; // input hidden states, and the gradient handed back
      if (!st.plan.last) msg += hidden; // output hidden states (until moved to the next stage)
      if (st.plan.last) msg += 3 * i32; // targets, weights, losses
      return st.activationBytes(N, segments) + st.scratchBytes(N) + st.workBytes(N, segments) + msg;
    });
  }

  adapterBytes(spec: LoraSpec): number[] {
    return this.stages.map((st) => StageAdapter.bytes(this.config, spec, st.plan.lo, st.plan.hi));
  }

  schedule(): ScheduleRecord[] {
    return this.records.slice();
  }

  async close(): Promise<void> {
    for (const st of this.stages) st.free();
  }
}

/** The same tensor on another device (a copy when the devices differ). */
function moveTo(t: Tensor, d: Device): Tensor {
  if (t.device === d.name) return t;
  const out = d.fromArray(t.dtype, t.shape, t.read());
  t.free();
  return out;
}
