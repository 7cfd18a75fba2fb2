// Hugging Face model directories: config.json checks, single-file and sharded checkpoints,
// shapes against the config, per-stage tensor lists, and the random-LLaMA writer.
import t, { type Test } from 'tap';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { parseModelConfig, readModelConfig, toHfConfigJson } from '../../lib/io/hf-config.js';
import { openModelDir } from '../../lib/io/hf-model.js';
import { expectedTensors, stageTensorNames } from '../../lib/io/hf-tensors.js';
import { writeRandomLlama } from '../../lib/io/random-model.js';
import { openSafetensors, writeSafetensors } from '../../lib/io/safetensors.js';
import { bf16ToF32 } from '../../lib/io/dtype.js';
import { PRESETS, type LlamaConfig } from '../../lib/model/config.js';
import { cpuDevice } from '../support/helpers.js';

const FIX = path.resolve('test/fixtures/llama-tiny');

function tmpdir(t: Test): string {
  const d = fs.mkdtempSync(path.join(os.tmpdir(), 'mlora-hf-'));
  t.teardown(() => fs.rmSync(d, { recursive: true, force: true }));
  return d;
}

const tiny: LlamaConfig = PRESETS.tiny;

t.test('the reference fixture model opens and every tensor is checked', async (t) => {
  const c = readModelConfig(path.join(FIX, 'model'));
  t.match(c, {
    modelType: 'llama',
    hiddenSize: 64,
    intermediateSize: 172,
    numLayers: 2,
    numHeads: 4,
    numKvHeads: 2,
    headDim: 16,
    vocabSize: 256,
    maxPositionEmbeddings: 2048,
    rmsNormEps: 1e-6,
    ropeTheta: 10000,
    tieWordEmbeddings: false,
    torchDtype: 'float32',
    bosTokenId: 1,
    eosTokenId: 2,
  });
  const m = openModelDir(path.join(FIX, 'model'));
  t.equal(m.tensorNames.length, 21);
  t.same(m.extraTensors, []);
  t.same(m.stats(), { tensors: 21, parameters: 123712, bytes: 494848, dtypes: { F32: 21 } });
  const dev = cpuDevice();
  const w = await m.loadTensor(dev, 'model.layers.1.self_attn.k_proj.weight');
  t.same(w.shape, [32, 64], 'GQA: k_proj is [kvHeads·headDim, hidden]');
  t.same(Array.from(w.read()), Array.from(m.readF32('model.layers.1.self_attn.k_proj.weight')));
  w.free();
  await t.rejects(
    m.loadTensor(dev, 'model.norm.weight', { expectShape: [65] }),
    /model\.safetensors: tensor 'model\.norm\.weight' has shape \[64\], expected \[65\]/,
  );
  t.throws(() => m.fileOf('nope'), /has no tensor 'nope'/);
});

