// Training K = 3 adapters together (BatchLoRA: one micro-batch message
// holds the rows of all three) gives the same adapter weights, step by step, as training each
// alone with the same data and seeds, each in its own supervisor run.
//
// The adapters differ in rank, target modules, lr, schedule, batch and micro-batch size
// (gradient accumulation), dropout (on for two of them: the mask is a function of seed,
// micro-batch serial, layer, module and row, so it must match too), weight decay, clipping and
// train_on_inputs. Every step is compared: the loss, lr and gradient norm of each step event,
// and the weights + AdamW moments of a checkpoint written after every step (save_every: 1),
// plus the final PEFT adapter.
//
// Tolerance: NONE. We assert bitwise equality, and it holds on the CPU backend because no
// kernel mixes rows of different adapters and no reduction order depends on the number of rows:
//  - cpu::gemm (base linear forward/backward, LM head) computes each output row on its own,
//    reducing over K in fixed 256-wide blocks in index order; the split of work over threads is
//    over rows (M) only, so a row's result is the same whatever M is and wherever it sits;
//  - rmsnorm, rope, swiglu, embedding, cross-entropy are per row; attention is per sequence
//    (cuSeqlens) and sequences never cross segments;
//  - lora_forward/backward run each segment as its own GEMMs over the segment's rows only (dA,
//    dB reduce over that adapter's rows, in row order, exactly as alone), and the dropout
//    mask is a function of (seed, serial, layer, module, row-in-segment), not of the batch
//    position;
//  - the loss weight of a row is 1/(target tokens of its adapter's step), the per-adapter loss
//    sum is taken in JS over the segment's rows in order, and sumsq/AdamW touch only that
//    adapter's flat buffers (same length, same thread partition).
// A GPU backend whose GEMM picks its tiling or split-K from M would only be equal to ~1e-6
// relative; this test runs on cpu:0.
import t from 'tap';
import { run, readCheckpoints, readPeft } from './util.js';
import { bitwiseEqual, maxDiff } from '../support/compare.js';
import { tinyModel } from '../support/models.js';
import { demoData, tmpDir } from '../support/files.js';
import type { AdapterConfigInput } from '../../lib/config.js';

t.test('BatchLoRA: 3 adapters together == each alone, step by step, bitwise', async (t) => {
  const model = await tinyModel();
  const dir = tmpDir(t);
  const adapters: AdapterConfigInput[] = [
    {
      name: 'a',
      data: demoData(dir, 'arithmetic', 12),
      seq_len: 256,
      seed: 1,
      shuffle: true,
      lora: { r: 4, alpha: 8, dropout: 0.1, targets: ['q_proj', 'v_proj'] },
      optimizer: { lr: 3e-3 },
      batch_size: 4,
      micro_batch_size: 2,
      max_grad_norm: 0.5,
      save_every: 1,
    },
    {
      name: 'b',
      data: demoData(dir, 'capitals', 9),
      seq_len: 256,
      seed: 2,
      shuffle: false,
      lora: { r: 8, alpha: 16, dropout: 0, targets: ['k_proj', 'o_proj', 'gate_proj', 'down_proj'] },
      optimizer: { lr: 1e-3, weight_decay: 0.01 },
      schedule: { type: 'cosine', warmup_steps: 1 },
      batch_size: 3,
      micro_batch_size: 1,
      train_on_inputs: true,
      save_every: 1,
    },
    {
      name: 'c',
      data: demoData(dir, 'sentiment', 6),
      seq_len: 256,
      seed: 3,
      lora: {
        r: 2,
        alpha: 4,
        dropout: 0.2,
        targets: ['q_proj', 'k_proj', 'v_proj', 'o_proj', 'up_proj'],
        use_rslora: true,
      },
      optimizer: { lr: 2e-3, betas: [0.8, 0.99] },
      schedule: { type: 'linear' },
      batch_size: 2,
      epochs: 2,
      save_every: 1,
    },
  ];
  const outTogether = `${dir}/together`;
  const together = await run(model, adapters, { output: outTogether });
  t.same(together.errors, [], 'no errors together');
  const multi = together.messages.filter((m) => m.length > 1).length;
  t.ok(
    multi >= together.messages.length / 2,
    `${multi} of ${together.messages.length} micro-batch messages held several adapters (${together.messages.filter((m) => m.length === 3).length} all three)`,
  );
  const alone = [];
  for (const a of adapters) {
    const out = `${dir}/alone-${a.name}`;
    const r = await run(model, [a], { output: out });
    t.same(r.errors, [], `no errors for ${a.name} alone`);
    alone.push({ a, r, out });
  }
  for (const { a, r, out } of alone) {
    const tg = together.steps.get(a.name)!;
    const al = r.steps.get(a.name)!;
    t.ok(al.length >= 3, `${a.name}: ${al.length} steps`);
    t.equal(tg.length, al.length, `${a.name}: same number of steps`);
    for (let i = 0; i < al.length; i++) {
      const x = tg[i]!,
        y = al[i]!;
      if (x.loss !== y.loss || x.lr !== y.lr || x.gradNorm !== y.gradNorm || x.tokens !== y.tokens) {
        t.fail(
          `${a.name} step ${i + 1}: together loss ${x.loss} lr ${x.lr} |g| ${x.gradNorm} tokens ${x.tokens}; alone ${y.loss} ${y.lr} ${y.gradNorm} ${y.tokens}`,
        );
      }
    }
    t.pass(`${a.name}: loss, lr, grad norm and tokens of all ${al.length} step events identical`);
    const ckT = readCheckpoints(model, a, outTogether);
    const ckA = readCheckpoints(model, a, out);
    t.same(
      ckT.map((c) => c.step),
      ckA.map((c) => c.step),
      `${a.name}: checkpoints at the same steps`,
    );
    t.equal(ckA.length, al.length - 1, `${a.name}: a checkpoint after every step but the last`);
    for (let i = 0; i < ckA.length; i++) {
      for (const k of ['params', 'm', 'v'] as const) {
        const x = ckT[i]!.state[k],
          y = ckA[i]!.state[k];
        if (!bitwiseEqual(x, y)) t.fail(`${a.name} step ${ckA[i]!.step} ${k}: max |diff| ${maxDiff(x, y)}`);
      }
    }
    t.pass(`${a.name}: weights and AdamW moments after each of steps 1..${ckA.length} bitwise equal`);
    const wT = readPeft(model, a, `${outTogether}/${a.name}`);
    const wA = readPeft(model, a, `${out}/${a.name}`);
    t.ok(bitwiseEqual(wT, wA), `${a.name}: final PEFT adapter bitwise equal (max |diff| ${maxDiff(wT, wA)})`);
    // and it trained: the weights moved away from the init
    t.ok(maxDiff(wA, ckA[0]!.state.params) > 0, `${a.name}: weights change between step 1 and the end`);
  }
});
