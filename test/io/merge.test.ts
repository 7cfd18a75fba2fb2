// mlora merge: the merged model evaluates like base + adapter (llama-tiny and the four family
// fixtures with their PyTorch-made adapters, and the real stories260K with a seeded adapter), every merged tensor is
// W + scale·B·A (alpha/r, or alpha/sqrt(r) with use_rslora) and every other tensor is copied
// bit for bit; --dtype, sharding under a tiny --max-shard-size, the copied files, and the
// refusals (mismatched adapter, non-empty --out).
import t, { type Test } from 'tap';
import fs from 'node:fs';
import path from 'node:path';
import { spawnSync } from 'node:child_process';
import { mergeAdapter, mergedWeight, parseShardSize } from '../../lib/io/merge.js';
import { openModelDir } from '../../lib/io/hf-model.js';
import { loadAdapter, saveAdapter, type AdapterWeights } from '../../lib/io/peft.js';
import { openSafetensors } from '../../lib/io/safetensors.js';
import { LORA_TARGETS, PRESETS, projectionShape, type LlamaConfig } from '../../lib/model/config.js';
import { Rng } from '../../lib/rng.js';
import { evaluateDataset } from '../../scripts/cli/eval.js';
import { assertClose } from '../support/helpers.js';
import { REPO, STORIES260K as STORIES, STORY_DATA as STORY_DIR, tmpDir } from '../support/files.js';

const CLI = path.join(REPO, 'dist/scripts/mlora.js');
const TINY = path.join(REPO, 'test/fixtures/llama-tiny');
const STORY_DATA = path.join(STORY_DIR, 'sea.eval.jsonl');

function mlora(...args: string[]) {
  const r = spawnSync(process.execPath, [CLI, ...args], { encoding: 'utf8', timeout: 120_000 });
  return { code: r.status, out: r.stdout, err: r.stderr };
}

/** A seeded adapter on every projection of every layer, B non-zero (trained-looking). */
function randomAdapter(
  c: LlamaConfig,
  o: { r: number; alpha: number; rslora?: boolean; seed: number },
): AdapterWeights {
  const rng = new Rng(o.seed, 'merge-test-adapter');
  const layers = Array.from({ length: c.numLayers }, () =>
    Object.fromEntries(
      LORA_TARGETS.map((tg) => {
        const [out, inD] = projectionShape(c, tg);
        return [
          tg,
          {
            a: rng.fillNormal(new Float32Array(o.r * inD), 0.05),
            b: rng.fillNormal(new Float32Array(out * o.r), 0.05),
          },
        ];
      }),
    ),
  );
  return {
    r: o.r,
    loraAlpha: o.alpha,
    loraDropout: 0,
    targetModules: [...LORA_TARGETS],
    useRslora: !!o.rslora,
    baseModelNameOrPath: null,
    layers,
  };
}

/** The fixture's two reference sequences as pre-tokenized JSONL (llama-tiny has no tokenizer). */
function tinyData(dir: string): string {
  const ref = JSON.parse(fs.readFileSync(path.join(TINY, 'ref.json'), 'utf8')) as {
    input_ids: number[][];
    labels: number[][];
  };
  const file = path.join(dir, 'tiny.jsonl');
  fs.writeFileSync(
    file,
    ref.input_ids.map((ids, i) => JSON.stringify({ input_ids: ids, labels: ref.labels[i] })).join('\n') + '\n',
  );
  return file;
}

const evalOf = (model: string, data: string, adapter?: string) =>
  evaluateDataset({ model, data, seqLen: 256, batchTokens: 4096, ...(adapter ? { adapter } : {}) });

// f32: the merged GEMM rounds W + ΔW once where base + adapter rounds W·x and scale·B·(A·x)
// separately; the two losses agree to a few 1e-7 relative (a loss of ~1-5 over a few thousand tokens)
const F32_TOL = { atol: 1e-5, rtol: 1e-5 };

/**
 * Merges a fixture's adapter into its model with the CLI and checks: eval of the merged model =
 * eval of base + adapter; every adapted projection = W + (alpha/r)·B·A against float64; every
 * other tensor (norms, embeddings, biases, q/k norms) copied bit for bit; config.json unchanged.
 */