t.test('config.json errors name the file and the field', async (t) => {
  const base = toHfConfigJson(tiny);
  const without = (k: string) => {
    const o: Record<string, unknown> = { ...base };
    delete o[k];
    return o;
  };
  const cases: Array<[string, Record<string, unknown>, RegExp]> = [
    ['missing hidden_size', without('hidden_size'), /config\.json: field 'hidden_size' is missing/],
    ['missing vocab_size', without('vocab_size'), /config\.json: field 'vocab_size' is missing/],
    ['missing rms_norm_eps', without('rms_norm_eps'), /field 'rms_norm_eps' is missing/],
    ['missing model_type', without('model_type'), /field 'model_type' is missing/],
    [
      'string hidden_size',
      { ...base, hidden_size: 'abc' },
      /config\.json: field 'hidden_size' must be a positive integer, got "abc"/,
    ],
    ['zero layers', { ...base, num_hidden_layers: 0 }, /field 'num_hidden_layers' must be a positive integer, got 0/],
    [
      'fractional heads',
      { ...base, num_attention_heads: 2.5 },
      /field 'num_attention_heads' must be a positive integer, got 2\.5/,
    ],
    [
      'kv heads not dividing',
      { ...base, num_key_value_heads: 3 },
      /field 'num_key_value_heads' \(3\) must divide num_attention_heads \(4\)/,
    ],
    ['negative eps', { ...base, rms_norm_eps: -1 }, /field 'rms_norm_eps' must be a positive number, got -1/],
    ['bad rope_theta', { ...base, rope_theta: 'x' }, /field 'rope_theta' must be a positive number/],
    [
      'bad dtype',
      { ...base, torch_dtype: 'int8' },
      /field 'torch_dtype' must be one of float32, bfloat16, float16, got "int8"/,
    ],
    ['bad tie', { ...base, tie_word_embeddings: 'yes' }, /field 'tie_word_embeddings' must be true or false/],
    ['gpt2', { ...base, model_type: 'gpt2' }, /field 'model_type' is "gpt2": mlora supports LLaMA-architecture models/],
    [
      'llama3 rope scaling without its factors',
      { ...base, rope_scaling: { rope_type: 'llama3', factor: 8 } },
      /field 'rope_scaling\.low_freq_factor' must be a positive number, got nothing/,
    ],
    [
      'llama3 high <= low',
      {
        ...base,
        rope_scaling: {
          type: 'llama3',
          factor: 8,
          low_freq_factor: 4,
          high_freq_factor: 1,
          original_max_position_embeddings: 64,
        },
      },
      /field 'rope_scaling\.high_freq_factor' \(1\) must be greater than low_freq_factor \(4\)/,
    ],
    [
      'linear without factor',
      { ...base, rope_scaling: { type: 'linear' } },
      /field 'rope_scaling\.factor' must be a positive number/,
    ],
    [
      'dynamic with a shorter original context',
      { ...base, rope_scaling: { rope_type: 'dynamic', factor: 2, original_max_position_embeddings: 256 } },
      /field 'rope_scaling\.original_max_position_embeddings' is 256 < max_position_embeddings \(512\): dynamic NTK RoPE would then rescale/,
    ],
    [
      'rope_parameters yarn',
      { ...base, rope_parameters: { rope_type: 'yarn', rope_theta: 1e6 } },
      /field 'rope_parameters\.rope_type' is "yarn": mlora implements the default RoPE and the llama3, linear and dynamic scalings/,
    ],
    [
      'rope_scaling longrope',
      { ...base, rope_scaling: { type: 'longrope', short_factor: [1] } },
      /field 'rope_scaling\.rope_type' is "longrope"/,
    ],
    [
      'rope_scaling and rope_parameters disagree',
      { ...base, rope_scaling: { type: 'linear', factor: 2 }, rope_parameters: { rope_type: 'linear', factor: 4 } },
      /field 'rope_scaling' .* disagrees with rope_parameters/,
    ],
    [
      'partial rotary',
      { ...base, partial_rotary_factor: 0.5 },
      /field 'partial_rotary_factor' is 0\.5: mlora rotates the whole head/,
    ],
    [
      'attention bias',
      { ...base, attention_bias: true },
      /field 'attention_bias' is true: biases on all four attention projections/,
    ],
    ['qwen3 attention bias', { ...base, model_type: 'qwen3', attention_bias: true }, /field 'attention_bias' is true/],
    [
      'bad sliding_window',
      { ...base, model_type: 'mistral', sliding_window: 0 },
      /field 'sliding_window' must be null or a positive integer, got 0/,
    ],
    [
      'qwen2 bad layer_types',
      { ...base, model_type: 'qwen2', use_sliding_window: true, sliding_window: 8, layer_types: ['full_attention'] },
      /field 'layer_types' must list num_hidden_layers \(2\) entries/,
    ],
    [
      'qwen2 bad max_window_layers',
      { ...base, model_type: 'qwen2', use_sliding_window: true, sliding_window: 8, max_window_layers: -1 },
      /field 'max_window_layers' must be a non-negative integer/,
    ],
    ['gelu', { ...base, hidden_act: 'gelu' }, /field 'hidden_act' is "gelu"/],
    [
      'no head_dim, indivisible',
      { ...base, head_dim: undefined, hidden_size: 66 },
      /field 'hidden_size' \(66\) is not a multiple of num_attention_heads \(4\)/,
    ],
  ];
  for (const [label, json, re] of cases) t.throws(() => parseModelConfig(json), re, label);
  t.throws(() => parseModelConfig([]), /config\.json: must be a JSON object/);

  // Accepted variants
  t.equal(
    parseModelConfig({ ...base, model_type: 'mistral', sliding_window: null }).layerWindows,
    undefined,
    'mistral: sliding_window null = none',
  );
  t.equal(
    parseModelConfig({ ...base, model_type: 'mistral', sliding_window: 4096 }).layerWindows,
    undefined,
    'a window >= max_position_embeddings never masks: none',
  );
  t.same(
    parseModelConfig({ ...base, model_type: 'mistral', sliding_window: 256 }).layerWindows,
    [256, 256],
    'mistral: every layer',
  );
  const noKey = without('sliding_window');
  t.same(
    parseModelConfig({ ...noKey, model_type: 'mistral', max_position_embeddings: 8192 }).layerWindows,
    [4096, 4096],
    'mistral without the key: 4096',
  );
  t.equal(
    parseModelConfig({ ...noKey, model_type: 'llama', sliding_window: 8 }).layerWindows,
    undefined,
    'llama ignores sliding_window',
  );
  const qwen2 = { ...base, model_type: 'qwen2', sliding_window: 8, max_window_layers: 1, attention_bias: undefined };
  const q2 = parseModelConfig(qwen2);
  t.ok(q2.qkvBias && q2.layerWindows === undefined, 'qwen2: q/k/v biases; use_sliding_window missing = no window');
  t.equal(
    parseModelConfig({ ...qwen2, use_sliding_window: false }).layerWindows,
    undefined,
    'qwen2: use_sliding_window false = no window',
  );
  t.same(
    parseModelConfig({ ...qwen2, use_sliding_window: true }).layerWindows,
    [0, 8],
    'qwen2: layers >= max_window_layers',
  );
  t.same(
    parseModelConfig({ ...qwen2, use_sliding_window: true, layer_types: ['sliding_attention', 'full_attention'] })
      .layerWindows,
    [8, 0],
    'qwen2: layer_types',
  );
  t.same(
    parseModelConfig({ ...qwen2, use_sliding_window: true, max_window_layers: undefined }).layerWindows,
    undefined,
    'qwen2: max_window_layers defaults to 28',
  );
  t.equal(
    parseModelConfig({ ...without('rope_theta'), model_type: 'qwen2' }).ropeTheta,
    1e6,
    'qwen: rope_theta defaults to 1e6',
  );
  const q3 = parseModelConfig({ ...base, model_type: 'qwen3', head_dim: undefined });
  t.ok(q3.qkNorm && !q3.qkvBias, 'qwen3: q/k norms, no biases');
  t.equal(q3.headDim, 128, 'qwen3 without head_dim: 128, not hidden/heads');
  const l3 = {
    rope_type: 'llama3',
    factor: 8,
    low_freq_factor: 1,
    high_freq_factor: 4,
    original_max_position_embeddings: 8192,
  };
  t.same(
    parseModelConfig({ ...base, rope_scaling: l3 }).ropeScaling,
    { type: 'llama3', factor: 8, lowFreqFactor: 1, highFreqFactor: 4, originalMaxPositionEmbeddings: 8192 },
    'llama3',
  );
  const { rope_type: _rt, ...l3old } = l3;
  t.same(
    parseModelConfig({ ...base, rope_scaling: { ...l3old, type: 'llama3' } }).ropeScaling,
    parseModelConfig({ ...base, rope_scaling: l3 }).ropeScaling,
    "llama3 spelled with 'type'",
  );
  t.same(
    parseModelConfig({
      ...without('rope_theta'),
      rope_scaling: undefined,
      rope_parameters: { ...l3, rope_theta: 5e5 },
    }),
    { ...parseModelConfig({ ...base, rope_scaling: l3 }), ropeTheta: 5e5 },
    'transformers 5: rope_parameters with rope_theta inside',
  );
  t.same(
    parseModelConfig({ ...base, rope_scaling: { type: 'linear', factor: 2 } }).ropeScaling,
    { type: 'linear', factor: 2 },
    'linear',
  );
  t.same(
    parseModelConfig({ ...base, rope_scaling: { rope_type: 'dynamic', factor: 2 } }).ropeScaling,
    { type: 'dynamic', factor: 2 },
    'dynamic without a shorter original context',
  );
  t.equal(
    parseModelConfig({ ...base, rope_scaling: { rope_type: 'default' } }).ropeScaling,
    undefined,
    'default = none',
  );
  const newer = {
    ...without('rope_theta'),
    torch_dtype: undefined,
    dtype: 'bfloat16',
    rope_parameters: { rope_type: 'default', rope_theta: 500000 },
  };
  const c = parseModelConfig(newer);
  t.equal(c.ropeTheta, 500000, 'rope_parameters.rope_theta');
  t.equal(c.torchDtype, 'bfloat16', 'dtype (newer key)');
  const mha = parseModelConfig({ ...without('num_key_value_heads'), head_dim: undefined });
  t.equal(mha.numKvHeads, 4, 'num_key_value_heads defaults to the head count');
  t.equal(mha.headDim, 16, 'head_dim defaults to hidden/heads');
  t.equal(parseModelConfig({ ...base, eos_token_id: [128001, 128009] }).eosTokenId, 128001);

  // From a directory: the path is in the message
  const d = tmpdir(t);
  fs.writeFileSync(path.join(d, 'config.json'), JSON.stringify(without('intermediate_size')));
  t.throws(() => readModelConfig(d), new RegExp(`${d}/config\\.json: field 'intermediate_size' is missing`));
  fs.writeFileSync(path.join(d, 'config.json'), '{');
  t.throws(() => readModelConfig(d), /config\.json: not valid JSON/);
  t.throws(() => readModelConfig(path.join(d, 'nope')), /nope\/config\.json: cannot read: no such file/);
});

