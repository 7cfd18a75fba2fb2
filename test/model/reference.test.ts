// The whole model against two independent references:
//  1. test/fixtures/llama-tiny: float64 numbers from a separate PyTorch LLaMA + PEFT LoRA
//     implementation (loss, logits, every LoRA gradient);
//  2. a float64 LLaMA + LoRA forward written here, in plain JavaScript, used for the loss of a
//     packed batch and for finite-difference checks of LoRA gradients.
import t from 'tap';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { openModelDir } from '../../lib/io/hf-model.js';
import { loadAdapter } from '../../lib/io/peft.js';
import { openSafetensors } from '../../lib/io/safetensors.js';
import { loadStageWeights } from '../../lib/model/weights.js';
import { StageProgram, type MicroBatch, type StageOptions } from '../../lib/model/stage.js';
import { fromAdapterWeights, toPeftTensors } from '../../lib/lora/state.js';
import type { LoraSpec } from '../../lib/lora/adapter.js';
import { LORA_TARGETS, type LlamaConfig, type LoraTarget } from '../../lib/model/config.js';
import { assemble } from '../../actors/supervisor.js';
import { first4, fixtureBatch as packFixture, setupFixture } from './fixture.js';
import { cpuDevice, assertClose } from '../support/helpers.js';
import { readFileSync } from 'node:fs';

const here = path.dirname(fileURLToPath(import.meta.url));
const fixtures = path.resolve(here, '../../../test/fixtures/llama-tiny');

interface Ref {
  input_ids: number[][];
  labels: number[][];
  loss: number;
  logits_first4: number[][][];
}
const ref = JSON.parse(readFileSync(path.join(fixtures, 'ref.json'), 'utf8')) as Ref;

const setup = (threads = 1, options: StageOptions = {}) => setupFixture(path.join(fixtures, 'model'), path.join(fixtures, 'adapter'), threads, options);

/** The fixture batch (2 rows of 24 tokens) packed as two sequences of one adapter. */
function fixtureBatch(program: StageProgram) {
  return packFixture(program, ref.input_ids, ref.labels);
}

t.test('loss, logits and every LoRA gradient match the independent float64 implementation', async (t) => {
  const { config, program, spec } = await setup();
  const { mb, tokens, count } = fixtureBatch(program);
  const { got, want } = first4(await program.logits(mb, tokens), ref, config.vocabSize);
  // f32 vs f64: that implementation's own f32 run is 7e-7 away; our kernels sum in other orders
  assertClose(t, got, want, { atol: 2e-5, rtol: 1e-4 }, 'logits of the first 4 positions');
  const losses = await program.trainLast(mb, tokens);
  const loss = losses.reduce((a, b) => a + b, 0) / count;
  assertClose(t, [loss], [ref.loss], { atol: 1e-6, rtol: 2e-6 }, 'loss');
  const grads = toPeftTensors(config, spec, (program.adapter(1).grads.read() as Float32Array));
  const refGrads = openSafetensors(path.join(fixtures, 'grads.safetensors'));
  let n = 0;
  for (const [name, g] of grads) {
    const w = refGrads.read(name) as Float64Array;
    let scale = 0;
    for (const x of w) scale = Math.max(scale, Math.abs(x));
    // relative to the tensor's largest gradient: elements near zero carry only rounding noise
    assertClose(t, g.data, w, { atol: 2e-5 * scale, rtol: 1e-4 }, name);
    n++;
  }
  t.equal(n, config.numLayers * LORA_TARGETS.length * 2, 'every LoRA tensor compared');
  program.free();
});

t.test('the LM head on the targeted rows only (gathered) equals the head on every row, bitwise', async (t) => {
  const gather = await setup(1, { headBlockRows: 16 });
  const every = await setup(1, { headBlockRows: 16, gatherTargets: false });
  const { mb, tokens } = fixtureBatch(gather.program);
  const { mb: mbE, tokens: tokensE } = fixtureBatch(every.program);
  const labels = mb.tensors.targets!.read() as Int32Array;
  const N = labels.length;
  // the fixture's own labels (prompt rows masked), every row targeted, none, and a random third
  const masks: Array<[string, (i: number) => boolean]> = [
    ['fixture labels', () => true], ['no target at all', () => false], ['every row', () => true], ['a random third', (i) => (i * 2654435761) % 3 === 0],
  ];
  for (const [what, keep] of masks) {
    const lab = labels.map((l, i) => (what === 'every row' ? (l >= 0 ? l : i % 50) : keep(i) ? l : -100));
    mb.tensors.targets!.write(lab);
    mbE.tensors.targets!.write(lab);
    const gl = await gather.program.trainLast(mb, tokens);
    const el = await every.program.trainLast(mbE, tokensE);
    t.same(Array.from(gl), Array.from(el), `${what} (${lab.filter((l) => l >= 0).length}/${N} rows targeted): per-row losses`);
    const gg = gather.program.adapter(1).grads.read() as Float32Array;
    const eg = every.program.adapter(1).grads.read() as Float32Array;
    let diff = -1;
    for (let i = 0; i < gg.length && diff < 0; i++) if (!Object.is(gg[i], eg[i]) && !(gg[i] === 0 && eg[i] === 0)) diff = i;
    t.equal(diff, -1, `${what}: LoRA gradients`);
    t.same(Array.from((await gather.program.evaluate(mb, tokens))!), Array.from((await every.program.evaluate(mbE, tokensE))!), `${what}: evaluation losses`);
    await gather.program.zeroGrads(1);
    await every.program.zeroGrads(1);
  }
  gather.program.free();
  every.program.free();
});

