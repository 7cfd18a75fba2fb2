// Learning-rate schedules, gradient clipping, AdamW and the
// train_on_inputs loss mask, each against values computed by hand in this file (float64), not
// by the code under test.
import t from 'tap';
import fs from 'node:fs';
import { Supervisor } from '../../actors/index.js';
import type { LocalPipeline } from '../../actors/local.js';
import { parseAdapterConfig, type AdapterConfigInput } from '../../lib/config.js';
import { lrAt } from '../../lib/lora/schedule.js';
import { openModelDir } from '../../lib/io/hf-model.js';
import { loadStageWeights } from '../../lib/model/weights.js';
import { StageProgram } from '../../lib/model/stage.js';
import { loadTokenizer } from '../../lib/data/tokenizer.js';
import type { JobEvent } from '../../actors/protocol.js';
import type { StepParams } from '../../lib/lora/state.js';
import { cpuDevice } from '../support/helpers.js';
import { collect, RUN_DEFAULTS, run } from './util.js';
import { tinyModel } from '../support/models.js';
import { demoData, tmpDir } from '../support/files.js';

// HF get_{constant,linear,cosine}_schedule_with_warmup, base 1e-3, warmup 2, 6 steps:
// step t (0-based) uses base·λ(t); warmup λ = t/2; after it, progress p = (t−2)/4 and
// linear λ = 1 − p, cosine λ = ½(1 + cos πp).
const c45 = 0.5 * (1 + Math.SQRT1_2); // cos(π/4) = √½
const HAND = {
  constant: [0, 0.5, 1, 1, 1, 1],
  linear: [0, 0.5, 1, 0.75, 0.5, 0.25],
  cosine: [0, 0.5, 1, c45, 0.5, 1 - c45],
} as const;

const rclose = (a: number, b: number, rtol: number) =>
  Math.abs(a - b) <= rtol * Math.max(Math.abs(a), Math.abs(b), 1e-300);

t.test('lrAt: constant / linear / cosine with warmup, by hand', async (t) => {
  for (const [type, lam] of Object.entries(HAND)) {
    const got = lam.map((_, s) => lrAt(1e-3, { type: type as keyof typeof HAND, warmup_steps: 2 }, s, 6));
    t.ok(
      got.every((g, i) => rclose(g, 1e-3 * lam[i]!, 1e-12)),
      `${type}: ${got.map((g) => g.toPrecision(6)).join(' ')}`,
    );
  }
  // no warmup: the first step uses the full lr; cosine reaches ~0 at the end, never below 0
  t.equal(lrAt(2e-4, { type: 'constant', warmup_steps: 0 }, 0, 10), 2e-4);
  t.ok(rclose(lrAt(2e-4, { type: 'cosine', warmup_steps: 0 }, 5, 10), 1e-4, 1e-12), 'cosine half way = base/2');
  t.ok(rclose(lrAt(2e-4, { type: 'linear', warmup_steps: 0 }, 9, 10), 2e-5, 1e-12), 'linear last step = base/10');
});