async function checkFixture(t: Test, fixture: string, data: string, projections: number) {
  const model = path.join(fixture, 'model');
  const adapter = path.join(fixture, 'adapter');
  const out = path.join(tmpDir(t, 'merge'), 'merged');
  const r = mlora('merge', '--model', model, '--adapter', adapter, '--out', out);
  t.equal(r.code, 0, r.err);
  const src = openModelDir(model);
  t.match(
    r.out,
    new RegExp(
      `scale 2\\): ${projections} projection\\(s\\) of ${src.tensorNames.length} tensors; wrote .*merged: model\\.safetensors in`,
    ),
  );
  const withAdapter = await evalOf(model, data, adapter);
  const merged = await evalOf(out, data);
  const base = await evalOf(model, data);
  t.equal(merged.tokens, withAdapter.tokens);
  assertClose(
    t,
    [merged.loss],
    [withAdapter.loss],
    F32_TOL,
    `merged eval loss ${merged.loss.toFixed(6)} vs base + adapter`,
  );
  t.ok(
    Math.abs(base.loss - withAdapter.loss) > 1e-3,
    `the adapter matters (base ${base.loss.toFixed(4)}, with adapter ${withAdapter.loss.toFixed(4)})`,
  );
  // the CLI's own eval prints the same numbers
  const cli = JSON.parse(mlora('eval', '--model', out, '--data', data, '--json').out) as { loss: number };
  t.equal(cli.loss, merged.loss, 'mlora eval of the merged model');

  const dst = openModelDir(out);
  const ad = loadAdapter(adapter);
  t.same(dst.tensorNames.slice().sort(), src.tensorNames.slice().sort(), 'the same tensor names');
  let checked = 0;
  for (const n of src.tensorNames) {
    const m = /^model\.layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.weight$/.exec(n);
    const pair = m ? ad.layers[Number(m[1])]?.[m[2] as (typeof LORA_TARGETS)[number]] : undefined;
    if (!pair) {
      t.same(
        Buffer.from(dst.fileOf(n).read(n).buffer),
        Buffer.from(src.fileOf(n).read(n).buffer),
        `${n}: copied unchanged`,
      );
      continue;
    }
    const w = src.readF32(n);
    const [outD, inD] = src.info(n).shape as [number, number];
    const want = new Float64Array(w.length);
    for (let o = 0; o < outD; o++)
      for (let i = 0; i < inD; i++) {
        let s = 0;
        for (let k = 0; k < ad.r; k++) s += pair.b[o * ad.r + k]! * pair.a[k * inD + i]!;
        want[o * inD + i] = w[o * inD + i]! + (ad.loraAlpha / ad.r) * s;
      }
    assertClose(t, dst.readF32(n), want, { atol: 1e-7, rtol: 1e-6 }, `${n} = W + (alpha/r)·B·A`);
    checked++;
  }
  t.equal(checked, projections, `all ${projections} adapted projections checked`);
  t.same(
    JSON.parse(fs.readFileSync(path.join(out, 'config.json'), 'utf8')),
    JSON.parse(fs.readFileSync(path.join(model, 'config.json'), 'utf8')),
    'config.json as the base (same dtype)',
  );
}

t.test(
  'llama-tiny + its PyTorch-made adapter: merged eval = base + adapter eval; tensors are W + (alpha/r)·B·A',
  async (t) => {
    await checkFixture(t, TINY, tinyData(t.testdir()), 14);
  },
);

// Llama 3 RoPE scaling, Qwen2 (q/k/v biases: copied unchanged, tied embeddings), Qwen3 (q_norm/k_norm),
// Mistral (sliding window): the PyTorch-made fixtures of test/fixtures/families
for (const fam of ['llama3-scaled', 'qwen2', 'qwen3', 'mistral-window']) {
  t.test(`${fam} + its adapter: merged eval = base + adapter eval; biases and norms copied unchanged`, async (t) => {
    const fixture = path.join(REPO, 'test/fixtures/families', fam);
    await checkFixture(t, fixture, path.join(fixture, 'data.jsonl'), 14);
    if (fam === 'qwen2')
      t.ok(
        openModelDir(path.join(fixture, 'model')).tensorNames.some((n) => n.endsWith('q_proj.bias')),
        'qwen2 has q_proj biases (checked above)',
      );
  });
}