// ---- an independent float64 forward, for packed batches and finite differences

function f64Forward(c: LlamaConfig, W: (n: string) => Float64Array, lora: Map<string, { a: Float64Array; b: Float64Array }>, scale: number, ids: number[], seqs: number[][], targets: number[]): number {
  const H = c.hiddenSize, d = c.headDim, hq = c.numHeads, hkv = c.numKvHeads, I = c.intermediateSize;
  const N = ids.length;
  const mat = (x: Float64Array, w: Float64Array, rows: number, inD: number, outD: number) => {
    const y = new Float64Array(rows * outD);
    for (let r = 0; r < rows; r++) for (let o = 0; o < outD; o++) {
      let s = 0;
      for (let i = 0; i < inD; i++) s += x[r * inD + i]! * w[o * inD + i]!;
      y[r * outD + o] = s;
    }
    return y;
  };
  const proj = (x: Float64Array, layer: number, t: LoraTarget, inD: number, outD: number) => {
    const mod = ['gate_proj', 'up_proj', 'down_proj'].includes(t) ? 'mlp' : 'self_attn';
    const y = mat(x, W(`model.layers.${layer}.${mod}.${t}.weight`), N, inD, outD);
    const l = lora.get(`${layer}.${t}`);
    if (l) {
      const r = l.a.length / inD;
      const xa = mat(x, l.a, N, inD, r);
      const d2 = mat(xa, l.b, N, r, outD);
      for (let i = 0; i < y.length; i++) y[i]! += scale * d2[i]!;
    }
    return y;
  };
  const norm = (x: Float64Array, w: Float64Array) => {
    const y = new Float64Array(x.length);
    for (let r = 0; r < N; r++) {
      let ss = 0;
      for (let i = 0; i < H; i++) ss += x[r * H + i]! ** 2;
      const rs = 1 / Math.sqrt(ss / H + c.rmsNormEps);
      for (let i = 0; i < H; i++) y[r * H + i] = x[r * H + i]! * rs * w[i]!;
    }
    return y;
  };
  const pos = new Array<number>(N);
  const seqOf = new Array<number>(N);
  seqs.forEach(([b, e], s) => { for (let i = b!; i < e!; i++) { pos[i] = i - b!; seqOf[i] = s; } });
  const rope = (x: Float64Array, heads: number) => {
    for (let r = 0; r < N; r++) for (let h = 0; h < heads; h++) for (let i = 0; i < d / 2; i++) {
      const f = pos[r]! / Math.pow(c.ropeTheta, (2 * i) / d);
      const o = (r * heads + h) * d;
      const a = x[o + i]!, b = x[o + i + d / 2]!;
      x[o + i] = a * Math.cos(f) - b * Math.sin(f);
      x[o + i + d / 2] = b * Math.cos(f) + a * Math.sin(f);
    }
  };
  const emb = W('model.embed_tokens.weight');
  let x = new Float64Array(N * H);
  ids.forEach((id, r) => x.set(emb.subarray(id * H, (id + 1) * H), r * H));
  for (let l = 0; l < c.numLayers; l++) {
    const xn = norm(x, W(`model.layers.${l}.input_layernorm.weight`));
    const q = proj(xn, l, 'q_proj', H, hq * d), k = proj(xn, l, 'k_proj', H, hkv * d), v = proj(xn, l, 'v_proj', H, hkv * d);
    rope(q, hq);
    rope(k, hkv);
    const ao = new Float64Array(N * hq * d);
    for (let r = 0; r < N; r++) for (let h = 0; h < hq; h++) {
      const kh = Math.floor(h / (hq / hkv));
      const js: number[] = [];
      for (let j = 0; j <= r; j++) if (seqOf[j] === seqOf[r]) js.push(j);
      const sc = js.map((j) => { let s = 0; for (let i = 0; i < d; i++) s += q[(r * hq + h) * d + i]! * k[(j * hkv + kh) * d + i]!; return s / Math.sqrt(d); });
      const m = Math.max(...sc);
      const p = sc.map((s) => Math.exp(s - m));
      const z = p.reduce((a, b) => a + b, 0);
      js.forEach((j, n) => { for (let i = 0; i < d; i++) ao[(r * hq + h) * d + i]! += (p[n]! / z) * v[(j * hkv + kh) * d + i]!; });
    }
    const o = proj(ao, l, 'o_proj', hq * d, H);
    const hmid = x.map((xv, i) => xv + o[i]!);
    const xn2 = norm(hmid, W(`model.layers.${l}.post_attention_layernorm.weight`));
    const g = proj(xn2, l, 'gate_proj', H, I), u = proj(xn2, l, 'up_proj', H, I);
    const act = g.map((gv, i) => (gv / (1 + Math.exp(-gv))) * u[i]!);
    const dn = proj(act, l, 'down_proj', I, H);
    x = hmid.map((hv, i) => hv + dn[i]!);
  }
  const xf = norm(x, W('model.norm.weight'));
  const logits = mat(xf, W('lm_head.weight'), N, H, c.vocabSize);
  let sum = 0, cnt = 0;
  for (let r = 0; r < N; r++) {
    if (targets[r]! < 0) continue;
    const row = logits.subarray(r * c.vocabSize, (r + 1) * c.vocabSize);
    const m = Math.max(...row);
    const lse = m + Math.log(row.reduce((a, b) => a + Math.exp(b - m), 0));
    sum += lse - row[targets[r]!]!;
    cnt++;
  }
  return sum / cnt;
}