t.test('writeRandomLlama: single file and shards load identical tensors; seeded per tensor', async (t) => {
  const d = tmpdir(t);
  const one = path.join(d, 'one');
  const sharded = path.join(d, 'sharded');
  writeRandomLlama(one, tiny, { seed: 7 });
  writeRandomLlama(sharded, tiny, { seed: 7, shardBytes: 100_000 });
  const cfgJson = JSON.parse(fs.readFileSync(path.join(one, 'config.json'), 'utf8'));
  t.match(cfgJson, {
    architectures: ['LlamaForCausalLM'],
    model_type: 'llama',
    torch_dtype: 'float32',
    num_key_value_heads: 2,
  });
  t.ok(fs.existsSync(path.join(one, 'generation_config.json')));
  t.same(readModelConfig(one), { ...tiny }, 'config.json reads back as the preset');

  const shards = fs
    .readdirSync(sharded)
    .filter((f) => f.endsWith('.safetensors'))
    .sort();
  t.ok(shards.length > 2, `${shards.length} shards`);
  t.match(shards[0]!, /^model-00001-of-000\d\d\.safetensors$/);
  const index = JSON.parse(fs.readFileSync(path.join(sharded, 'model.safetensors.index.json'), 'utf8'));
  const a = openModelDir(one);
  const b = openModelDir(sharded);
  t.equal(index.metadata.total_size, a.stats().bytes);
  t.same(b.tensorNames.slice().sort(), a.tensorNames.slice().sort());
  t.equal(b.files.length, shards.length);
  const dev = cpuDevice();
  let same = 0;
  for (const n of a.tensorNames) {
    const x = await a.loadTensor(dev, n);
    const y = await b.loadTensor(dev, n);
    if (JSON.stringify(Array.from(x.read())) === JSON.stringify(Array.from(y.read()))) same++;
    x.free();
    y.free();
  }
  t.equal(same, a.tensorNames.length, 'every tensor identical');

  const emb = a.readF32('model.embed_tokens.weight');
  let s = 0,
    s2 = 0;
  for (const v of emb) {
    s += v;
    s2 += v * v;
  }
  const std = Math.sqrt(s2 / emb.length - (s / emb.length) ** 2);
  t.ok(Math.abs(std - 0.02) < 0.001, `embedding std ${std.toFixed(4)} ≈ 0.02`);
  t.same(Array.from(a.readF32('model.layers.0.input_layernorm.weight')), new Array(64).fill(1), 'norms are ones');
  t.notSame(
    Array.from(a.readF32('model.layers.0.self_attn.q_proj.weight').subarray(0, 4)),
    Array.from(a.readF32('model.layers.1.self_attn.q_proj.weight').subarray(0, 4)),
    'tensors differ',
  );

  // Rewriting the sharded dir as one file removes the old shards and index.
  writeRandomLlama(sharded, tiny, { seed: 7 });
  t.same(fs.readdirSync(sharded).sort(), ['config.json', 'generation_config.json', 'model.safetensors']);
  t.same(Array.from(openModelDir(sharded).readF32('lm_head.weight')), Array.from(a.readF32('lm_head.weight')));
});