t.test(
  'stories260K: merged eval = base + adapter eval; f32 and bf16; use_rslora scale; tokenizer files copied',
  async (t) => {
    const dir = t.testdir();
    const c = openModelDir(STORIES).config;
    const adDir = path.join(dir, 'adapter');
    saveAdapter(adDir, randomAdapter(c, { r: 8, alpha: 16, seed: 1 }));
    const withAdapter = await evalOf(STORIES, STORY_DATA, adDir);
    const base = await evalOf(STORIES, STORY_DATA);
    t.ok(
      Math.abs(base.loss - withAdapter.loss) > 1e-2,
      `the adapter matters (base ${base.loss.toFixed(4)}, with adapter ${withAdapter.loss.toFixed(4)})`,
    );

    const out = path.join(dir, 'merged');
    const res = mergeAdapter(STORIES, adDir, out);
    t.equal(res.merged, 5 * 7);
    t.equal(res.scale, 2);
    const merged = await evalOf(out, STORY_DATA);
    assertClose(
      t,
      [merged.loss],
      [withAdapter.loss],
      F32_TOL,
      `merged eval loss ${merged.loss.toFixed(6)} vs base + adapter`,
    );
    t.same(
      openModelDir(out).tensorNames.slice().sort(),
      openModelDir(STORIES).tensorNames.slice().sort(),
      'tied embeddings stay tied: no lm_head added',
    );
    for (const f of [
      'tokenizer.json',
      'tokenizer.model',
      'tokenizer_config.json',
      'special_tokens_map.json',
      'generation_config.json',
      'LICENSE',
    ]) {
      t.same(fs.readFileSync(path.join(out, f)), fs.readFileSync(path.join(STORIES, f)), `${f} copied`);
    }

    // bf16: every floating tensor stored as BF16, torch_dtype says so, the loss moves by rounding only
    const outBf = path.join(dir, 'merged-bf16');
    const r = mlora('merge', '--model', STORIES, '--adapter', adDir, '--out', outBf, '--dtype', 'bf16');
    t.equal(r.code, 0, r.err);
    t.same(openModelDir(outBf).stats().dtypes, { BF16: openModelDir(STORIES).stats().tensors });
    t.equal(
      (JSON.parse(fs.readFileSync(path.join(outBf, 'config.json'), 'utf8')) as { torch_dtype: string }).torch_dtype,
      'bfloat16',
    );
    const bf = await evalOf(outBf, STORY_DATA);
    // bf16 keeps 8 bits of mantissa (relative rounding ≤ 2^-9 per weight): the loss stays within 2%
    assertClose(
      t,
      [bf.loss],
      [withAdapter.loss],
      { atol: 0, rtol: 0.02 },
      `bf16 merged eval loss ${bf.loss.toFixed(4)}`,
    );

    // use_rslora: scale alpha/sqrt(r), read from adapter_config.json
    const rsDir = path.join(dir, 'adapter-rslora');
    saveAdapter(rsDir, randomAdapter(c, { r: 4, alpha: 4, rslora: true, seed: 2 }));
    const rs = mergeAdapter(STORIES, rsDir, path.join(dir, 'merged-rslora'));
    t.equal(rs.scale, 2, 'alpha/sqrt(r) = 4/2');
    const rsLoss = (await evalOf(path.join(dir, 'merged-rslora'), STORY_DATA)).loss;
    assertClose(
      t,
      [rsLoss],
      [(await evalOf(STORIES, STORY_DATA, rsDir)).loss],
      F32_TOL,
      'rslora merged eval loss vs base + adapter',
    );
  },
);

t.test(
  'sharding: a tiny --max-shard-size writes shards + model.safetensors.index.json that load and evaluate the same',
  async (t) => {
    const dir = t.testdir();
    const c = openModelDir(STORIES).config;
    const adDir = path.join(dir, 'adapter');
    saveAdapter(adDir, randomAdapter(c, { r: 4, alpha: 8, seed: 3 }));
    const out = path.join(dir, 'sharded');
    const limit = 200_000; // the model is 1,040,128 bytes; its largest tensor (the embedding) 131,072
    const r = mlora('merge', '--model', STORIES, '--adapter', adDir, '--out', out, '--max-shard-size', '200KB');
    t.equal(r.code, 0, r.err);
    const files = fs
      .readdirSync(out)
      .filter((f) => f.endsWith('.safetensors'))
      .sort();
    t.ok(files.length >= 6, `${files.length} shards`);
    t.ok(
      files.every(
        (f, i) =>
          f === `model-${String(i + 1).padStart(5, '0')}-of-${String(files.length).padStart(5, '0')}.safetensors`,
      ),
      'shard names as transformers writes them',
    );
    t.notOk(fs.existsSync(path.join(out, 'model.safetensors')), 'no single-file weights beside the shards');
    let total = 0;
    for (const f of files) {
      const st = openSafetensors(path.join(out, f));
      const bytes = [...st.tensors.values()].reduce((s, i) => s + i.end - i.begin, 0);
      total += bytes;
      t.ok(bytes <= limit, `${f}: ${bytes} bytes ≤ 200KB`);
    }
    const index = JSON.parse(fs.readFileSync(path.join(out, 'model.safetensors.index.json'), 'utf8')) as {
      metadata: { total_size: number };
      weight_map: Record<string, string>;
    };
    t.equal(index.metadata.total_size, total, 'index total_size');
    t.same(
      Object.keys(index.weight_map).sort(),
      openModelDir(STORIES).tensorNames.slice().sort(),
      'weight_map lists every tensor',
    );
    const merged = await evalOf(out, STORY_DATA);
    assertClose(
      t,
      [merged.loss],
      [(await evalOf(STORIES, STORY_DATA, adDir)).loss],
      F32_TOL,
      'sharded merged eval loss vs base + adapter',
    );
  },
);