t.test('packed variable-length batch: loss and LoRA gradients vs the float64 JS model (finite differences)', async (t) => {
  const { config, dir, program, spec, flat } = await setup(2);
  const W = (n: string) => Float64Array.from(dir.readF32(n));
  // three sequences of different lengths in one packed micro-batch
  const lens = [9, 5, 14];
  const ids: number[] = [];
  const labels: number[] = [];
  let s = 11;
  for (const L of lens) for (let i = 0; i < L; i++) { s = (s * 1103515245 + 12345) % 2147483648; ids.push(s % config.vocabSize); labels.push(i < 2 ? -100 : s % config.vocabSize); }
  const N = ids.length;
  const cu = [0];
  for (const L of lens) cu.push(cu[cu.length - 1]! + L);
  const positions = lens.flatMap((L) => [...Array(L).keys()]);
  const count = lens.reduce((a, L) => a + Math.max(0, L - 2), 0);
  const data = assemble(3, [{ adapter: 1, serial: 0, mb: {
    step: 0, microIndex: 0, microCount: 1, inputIds: Int32Array.from(ids), labels: Int32Array.from(labels), cuSeqlens: Int32Array.from(cu),
    positions: Int32Array.from(positions), numTokens: N, numTargetTokens: count, stepTargetTokens: count, lastOfStep: true,
  } }], N);
  const d = program.device;
  const mb: MicroBatch = { id: 3, numTokens: N, segments: data.segments, tensors: {
    positions: d.fromArray('i32', [N], data.positions), cuSeqlens: d.fromArray('i32', [cu.length], data.cuSeqlens),
    targets: d.fromArray('i32', [N], data.targets), weights: d.fromArray('f32', [N], data.weights),
  } };
  const tokens = d.fromArray('i32', [N], data.tokens);
  const losses = await program.trainLast(mb, tokens);
  const loss = losses.reduce((a, b) => a + b, 0) / count;
  const peft = toPeftTensors(config, spec, Float64Array.from(flat) as unknown as Float32Array);
  const loraOf = (vals: Float64Array) => {
    const m = new Map<string, { a: Float64Array; b: Float64Array }>();
    const views = toPeftTensors(config, spec, vals as unknown as Float32Array);
    for (const [name] of peft) {
      const mm = /layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_([AB])/.exec(name)!;
      const key = `${mm[1]}.${mm[2]}`;
      const e = m.get(key) ?? { a: new Float64Array(), b: new Float64Array() };
      if (mm[3] === 'A') e.a = views.get(name)!.data as unknown as Float64Array;
      else e.b = views.get(name)!.data as unknown as Float64Array;
      m.set(key, e);
    }
    return m;
  };
  const base = Float64Array.from(flat);
  const f = (vals: Float64Array) => f64Forward(config, W, loraOf(vals), spec.alpha / spec.r, ids, cu.slice(0, -1).map((b, i) => [b, cu[i + 1]!]), Array.from(data.targets));
  const refLoss = f(base);
  assertClose(t, [loss], [refLoss], { atol: 1e-6, rtol: 5e-6 }, 'packed batch loss vs the float64 JS model');
  const grads = program.adapter(1).grads.read() as Float32Array;
  // central differences on a spread of parameters (A and B of several modules and layers)
  const picks = [0, 17, 301, 1200, 2500, 4000, 6100, base.length - 1].filter((i) => i < base.length);
  const h = 1e-4;
  const fd: number[] = [];
  for (const i of picks) {
    const p = base.slice(); p[i]! += h;
    const m = base.slice(); m[i]! -= h;
    fd.push((f(p) - f(m)) / (2 * h));
  }
  assertClose(t, picks.map((i) => grads[i]!), fd, { atol: 2e-5, rtol: 2e-3 }, 'LoRA gradients vs central differences of the float64 model');
  program.free();
});