t.test('step events, clipping and AdamW (PyTorch semantics) vs hand-computed updates', async (t) => {
  const model = await tinyModel();
  const dir = tmpDir(t);
  const common = { seq_len: 256, batch_size: 2, micro_batch_size: 1, shuffle: false, max_steps: 6 };
  const adapters: AdapterConfigInput[] = [
    {
      ...common,
      name: 'constant',
      data: demoData(dir, 'arithmetic', 12),
      seed: 1,
      lora: { r: 2, alpha: 4, dropout: 0, targets: ['q_proj', 'v_proj'] },
      // a small max_grad_norm (clipping at every step) and an eps that does not vanish next to
      // |g|, so the clip shows in the update (with eps ≪ |g| Adam's update ignores the scale)
      optimizer: { lr: 1e-3, betas: [0.8, 0.9], eps: 1e-3, weight_decay: 0.1 },
      schedule: { type: 'constant', warmup_steps: 2 },
      max_grad_norm: 0.02,
    },
    {
      ...common,
      name: 'linear',
      data: demoData(dir, 'capitals', 12),
      seed: 2,
      lora: { r: 4, alpha: 8, dropout: 0.1, targets: ['o_proj', 'up_proj'] },
      optimizer: { lr: 1e-3, weight_decay: 0 },
      schedule: { type: 'linear', warmup_steps: 2 },
    },
    {
      ...common,
      name: 'cosine',
      data: demoData(dir, 'reverse', 12),
      seed: 3,
      lora: { r: 3, alpha: 3, dropout: 0, targets: ['k_proj'] },
      optimizer: { lr: 1e-3 },
      schedule: { type: 'cosine', warmup_steps: 2 },
      max_grad_norm: 1e6,
    },
  ];
  const events: JobEvent[] = [];
  const sup = await Supervisor.start({ ...RUN_DEFAULTS, model, onEvent: (e) => events.push(e) });
  // read each adapter's gradient, weights and moments around every optimizer step
  const lp = sup.pipeline as LocalPipeline;
  const step = lp.step.bind(lp);
  const seen = new Map<
    number,
    Array<{ p: StepParams; g: Float32Array; before: Float32Array[]; after: Float32Array[] }>
  >();
  const read = (id: number) => {
    const a = lp.stages[0]!.adapter(id);
    return [a.params, a.m, a.v].map((x) => x.read() as Float32Array);
  };
  lp.step = async (id, p, measure) => {
    const g = lp.stages[0]!.adapter(id).grads.read() as Float32Array;
    const before = read(id);
    const r = await step(id, p, measure);
    if (!seen.has(id)) seen.set(id, []);
    seen.get(id)!.push({ p, g, before, after: read(id) });
    return r;
  };
  const jobs = adapters.map((a) => sup.submit(parseAdapterConfig(a)));
  await sup.drain();
  await sup.close();
  const { steps, errors } = collect(events);
  t.same(errors, []);

  const worst = { torch: { p: 0, mv: 0 } };
  for (const [k, job] of jobs.entries()) {
    const cfg = parseAdapterConfig(adapters[k]);
    const lam = HAND[cfg.schedule.type];
    const ev = steps.get(job.name)!;
    const rec = seen.get(job.id)!;
    t.equal(ev.length, 6, `${job.name}: 6 steps`);
    t.equal(rec.length, 6);
    t.ok(
      ev.every((e, i) => rclose(e.lr, 1e-3 * lam[i]!, 1e-12)),
      `${job.name}: step events' lr ${ev.map((e) => e.lr.toPrecision(4)).join(' ')} = hand values`,
    );
    for (let i = 0; i < rec.length; i++) {
      const { p, g, before, after } = rec[i]!;
      let ss = 0;
      for (const x of g) ss += x * x;
      const norm = Math.sqrt(ss);
      // the gradient norm reported is the one of the gradient the optimizer got (f32 sumsq)
      if (!rclose(ev[i]!.gradNorm, norm, 1e-5))
        t.fail(`${job.name} step ${i + 1}: gradNorm ${ev[i]!.gradNorm}, hand ${norm}`);
      // torch.nn.utils.clip_grad_norm_: coef = max_norm / (norm + 1e-6), clamped to 1
      const scale = cfg.max_grad_norm !== undefined ? Math.min(1, cfg.max_grad_norm / (norm + 1e-6)) : 1;
      if (!rclose(p.gradScale, scale, 1e-5))
        t.fail(`${job.name} step ${i + 1}: gradScale ${p.gradScale}, hand ${scale}`);
      if (job.name === 'constant' && !(scale < 0.5)) t.fail(`constant: clipping should be active (scale ${scale})`);
      if (job.name === 'cosine' && scale !== 1) t.fail(`cosine: a huge max_grad_norm must not clip (scale ${scale})`);
      // torch.optim.AdamW, step t = i + 1, in float64 from the f32 state read back, with PyTorch's
      // double β (the kernel takes its hyper-parameters in double and forms 1 − β before rounding
      // to f32, as PyTorch does). The f32-β variant must now be visibly off: the check has teeth.
      const lr = 1e-3 * lam[i]!;
      const { eps, weight_decay: wd } = cfg.optimizer;
      const tt = i + 1;
      const [p0, m0, v0] = before as [Float32Array, Float32Array, Float32Array];
      const [p1, m1, v1] = after as [Float32Array, Float32Array, Float32Array];
      let moved = 0;
      for (const [which, [b1, b2]] of [['torch', cfg.optimizer.betas]] as const) {
        const rtol = 1e-6;
        const bc1 = 1 - b1 ** tt,
          bc2 = 1 - b2 ** tt;
        let dp = 0,
          dmv = 0;
        for (let j = 0; j < p0.length; j++) {
          const gs = g[j]! * scale;
          const m = b1 * m0[j]! + (1 - b1) * gs;
          const v = b2 * v0[j]! + (1 - b2) * gs * gs;
          const want = p0[j]! * (1 - lr * wd) - ((lr / bc1) * m) / (Math.sqrt(v) / Math.sqrt(bc2) + eps);
          // tolerances relative to the size of the terms (m can cancel to ~0)
          // param: f32 rounding of p (1e-6·|p|) plus the relative error of the update itself
          dp = Math.max(dp, Math.abs(p1[j]! - want) / (1e-9 + 1e-6 * Math.abs(want) + rtol * Math.abs(want - p0[j]!)));
          const mScale = b1 * Math.abs(m0[j]!) + (1 - b1) * Math.abs(gs);
          dmv = Math.max(
            dmv,
            Math.abs(m1[j]! - m) / (1e-30 + rtol * mScale),
            Math.abs(v1[j]! - v) / (1e-30 + rtol * v),
          );
          moved = Math.max(moved, Math.abs(want - p0[j]!));
        }
        worst[which].p = Math.max(worst[which].p, dp);
        worst[which].mv = Math.max(worst[which].mv, dmv);
        if (dp > 1 || dmv > 1)
          t.fail(
            `${job.name} step ${i + 1}: AdamW off the ${which}-β hand update (param ${dp.toFixed(2)}, moments ${dmv.toFixed(2)} × tolerance)`,
          );
      }
      if (i >= 1 && !(moved > 1e-6)) t.fail(`${job.name} step ${i + 1}: the hand update moves nothing (${moved})`);
      const [b1, b2] = cfg.optimizer.betas as [number, number];
      const bc1 = 1 - b1 ** tt,
        bc2 = 1 - b2 ** tt;
      if (job.name === 'constant' && i >= 1) {
        // without the clip the update would be visibly different: the check has teeth
        let d = 0;
        for (let j = 0; j < p0.length; j++) {
          const m = b1 * m0[j]! + (1 - b1) * g[j]!;
          const v = b2 * v0[j]! + (1 - b2) * g[j]! * g[j]!;
          d = Math.max(
            d,
            Math.abs(p0[j]! * (1 - lr * wd) - ((lr / bc1) * m) / (Math.sqrt(v) / Math.sqrt(bc2) + eps) - p1[j]!),
          );
        }
        if (!(d > 1e-6)) t.fail(`constant step ${i + 1}: unclipped update indistinguishable (${d})`);
      }
    }
  }
  for (const [which, tol] of [['torch', '1e-6']] as const) {
    t.ok(
      worst[which].p <= 1 && worst[which].mv <= 1,
      `AdamW (${which} β) params within 1e-9 + 1e-6·|p| + ${tol}·|update|, moments within ${tol} relative of the hand update: worst ${worst[which].p.toFixed(3)} / ${worst[which].mv.toFixed(3)} of it`,
    );
  }
});

