// `mlora make-model`: each preset's config, a written tiny (and small) model that loads with
// its tokenizer, seeded reproducibility, bf16, and CLI errors. The bench and 1b presets are
// checked through the config they would write (presetConfigJson), without writing weights.
import t from 'tap';
import fs from 'node:fs';
import path from 'node:path';
import { main, makeModel, presetConfigJson, presetDtype } from '../../scripts/cli/make-model.js';
import { openModelDir, parameterCount, parseModelConfig } from '../../lib/io/hf-model.js';
import { loadTokenizer } from '../../lib/data/tokenizer.js';
import { openSingleModel } from '../../lib/model/single.js';
import { f32ToBf16 } from '../../lib/io/dtype.js';
import { PRESETS, type LlamaConfig, type PresetName } from '../../lib/model/config.js';
import { inProcess, mlora } from './util.js';
import { fullLogits } from '../support/logits.js';
import { tmpDir } from '../support/files.js';

/** Parameters of an untied LLaMA: embedding, per layer 4 attention + 3 MLP matrices + 2 norms, final norm, head. */
function llamaParameters(c: LlamaConfig): number {
  const H = c.hiddenSize,
    q = c.numHeads * c.headDim,
    kv = c.numKvHeads * c.headDim,
    I = c.intermediateSize;
  const layer = H * q + 2 * H * kv + q * H + 3 * H * I + 2 * H;
  return c.vocabSize * H * (c.tieWordEmbeddings ? 1 : 2) + c.numLayers * layer + H;
}

t.test('every preset: the config.json it writes is the preset, and reads back as it', async (t) => {
  const want: Partial<Record<PresetName, Record<string, unknown>>> = {
    tiny: {
      hidden_size: 64,
      intermediate_size: 172,
      num_hidden_layers: 2,
      num_attention_heads: 4,
      num_key_value_heads: 2,
      head_dim: 16,
      vocab_size: 512,
      max_position_embeddings: 512,
      torch_dtype: 'float32',
    },
    small: {
      hidden_size: 256,
      intermediate_size: 688,
      num_hidden_layers: 4,
      num_attention_heads: 8,
      num_key_value_heads: 4,
      head_dim: 32,
      vocab_size: 2048,
      max_position_embeddings: 1024,
      torch_dtype: 'float32',
    },
    // the bench preset: hidden 512, 4 layers, 8 heads, 4 kv heads, intermediate 1376, vocab 8192
    bench: {
      hidden_size: 512,
      intermediate_size: 1376,
      num_hidden_layers: 4,
      num_attention_heads: 8,
      num_key_value_heads: 4,
      head_dim: 64,
      vocab_size: 8192,
      max_position_embeddings: 2048,
      torch_dtype: 'float32',
    },
    '1b': {
      hidden_size: 2048,
      intermediate_size: 5632,
      num_hidden_layers: 22,
      num_attention_heads: 32,
      num_key_value_heads: 4,
      head_dim: 64,
      vocab_size: 32000,
      max_position_embeddings: 2048,
      torch_dtype: 'bfloat16',
    },
  };
  for (const p of Object.keys(want) as PresetName[]) {
    const j = presetConfigJson(p);
    t.match(
      j,
      {
        architectures: ['LlamaForCausalLM'],
        model_type: 'llama',
        rms_norm_eps: 1e-6,
        rope_theta: 10000,
        tie_word_embeddings: false,
        bos_token_id: 1,
        eos_token_id: 2,
        ...want[p],
      },
      p,
    );
    t.same(parseModelConfig(j, `${p}/config.json`), PRESETS[p], `${p}: reads back as the preset`);
    t.equal(presetConfigJson(p, 'bf16').torch_dtype, 'bfloat16');
  }
  t.equal(presetDtype('1b'), 'bf16', '1b is written in bf16 unless told otherwise');
  t.equal(presetDtype('bench'), 'f32');
  t.ok(
    Math.abs(llamaParameters(PRESETS.bench) - 20e6) < 0.1e6,
    `bench: ${llamaParameters(PRESETS.bench).toLocaleString()} parameters`,
  );
  t.ok(
    Math.abs(llamaParameters(PRESETS['1b']) - 1.1e9) < 0.01e9,
    `1b: ${llamaParameters(PRESETS['1b']).toLocaleString()} parameters`,
  );
});