t.test('refusals: a mismatched adapter (file, tensor, shapes), a non-empty --out, bad options', async (t) => {
  const dir = t.testdir();
  const adDir = path.join(dir, 'small-adapter');
  saveAdapter(adDir, randomAdapter(PRESETS.small, { r: 4, alpha: 8, seed: 4 }));
  const out = path.join(dir, 'out');
  const r = mlora('merge', '--model', STORIES, '--adapter', adDir, '--out', out);
  t.equal(r.code, 1);
  t.match(r.err, `${path.join(adDir, 'adapter_model.safetensors')} does not fit the model ${STORIES}`);
  t.match(
    r.err,
    /base_model\.model\.model\.layers\.0\.self_attn\.q_proj\.lora_A\.weight: adapter \[4, 256\], model q_proj needs \[4, 64\]/,
  );
  t.notOk(fs.existsSync(out), 'nothing written');
  t.same(fs.readdirSync(dir).sort(), ['small-adapter'], 'no temp folder left behind');

  fs.mkdirSync(out);
  fs.writeFileSync(path.join(out, 'keep.txt'), 'mine');
  const good = path.join(TINY, 'adapter');
  const r2 = mlora('merge', '--model', path.join(TINY, 'model'), '--adapter', good, '--out', out);
  t.equal(r2.code, 1);
  t.match(r2.err, `${out}: is not empty; merge writes only into a new or empty directory (nothing was changed)`);
  t.same(fs.readdirSync(out), ['keep.txt']);
  // an empty existing directory is fine
  const empty = path.join(dir, 'empty');
  fs.mkdirSync(empty);
  t.equal(mlora('merge', '--model', path.join(TINY, 'model'), '--adapter', good, '--out', empty).code, 0);
  t.ok(fs.existsSync(path.join(empty, 'model.safetensors')));

  t.match(mlora('merge', '--model', STORIES, '--adapter', good).err, /--model, --adapter and --out are required/);
  t.match(
    mlora('merge', '--model', STORIES, '--adapter', good, '--out', path.join(dir, 'x'), '--dtype', 'f8').err,
    /--dtype must be f32, bf16 or f16, got 'f8'/,
  );
  t.match(
    mlora('merge', '--model', STORIES, '--adapter', good, '--out', path.join(dir, 'x'), '--max-shard-size', 'lots').err,
    /--max-shard-size: invalid shard size 'lots'/,
  );
  t.equal(parseShardSize('5GB'), 5e9);
  t.equal(parseShardSize('10KiB'), 10240);
  t.equal(parseShardSize('123'), 123);
});

t.test('mergedWeight: W + scale·B·A against float64 with extreme-range factors', async (t) => {
  const rng = new Rng(9, 'merged-weight');
  const [outD, inD, r] = [7, 5, 3];
  const w = rng.fillNormal(new Float32Array(outD * inD), 1);
  const a = rng.fillNormal(new Float32Array(r * inD), 1e3);
  const b = rng.fillNormal(new Float32Array(outD * r), 1e-3);
  b[2] = 0;
  const got = mergedWeight(w, { a, b }, r, 0.5);
  const want = Array.from(w, (x, k) => {
    const o = Math.floor(k / inD),
      i = k % inD;
    let s = 0;
    for (let j = 0; j < r; j++) s += b[o * r + j]! * a[j * inD + i]!;
    return x + 0.5 * s;
  });
  assertClose(t, got, want, { atol: 1e-6, rtol: 1e-6 }, 'mergedWeight');
});
