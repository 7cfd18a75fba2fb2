// PEFT adapters: the reference adapter (written by PEFT) loads, save→load round-trips,
// names and shapes are PEFT's for a GQA model, a mismatched base model is a clear Error,
// and saving is atomic.
import t, { type Test } from 'tap';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import {
  adapterConfigJson,
  adapterMismatches,
  adapterParameterCount,
  checkAdapterAgainstModel,
  loadAdapter,
  loraTensorName,
  parseAdapterConfig,
  saveAdapter,
  type AdapterWeights,
  type LoraPair,
} from '../../lib/io/peft.js';
import { readModelConfig } from '../../lib/io/hf-config.js';
import { openSafetensors, writeSafetensors } from '../../lib/io/safetensors.js';
import { f32ToBf16 } from '../../lib/io/dtype.js';
import { LORA_TARGETS, PRESETS, projectionShape, type LlamaConfig, type LoraTarget } from '../../lib/model/config.js';
import { Rng } from '../../lib/rng.js';

const FIX = path.resolve('test/fixtures/llama-tiny');

function tmpdir(t: Test): string {
  const d = fs.mkdtempSync(path.join(os.tmpdir(), 'mlora-peft-'));
  t.teardown(() => fs.rmSync(d, { recursive: true, force: true }));
  return d;
}

function randomAdapter(c: LlamaConfig, r: number, targets: readonly LoraTarget[], seed = 3): AdapterWeights {
  const rng = new Rng(seed);
  const layers = Array.from({ length: c.numLayers }, () => {
    const l: Partial<Record<LoraTarget, LoraPair>> = {};
    for (const t of targets) {
      const [out, inn] = projectionShape(c, t);
      l[t] = { a: rng.fillNormal(new Float32Array(r * inn)), b: rng.fillNormal(new Float32Array(out * r)) };
    }
    return l;
  });
  return {
    r,
    loraAlpha: 16,
    loraDropout: 0.05,
    targetModules: [...targets],
    useRslora: false,
    baseModelNameOrPath: 'some/model',
    layers,
  };
}

t.test('the reference adapter (written by PEFT) loads and fits the reference model', async (t) => {
  const a = loadAdapter(path.join(FIX, 'adapter'));
  t.equal(a.r, 4);
  t.equal(a.loraAlpha, 8);
  t.equal(a.scaling, 2);
  t.same(a.targetModules, [...LORA_TARGETS]);
  t.equal(a.layers.length, 2);
  t.same(a.dtypes, { F32: 28 });
  const c = readModelConfig(path.join(FIX, 'model'));
  t.same(adapterMismatches(a, c), []);
  checkAdapterAgainstModel(a, c);
  const k = a.layers[1]!.k_proj!;
  t.equal(k.a.length, 4 * 64);
  t.equal(k.b.length, 32 * 4, 'GQA: k_proj B is [kvHeads·headDim, r]');
  const st = openSafetensors(path.join(FIX, 'adapter/adapter_model.safetensors'));
  t.same(
    Array.from(a.layers[0]!.down_proj!.b),
    Array.from(st.readF32('base_model.model.model.layers.0.mlp.down_proj.lora_B.weight')),
  );
  t.equal(adapterParameterCount(a), 9248);
});

t.test("save → load round-trips; names, shapes and config are PEFT's (GQA tiny preset)", async (t) => {
  const d = tmpdir(t);
  const c = PRESETS.tiny;
  const a = randomAdapter(c, 8, ['q_proj', 'k_proj', 'v_proj', 'down_proj']);
  const dir = path.join(d, 'ad');
  saveAdapter(dir, a);
  t.same(fs.readdirSync(dir).sort(), ['adapter_config.json', 'adapter_model.safetensors']);
  t.same(fs.readdirSync(d), ['ad'], 'no temp dirs left');
  const cfg = JSON.parse(fs.readFileSync(path.join(dir, 'adapter_config.json'), 'utf8'));
  t.match(cfg, {
    peft_type: 'LORA',
    task_type: 'CAUSAL_LM',
    r: 8,
    lora_alpha: 16,
    lora_dropout: 0.05,
    bias: 'none',
    use_rslora: false,
    target_modules: ['q_proj', 'k_proj', 'v_proj', 'down_proj'],
    base_model_name_or_path: 'some/model',
    fan_in_fan_out: false,
    inference_mode: true,
    init_lora_weights: true,
    layers_to_transform: null,
    modules_to_save: null,
    rank_pattern: {},
    alpha_pattern: {},
  });
  const st = openSafetensors(path.join(dir, 'adapter_model.safetensors'));
  t.same(st.metadata, { format: 'pt' });
  t.equal(st.tensors.size, 2 * 4 * 2);
  t.same(st.info('base_model.model.model.layers.1.self_attn.k_proj.lora_A.weight').shape, [8, 64]);
  t.same(
    st.info('base_model.model.model.layers.1.self_attn.k_proj.lora_B.weight').shape,
    [32, 8],
    'k_proj out = kvHeads·headDim = 32',
  );
  t.same(st.info('base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight').shape, [64, 8]);
  t.same(st.info('base_model.model.model.layers.0.mlp.down_proj.lora_A.weight').shape, [8, 172]);
  t.same(st.info('base_model.model.model.layers.0.mlp.down_proj.lora_B.weight').shape, [64, 8]);

  const b = loadAdapter(dir);
  t.equal(b.scaling, 2);
  t.same(b.targetModules, a.targetModules);
  let equal = 0,
    total = 0;
  a.layers.forEach((l, i) => {
    for (const [tg, p] of Object.entries(l)) {
      total++;
      const q = b.layers[i]![tg as LoraTarget]!;
      if (
        Buffer.compare(Buffer.from(q.a.buffer), Buffer.from(p!.a.buffer)) === 0 &&
        Buffer.compare(Buffer.from(q.b.buffer), Buffer.from(p!.b.buffer)) === 0
      )
        equal++;
    }
  });
  t.equal(equal, total, 'every A and B bit-identical');
  checkAdapterAgainstModel(b, c);

  // Saving again over it replaces it atomically; rsLoRA scaling.
  saveAdapter(dir, { ...a, useRslora: true, r: 8 });
  t.same(fs.readdirSync(d), ['ad']);
  t.equal(loadAdapter(dir).scaling, 16 / Math.sqrt(8));

  // bf16 storage loads as f32
  const h = path.join(d, 'half');
  saveAdapter(h, a, { dtype: 'bf16' });
  const hb = loadAdapter(h);
  t.same(hb.dtypes, { BF16: 16 });
  t.equal(
    hb.layers[0]!.q_proj!.a[0],
    new Float32Array(new Uint32Array([f32ToBf16([a.layers[0]!.q_proj!.a[0]!])[0]! << 16]).buffer)[0],
  );
});