t.test("the family presets: each config.json is that family's, and reads back as the preset", async (t) => {
  const want: Record<string, Record<string, unknown>> = {
    'tiny-llama3': {
      architectures: ['LlamaForCausalLM'],
      model_type: 'llama',
      rope_theta: 500000,
      rope_scaling: {
        rope_type: 'llama3',
        factor: 8,
        low_freq_factor: 1,
        high_freq_factor: 4,
        original_max_position_embeddings: 64,
      },
    },
    'tiny-qwen2': {
      architectures: ['Qwen2ForCausalLM'],
      model_type: 'qwen2',
      rope_theta: 1000000,
      tie_word_embeddings: true,
      use_sliding_window: false,
    },
    'tiny-qwen3': {
      architectures: ['Qwen3ForCausalLM'],
      model_type: 'qwen3',
      head_dim: 32,
      attention_bias: false,
      use_sliding_window: false,
    },
    'tiny-mistral': { architectures: ['MistralForCausalLM'], model_type: 'mistral', sliding_window: 16 },
  };
  for (const p of Object.keys(PRESETS).filter((k) => k.startsWith('tiny-')) as PresetName[]) {
    const j = presetConfigJson(p);
    t.match(j, { hidden_size: 64, num_hidden_layers: 2, vocab_size: 512, ...want[p] }, p);
    t.same(parseModelConfig(j, `${p}/config.json`), PRESETS[p], `${p}: reads back as the preset`);
  }
  t.same(
    Object.keys(want).sort(),
    Object.keys(PRESETS)
      .filter((k) => k.startsWith('tiny-'))
      .sort(),
    'every family preset is checked',
  );
  const dir = tmpDir(t, 'mm-qwen2');
  await makeModel(dir, 'tiny-qwen2', 1);
  const m = openModelDir(dir);
  t.same(m.config, PRESETS['tiny-qwen2'], 'tiny-qwen2: openModelDir reads the preset');
  t.ok(
    m.tensorNames.includes('model.layers.1.self_attn.k_proj.bias') && !m.tensorNames.includes('lm_head.weight'),
    'q/k/v biases, tied head',
  );
  const q3 = tmpDir(t, 'mm-qwen3');
  await makeModel(q3, 'tiny-qwen3', 1);
  t.same(
    openModelDir(q3).info('model.layers.0.self_attn.q_norm.weight').shape,
    [32],
    'tiny-qwen3: q_norm over head_dim',
  );
  for (const p of ['tiny-llama3', 'tiny-mistral'] as const) {
    const d = tmpDir(t, `mm-${p}`);
    await makeModel(d, p, 1);
    t.same(openModelDir(d).config, PRESETS[p], `${p}: openModelDir reads the preset`);
  }
  for (const d of [dir, q3]) {
    const sm = await openSingleModel(d);
    const lg = await fullLogits(
      sm,
      Array.from({ length: 40 }, (_, i) => (i * 37) % 512),
    );
    sm.free();
    t.ok(lg.every(Number.isFinite) && lg.some((x) => x !== 0), `${path.basename(d)}: finite logits`);
  }
});

t.test('tiny and small: written, opened, tokenizer loads, parameter count, runs', async (t) => {
  for (const p of ['tiny', 'small'] as const) {
    const dir = tmpDir(t, `mm-${p}`);
    await makeModel(dir, p, 1);
    t.same(
      fs.readdirSync(dir).sort(),
      ['config.json', 'generation_config.json', 'model.safetensors', 'tokenizer.json', 'tokenizer_config.json'],
      `${p}: files`,
    );
    t.same(
      JSON.parse(fs.readFileSync(path.join(dir, 'config.json'), 'utf8')),
      presetConfigJson(p),
      `${p}: config.json`,
    );
    const m = openModelDir(dir);
    t.same(m.config, PRESETS[p], `${p}: openModelDir reads the preset`);
    const s = m.stats();
    t.equal(s.parameters, llamaParameters(PRESETS[p]), `${p}: ${s.parameters.toLocaleString()} parameters`);
    t.equal(parameterCount(PRESETS[p]), s.parameters, `${p}: lib/io/hf-model.ts parameterCount`);
    t.same(s.dtypes, { F32: PRESETS[p].numLayers * 9 + 3 });
    t.equal(s.bytes, 4 * s.parameters);
    const tok = loadTokenizer(dir);
    t.equal(tok.vocabSize, PRESETS[p].vocabSize, `${p}: tokenizer vocab = model vocab`);
    t.equal(tok.eosId, 2);
    const text = 'The capital of France is Paris.';
    const ids = tok.encode(text, { addSpecialTokens: false });
    t.equal(tok.decode(ids), text, `${p}: tokenizer round trip`);
    if (p === 'tiny') {
      const sm = await openSingleModel(dir);
      const lg = await fullLogits(sm, ids);
      sm.free();
      t.ok(lg.every(Number.isFinite) && lg.some((x) => x !== 0), 'tiny: finite logits');
    }
  }
});