t.test('train_on_inputs: step-1 loss = hand-computed mean NLL over response (or all) tokens', async (t) => {
  // At step 1 B = 0, so the model is the base model. The hand loss: build each example as
  // [BOS] + encode(prompt) + encode(output) + [EOS], take float64 log-softmax of the base
  // model's logits, and average −log p(next token) over the predicted tokens: those of the
  // response and EOS (train_on_inputs false) or every token after the first (true).
  const model = await tinyModel();
  const dir = tmpDir(t);
  const data = demoData(dir, 'arithmetic', 4);
  const records = fs
    .readFileSync(data, 'utf8')
    .trim()
    .split('\n')
    .map((l) => JSON.parse(l) as { instruction: string; output: string });
  const tok = loadTokenizer(model);
  const mdir = openModelDir(model);
  const config = mdir.config;
  const device = cpuDevice(1);
  const plan = { lo: 0, hi: config.numLayers, first: true, last: true };
  const program = new StageProgram(device, config, plan, await loadStageWeights(device, mdir, plan));
  t.teardown(() => program.free());
  const hand = { false: [0, 0], true: [0, 0] }; // [Σ nll, count]
  for (const r of records) {
    const prompt =
      'Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n' +
      `### Instruction:\n${r.instruction}\n\n### Response:\n`;
    const p = tok.encode(prompt),
      o = tok.encode(r.output);
    const ids = [...(tok.addBos ? [tok.bosId!] : []), ...p, ...o, tok.eosId!];
    const firstTarget = ids.length - o.length - 1; // index of the first response token
    const N = ids.length;
    const logits = await program.logits(
      {
        id: 1,
        numTokens: N,
        segments: [],
        tensors: {
          positions: device.fromArray('i32', [N], Int32Array.from(ids.keys())),
          cuSeqlens: device.fromArray('i32', [2], Int32Array.from([0, N])),
        },
      },
      device.fromArray('i32', [N], Int32Array.from(ids)),
    );
    const V = config.vocabSize;
    for (let i = 0; i + 1 < N; i++) {
      const row = logits.subarray(i * V, (i + 1) * V);
      let mx = -Infinity;
      for (const x of row) mx = Math.max(mx, x);
      let s = 0;
      for (const x of row) s += Math.exp(x - mx);
      const nll = mx + Math.log(s) - row[ids[i + 1]!]!;
      hand.true[0] += nll;
      hand.true[1]++;
      if (i + 1 >= firstTarget) {
        hand.false[0] += nll;
        hand.false[1]++;
      }
    }
  }
  for (const onInputs of [false, true]) {
    const a: AdapterConfigInput = {
      name: `toi-${onInputs}`,
      data,
      seq_len: 256,
      batch_size: 4,
      micro_batch_size: 2,
      shuffle: false,
      max_steps: 1,
      train_on_inputs: onInputs,
      lora: { r: 2, dropout: 0.3 },
    };
    const r = await run(model, [a]);
    t.same(r.errors, []);
    const [sum, count] = hand[`${onInputs}`];
    const want = sum / count;
    const got = r.steps.get(a.name)![0]!.loss;
    t.ok(
      rclose(got, want, 1e-5),
      `train_on_inputs ${onInputs}: loss ${got} vs hand ${want} over ${count} target tokens (rtol 1e-5: f32 logits)`,
    );
  }
  t.ok(
    hand.false[1] < hand.true[1] / 2,
    `the mask removes the prompt: ${hand.false[1]} response targets of ${hand.true[1]}`,
  );
});