t.test('an adapter for another base model is a clear Error naming tensor and both shapes', async (t) => {
  const a = loadAdapter(path.join(FIX, 'adapter'));
  const other: LlamaConfig = { ...readModelConfig(path.join(FIX, 'model')), numKvHeads: 4, intermediateSize: 176 };
  const m = adapterMismatches(a, other);
  t.ok(
    m.some(
      (l) =>
        l ===
        'base_model.model.model.layers.0.self_attn.k_proj.lora_B.weight: adapter [32, 4], model k_proj needs [64, 4] (out = 64)',
    ),
    'k_proj B',
  );
  t.ok(
    m.some((l) =>
      /layers\.1\.mlp\.down_proj\.lora_A\.weight: adapter \[4, 172\], model down_proj needs \[4, 176\]/.test(l),
    ),
    'down_proj A',
  );
  t.throws(
    () => checkAdapterAgainstModel(a, other, 'llama-other'),
    /adapter .*adapter does not fit llama-other \(10 mismatches\):\n {2}base_model\.model\.model\.layers\.0/,
  );
  const fewer: LlamaConfig = { ...readModelConfig(path.join(FIX, 'model')), numLayers: 1 };
  t.throws(() => checkAdapterAgainstModel(a, fewer), /weights for layer 1 but the model has 1 layers/);
});

t.test('PEFT variants load: adapter-name infix, F16 tensors, regex targets, layers_to_transform', async (t) => {
  const d = tmpdir(t);
  const ref = path.join(FIX, 'adapter');
  const st = openSafetensors(path.join(ref, 'adapter_model.safetensors'));
  const cfg = JSON.parse(fs.readFileSync(path.join(ref, 'adapter_config.json'), 'utf8'));
  const dir = path.join(d, 'v');
  fs.mkdirSync(dir);
  const tensors: Record<string, { dtype: 'BF16'; shape: number[]; data: Uint16Array }> = {};
  for (const [n, i] of st.tensors) {
    if (!n.includes('layers.1.') || !/q_proj|v_proj/.test(n)) continue;
    tensors[n.replace(/\.weight$/, '.default.weight')] = {
      dtype: 'BF16',
      shape: i.shape,
      data: f32ToBf16(st.readF32(n)),
    };
  }
  writeSafetensors(path.join(dir, 'adapter_model.safetensors'), tensors);
  fs.writeFileSync(
    path.join(dir, 'adapter_config.json'),
    JSON.stringify({ ...cfg, target_modules: '.*\\.(q_proj|v_proj)', layers_to_transform: [1] }),
  );
  const a = loadAdapter(dir);
  t.same(a.targetModules, ['q_proj', 'v_proj'], 'regex targets: the tensors decide');
  t.same(
    a.layers.map((l) => Object.keys(l).sort()),
    [[], ['q_proj', 'v_proj']],
  );
  t.same(a.dtypes, { BF16: 4 });
  checkAdapterAgainstModel(a, readModelConfig(path.join(FIX, 'model')));
  // Saved canonically, with layers_to_transform telling PEFT which layers have LoRA.
  const out = path.join(d, 'canon');
  saveAdapter(out, a);
  t.ok(
    openSafetensors(path.join(out, 'adapter_model.safetensors')).tensors.has(
      'base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight',
    ),
  );
  t.same(JSON.parse(fs.readFileSync(path.join(out, 'adapter_config.json'), 'utf8')).layers_to_transform, [1]);
  t.same(loadAdapter(out).layers[1]!.v_proj!.b, a.layers[1]!.v_proj!.b);
});