t.test('seeded: same seed, identical files; another seed, other weights (same tokenizer)', async (t) => {
  const [a, b, c] = [tmpDir(t, 'mm-a'), tmpDir(t, 'mm-b'), tmpDir(t, 'mm-c')];
  await makeModel(a, 'tiny', 42);
  await makeModel(b, 'tiny', 42);
  await makeModel(c, 'tiny', 43);
  for (const f of fs.readdirSync(a))
    t.ok(fs.readFileSync(path.join(a, f)).equals(fs.readFileSync(path.join(b, f))), `seed 42 twice: ${f} identical`);
  t.notOk(
    fs.readFileSync(path.join(a, 'model.safetensors')).equals(fs.readFileSync(path.join(c, 'model.safetensors'))),
    'seed 43: other weights',
  );
  const ma = openModelDir(a),
    mc = openModelDir(c);
  for (const name of ma.tensorNames) {
    const x = ma.readF32(name),
      y = mc.readF32(name);
    if (name.endsWith('norm.weight')) continue; // norms start at 1 whatever the seed
    if (x.every((v, i) => v === y[i])) t.fail(`${name} is the same under seeds 42 and 43`);
  }
  for (const f of ['tokenizer.json', 'tokenizer_config.json', 'config.json'])
    t.ok(fs.readFileSync(path.join(a, f)).equals(fs.readFileSync(path.join(c, f))), `${f} does not depend on the seed`);
});

t.test('--dtype bf16: BF16 tensors (the f32 model rounded), loads and runs', async (t) => {
  const [f, b] = [tmpDir(t, 'mm-f32'), tmpDir(t, 'mm-bf16')];
  const r = await inProcess(main, '--preset', 'tiny', '--out', b, '--seed', '8', '--dtype', 'bf16');
  t.equal(r.code, 0, r.err);
  t.match(r.out, /^wrote tiny \(hidden 64, 2 layers, 4\/2 heads, vocab 512, bf16\) to /);
  await makeModel(f, 'tiny', 8, 'f32');
  const mb = openModelDir(b),
    mf = openModelDir(f);
  t.equal(mb.config.torchDtype, 'bfloat16');
  t.same(mb.stats().dtypes, { BF16: 21 });
  t.equal(mb.stats().bytes, mf.stats().bytes / 2);
  for (const name of ['model.embed_tokens.weight', 'model.layers.1.self_attn.k_proj.weight', 'lm_head.weight']) {
    t.same(
      Array.from(mb.fileOf(name).read(name) as Uint16Array),
      Array.from(f32ToBf16(mf.readF32(name))),
      `${name}: the f32 weights rounded to bf16`,
    );
  }
  const m = await openSingleModel(b);
  const lg = await fullLogits(m, [1, 5, 9, 200]);
  m.free();
  t.ok(lg.every(Number.isFinite), 'bf16 model runs');
});

t.test('CLI errors are usage errors (exit 2) with a clear message', async (t) => {
  const out = tmpDir(t, 'mm-cli');
  const cases: Array<[string[], RegExp]> = [
    [['--out', out], /--preset must be one of tiny, small, bench, 1b/],
    [['--preset', 'huge', '--out', out], /--preset must be one of tiny, small, bench, 1b/],
    [['--preset', 'tiny'], /--out DIR is required/],
    [['--preset', 'tiny', '--out', out, '--seed', 'abc'], /--seed must be a non-negative integer, got 'abc'/],
    [['--preset', 'tiny', '--out', out, '--seed=-1'], /--seed must be a non-negative integer, got '-1'/],
    [['--preset', 'tiny', '--out', out, '--seed', '1.5'], /--seed must be a non-negative integer, got '1.5'/],
    [['--preset', 'tiny', '--out', out, '--dtype', 'f16'], /--dtype must be f32 or bf16, got 'f16'/],
    [['--preset', 'tiny', '--out', out, '--bogus'], /Unknown option '--bogus'/],
  ];
  for (const [args, re] of cases) {
    const r = await inProcess(main, ...args);
    t.equal(r.code, 2, `${args.join(' ')}: exit 2`);
    t.match(r.err, re);
    t.match(r.err, /usage: mlora make-model --preset/);
  }
  t.same(fs.readdirSync(out), [], 'nothing written');
  const real = mlora(['make-model', '--preset', 'tiny']);
  t.equal(real.code, 2, 'the real CLI exits 2');
  t.match(real.err, /--out DIR is required/);
});
