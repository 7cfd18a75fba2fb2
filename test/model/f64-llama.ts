// An independent float64 LLaMA + LoRA forward in plain JavaScript (the loss of a packed batch
// of variable-length sequences), the oracle of the whole-model tests: test/model/reference.test.ts
// (the llama-tiny fixture) and test/model/stories.test.ts (the real stories260K weights), for
// losses and, by central differences, LoRA gradients. Also the micro-batch those tests feed to
// a StageProgram, packed as the supervisor packs one.
import type { Device, Tensor } from '../../lib/tensor.js';
import type { MicroBatch } from '../../lib/model/batch.js';
import type { LoraSpec } from '../../lib/lora/adapter.js';
import { toPeftTensors } from '../../lib/lora/state.js';
import type { LlamaConfig, LoraTarget } from '../../lib/model/config.js';
import { assemble } from '../../actors/scheduler/assemble.js';

export type F64Lora = Map<string, { a: Float64Array; b: Float64Array }>;

/** The LoRA factors of a flat adapter vector (the layout of StageAdapter), keyed `layer.target`. */
export function f64Lora(config: LlamaConfig, spec: LoraSpec, vals: Float64Array): F64Lora {
  const m: F64Lora = new Map();
  for (const [name, v] of toPeftTensors(config, spec, vals as unknown as Float32Array)) {
    const mm = /layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_([AB])/.exec(name)!;
    const key = `${mm[1]}.${mm[2]}`;
    const e = m.get(key) ?? { a: new Float64Array(), b: new Float64Array() };
    if (mm[3] === 'A') e.a = v.data as unknown as Float64Array;
    else e.b = v.data as unknown as Float64Array;
    m.set(key, e);
  }
  return m;
}

/** Sequences (token ids, labels with -100 = ignored) packed into one micro-batch of adapter 1. */
export function packedBatch(d: Device, id: number, seqs: Array<{ ids: number[]; labels: number[] }>) {
  const ids = seqs.flatMap((s) => s.ids);
  const labels = seqs.flatMap((s) => s.labels);
  const N = ids.length;
  const cu = [0];
  for (const s of seqs) cu.push(cu[cu.length - 1]! + s.ids.length);
  const positions = seqs.flatMap((s) => [...s.ids.keys()]);
  // the label of a position is the next token; the first label of each sequence is never a target
  const count = seqs.reduce((a, s) => a + s.labels.slice(1).filter((l) => l !== -100).length, 0);
  const data = assemble(
    id,
    [
      {
        adapter: 1,
        serial: 0,
        mb: {
          step: 0,
          microIndex: 0,
          microCount: 1,
          inputIds: Int32Array.from(ids),
          labels: Int32Array.from(labels),
          cuSeqlens: Int32Array.from(cu),
          positions: Int32Array.from(positions),
          numTokens: N,
          numTargetTokens: count,
          stepTargetTokens: count,
          lastOfStep: true,
        },
      },
    ],
    N,
  );
  const mb: MicroBatch = {
    id,
    numTokens: N,
    segments: data.segments,
    tensors: {
      positions: d.fromArray('i32', [N], data.positions),
      cuSeqlens: d.fromArray('i32', [cu.length], data.cuSeqlens),
      targets: d.fromArray('i32', [N], data.targets),
      weights: d.fromArray('f32', [N], data.weights),
    },
  };
  const tokens: Tensor = d.fromArray('i32', [N], data.tokens);
  return {
    mb,
    tokens,
    count,
    ids,
    targets: Array.from(data.targets),
    seqs: cu.slice(0, -1).map((b, i) => [b, cu[i + 1]!]),
  };
}

/**
 * Mean cross-entropy over the target rows of a packed batch, all in float64. `W` gives a base
 * tensor by HF name; `lora` the adapter's factors (scaled by `scale`); `seqs` [begin, end) of
 * each sequence; `targets[r]` the token row r predicts (-1 or -100: none).
 */