t.test('bf16 and tied checkpoints', async (t) => {
  const d = tmpdir(t);
  const tied: LlamaConfig = { ...tiny, tieWordEmbeddings: true };
  writeRandomLlama(d, tied, { seed: 7, dtype: 'bf16' });
  const m = openModelDir(d);
  t.equal(m.config.torchDtype, 'bfloat16');
  t.notOk(m.tensorNames.includes('lm_head.weight'), 'tied: no lm_head');
  t.same(m.stats().dtypes, { BF16: 20 });
  const dev = cpuDevice();
  const w = await m.loadTensor(dev, 'model.layers.0.mlp.up_proj.weight');
  t.equal(w.dtype, 'bf16');
  const f = await m.loadTensor(dev, 'model.layers.0.mlp.up_proj.weight', { dtype: 'f32' });
  t.same(Array.from(f.read()), Array.from(bf16ToF32(w.read() as Uint16Array)));
  w.free();
  f.free();
  t.same(
    stageTensorNames(tied, 1, 2, { head: true }).slice(-2),
    ['model.norm.weight', 'model.embed_tokens.weight'],
    'tied head = embedding',
  );
});

t.test('stage tensor lists', async (t) => {
  const first = stageTensorNames(tiny, 0, 1, { embedding: true });
  t.equal(first[0], 'model.embed_tokens.weight');
  t.equal(first.length, 1 + 9);
  t.ok(first.every((n, i) => i === 0 || n.startsWith('model.layers.0.')));
  const last = stageTensorNames(tiny, 1, 2, { head: true });
  t.same(last.slice(-2), ['model.norm.weight', 'lm_head.weight']);
  const all = new Set([...first, ...last]);
  t.same([...all].sort(), [...expectedTensors(tiny).keys()].sort(), 'two stages cover the model exactly');
  t.throws(() => stageTensorNames(tiny, 1, 3), /layers \[1, 3\) are not inside \[0, 2\)/);

  // A stage loads only its own tensors.
  const m = openModelDir(path.join(FIX, 'model'));
  const dev = cpuDevice();
  const before = dev.memory().used;
  const ts = await m.loadTensors(dev, stageTensorNames(m.config, 1, 2, { head: true }));
  t.equal(ts.size, 11);
  t.same(ts.get('lm_head.weight')!.shape, [256, 64]);
  t.equal(
    dev.memory().used - before,
    [...ts.values()].reduce((s, x) => s + x.bytes, 0),
  );
  for (const x of ts.values()) x.free();
  await t.rejects(m.loadTensors(dev, ['model.norm.weight', 'nope']), /has no tensor 'nope'/);
  t.equal(dev.memory().used, before, 'a failed stage load frees what it had loaded');
});