t.test('bad adapters are clear Errors naming file and field or tensor', async (t) => {
  const base = adapterConfigJson(randomAdapter(PRESETS.tiny, 2, ['q_proj']));
  const cases: Array<[string, Record<string, unknown>, RegExp]> = [
    ['peft_type', { ...base, peft_type: 'IA3' }, /field 'peft_type' must be "LORA", got "IA3"/],
    ['r', { ...base, r: 0 }, /field 'r' must be a positive integer, got 0/],
    ['alpha', { ...base, lora_alpha: 'x' }, /field 'lora_alpha' must be a positive number/],
    ['rank_pattern', { ...base, rank_pattern: { q_proj: 4 } }, /field 'rank_pattern' is .*not supported/],
    ['alpha_pattern', { ...base, alpha_pattern: { q_proj: 4 } }, /field 'alpha_pattern' is .*not supported/],
    ['dora', { ...base, use_dora: true }, /field 'use_dora' is true/],
    ['bias', { ...base, bias: 'all' }, /field 'bias' is "all"/],
    ['target', { ...base, target_modules: ['q_proj', 'lm_head'] }, /field 'target_modules' has "lm_head"/],
    ['modules_to_save', { ...base, modules_to_save: ['lm_head'] }, /field 'modules_to_save'/],
    ['task', { ...base, task_type: 'SEQ_CLS' }, /field 'task_type' must be "CAUSAL_LM"/],
  ];
  for (const [label, json, re] of cases)
    t.throws(
      () => parseAdapterConfig(json, 'x/adapter_config.json'),
      new RegExp(`x/adapter_config\\.json: ${re.source}`),
      label,
    );
  t.same(parseAdapterConfig({ ...base, target_modules: ['model.layers.0.self_attn.q_proj', 'up_proj'] }).targets, [
    'q_proj',
    'up_proj',
  ]);

  const d = tmpdir(t);
  const dir = path.join(d, 'bad');
  fs.mkdirSync(dir);
  t.throws(() => loadAdapter(dir), /bad\/adapter_config\.json: cannot read: no such file/);
  fs.writeFileSync(path.join(dir, 'adapter_config.json'), JSON.stringify(base));
  t.throws(() => loadAdapter(dir), /bad\/adapter_model\.safetensors: no such file/);
  const A = loraTensorName(0, 'q_proj', 'A');
  const B = loraTensorName(0, 'q_proj', 'B');
  const w = (ts: Record<string, number[]>) =>
    writeSafetensors(
      path.join(dir, 'adapter_model.safetensors'),
      Object.fromEntries(
        Object.entries(ts).map(([n, s]) => [
          n,
          { dtype: 'F32' as const, shape: s, data: new Float32Array(s[0]! * s[1]!) },
        ]),
      ),
    );
  w({ [A]: [2, 64] });
  t.throws(() => loadAdapter(dir), /layer 0 q_proj has lora_A but no lora_B/);
  w({ [A]: [3, 64], [B]: [64, 2] });
  t.throws(
    () => loadAdapter(dir),
    new RegExp(`tensor '${A.replace(/\./g, '\\.')}' has shape \\[3, 64\\] but lora_A must be \\[r, in\\] with r = 2`),
  );
  w({ [A]: [2, 64], [B]: [64, 2], 'base_model.model.lm_head.lora_A.weight': [2, 64] });
  t.throws(
    () => loadAdapter(dir),
    /tensor 'base_model\.model\.lm_head\.lora_A\.weight' is not a LoRA factor of a LLaMA projection/,
  );
  w({
    [A]: [2, 64],
    [B]: [64, 2],
    [loraTensorName(0, 'k_proj', 'A')]: [2, 64],
    [loraTensorName(0, 'k_proj', 'B')]: [32, 2],
  });
  t.throws(() => loadAdapter(dir), /is for k_proj, which target_modules in .* does not list/);
  w({ [A]: [2, 64], 'base_model.model.model.layers.0.mlp.q_proj.lora_B.weight': [64, 2] });
  t.throws(() => loadAdapter(dir), /mlp\.q_proj is not a LLaMA projection/);

  // saveAdapter refuses to replace a directory holding other things, and bad weights leave nothing behind
  const busy = path.join(d, 'busy');
  fs.mkdirSync(busy);
  fs.writeFileSync(path.join(busy, 'notes.txt'), 'mine');
  t.throws(
    () => saveAdapter(busy, randomAdapter(PRESETS.tiny, 2, ['q_proj'])),
    /busy: holds files that are not part of an adapter \(notes\.txt\); not replacing it/,
  );
  const bad = randomAdapter(PRESETS.tiny, 2, ['q_proj']);
  bad.layers[0]!.q_proj!.a = new Float32Array(5);
  t.throws(
    () => saveAdapter(path.join(d, 'x'), bad),
    /layer 0 q_proj: A has 5 and B 128 elements, not non-zero multiples of r = 2/,
  );
  t.same(fs.readdirSync(d).sort(), ['bad', 'busy'], 'no temp dirs left');
});