export function f64Forward(
  c: LlamaConfig,
  W: (n: string) => Float64Array,
  lora: Map<string, { a: Float64Array; b: Float64Array }>,
  scale: number,
  ids: number[],
  seqs: number[][],
  targets: number[],
): number {
  const H = c.hiddenSize,
    d = c.headDim,
    hq = c.numHeads,
    hkv = c.numKvHeads,
    I = c.intermediateSize;
  const N = ids.length;
  const mat = (x: Float64Array, w: Float64Array, rows: number, inD: number, outD: number) => {
    const y = new Float64Array(rows * outD);
    for (let r = 0; r < rows; r++)
      for (let o = 0; o < outD; o++) {
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
  seqs.forEach(([b, e], s) => {
    for (let i = b!; i < e!; i++) {
      pos[i] = i - b!;
      seqOf[i] = s;
    }
  });
  const rope = (x: Float64Array, heads: number) => {
    for (let r = 0; r < N; r++)
      for (let h = 0; h < heads; h++)
        for (let i = 0; i < d / 2; i++) {
          const f = pos[r]! / Math.pow(c.ropeTheta, (2 * i) / d);
          const o = (r * heads + h) * d;
          const a = x[o + i]!,
            b = x[o + i + d / 2]!;
          x[o + i] = a * Math.cos(f) - b * Math.sin(f);
          x[o + i + d / 2] = b * Math.cos(f) + a * Math.sin(f);
        }
  };
  const emb = W('model.embed_tokens.weight');
  let x = new Float64Array(N * H);
  ids.forEach((id, r) => x.set(emb.subarray(id * H, (id + 1) * H), r * H));
  for (let l = 0; l < c.numLayers; l++) {
    const xn = norm(x, W(`model.layers.${l}.input_layernorm.weight`));
    const q = proj(xn, l, 'q_proj', H, hq * d),
      k = proj(xn, l, 'k_proj', H, hkv * d),
      v = proj(xn, l, 'v_proj', H, hkv * d);
    rope(q, hq);
    rope(k, hkv);
    const ao = new Float64Array(N * hq * d);
    for (let r = 0; r < N; r++)
      for (let h = 0; h < hq; h++) {
        const kh = Math.floor(h / (hq / hkv));
        const js: number[] = [];
        for (let j = 0; j <= r; j++) if (seqOf[j] === seqOf[r]) js.push(j);
        const sc = js.map((j) => {
          let s = 0;
          for (let i = 0; i < d; i++) s += q[(r * hq + h) * d + i]! * k[(j * hkv + kh) * d + i]!;
          return s / Math.sqrt(d);
        });
        const m = Math.max(...sc);
        const p = sc.map((s) => Math.exp(s - m));
        const z = p.reduce((a, b) => a + b, 0);
        js.forEach((j, n) => {
          for (let i = 0; i < d; i++) ao[(r * hq + h) * d + i]! += (p[n]! / z) * v[(j * hkv + kh) * d + i]!;
        });
      }
    const o = proj(ao, l, 'o_proj', hq * d, H);
    const hmid = x.map((xv, i) => xv + o[i]!);
    const xn2 = norm(hmid, W(`model.layers.${l}.post_attention_layernorm.weight`));
    const g = proj(xn2, l, 'gate_proj', H, I),
      u = proj(xn2, l, 'up_proj', H, I);
    const act = g.map((gv, i) => (gv / (1 + Math.exp(-gv))) * u[i]!);
    const dn = proj(act, l, 'down_proj', I, H);
    x = hmid.map((hv, i) => hv + dn[i]!);
  }
  const xf = norm(x, W('model.norm.weight'));
  const logits = mat(xf, W(c.tieWordEmbeddings ? 'model.embed_tokens.weight' : 'lm_head.weight'), N, H, c.vocabSize);
  let sum = 0,
    cnt = 0;
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