t.test('broken model directories are clear Errors naming file and tensor', async (t) => {
  const d = tmpdir(t);
  writeRandomLlama(d, tiny, { seed: 1 });
  t.throws(() => openModelDir(path.join(d, 'nope')), /config\.json: cannot read/);

  // Shape mismatch against config
  const cfg = JSON.parse(fs.readFileSync(path.join(d, 'config.json'), 'utf8'));
  fs.writeFileSync(path.join(d, 'config.json'), JSON.stringify({ ...cfg, intermediate_size: 170 }));
  t.throws(
    () => openModelDir(d),
    /model\.safetensors: tensor 'model\.layers\.0\.mlp\.gate_proj\.weight' has shape \[172, 64\] but config\.json implies \[170, 64\]/,
  );
  // Missing tensor
  fs.writeFileSync(path.join(d, 'config.json'), JSON.stringify({ ...cfg, num_hidden_layers: 3 }));
  t.throws(
    () => openModelDir(d),
    /model\.safetensors: 9 tensor\(s\) the config implies are missing: model\.layers\.2\./,
  );
  fs.writeFileSync(path.join(d, 'config.json'), JSON.stringify(cfg));

  // Index naming a tensor its shard does not have, and a path outside the dir
  const s = path.join(d, 's');
  writeRandomLlama(s, tiny, { seed: 1, shardBytes: 200_000 });
  const ip = path.join(s, 'model.safetensors.index.json');
  const idx = JSON.parse(fs.readFileSync(ip, 'utf8'));
  const f1 = idx.weight_map['lm_head.weight'];
  const wrong = Object.values(idx.weight_map).find((f) => f !== f1);
  fs.writeFileSync(ip, JSON.stringify({ ...idx, weight_map: { ...idx.weight_map, 'lm_head.weight': wrong } }));
  t.throws(
    () => openModelDir(s),
    new RegExp(`weight_map puts tensor 'lm_head\\.weight' in ${wrong}, but .*${wrong} has no such tensor`),
  );
  fs.writeFileSync(
    ip,
    JSON.stringify({ ...idx, weight_map: { ...idx.weight_map, 'lm_head.weight': '../x.safetensors' } }),
  );
  t.throws(() => openModelDir(s), /weight_map\['lm_head\.weight'\] must be a file name in the model directory/);

  // No weights at all
  const e = path.join(d, 'e');
  fs.mkdirSync(e);
  fs.copyFileSync(path.join(d, 'config.json'), path.join(e, 'config.json'));
  t.throws(() => openModelDir(e), /no model\.safetensors and no model\.safetensors\.index\.json/);

  // Integer weights are refused; extra tensors are listed
  const m = openModelDir(d);
  const tensors: Record<string, { dtype: 'F32' | 'I32'; shape: number[]; data: Float32Array | Int32Array }> = {};
  for (const n of m.tensorNames) tensors[n] = { dtype: 'F32', shape: m.info(n).shape, data: m.readF32(n) };
  tensors['model.layers.0.self_attn.rotary_emb.inv_freq'] = { dtype: 'F32', shape: [8], data: new Float32Array(8) };
  writeSafetensors(path.join(d, 'model.safetensors'), tensors);
  t.same(openModelDir(d).extraTensors, ['model.layers.0.self_attn.rotary_emb.inv_freq']);
  tensors['model.norm.weight'] = { dtype: 'I32', shape: [64], data: new Int32Array(64) };
  writeSafetensors(path.join(d, 'model.safetensors'), tensors);
  t.throws(
    () => openModelDir(d),
    /model\.safetensors: tensor 'model\.norm\.weight' is I32; weights must be F32, F16 or BF16/,
  );
  t.equal(openSafetensors(path.join(d, 'model.safetensors')).tensors.size, 22);
});
