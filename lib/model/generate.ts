// Text generation with a KV cache: the prompt is run once (prefill), then each new token
// runs the layers over one row, attending to the cached keys and values of all earlier
// positions (native op attention_decode). Greedy or temperature sampling, seeded. The layer
// variants of the families (q/k/v biases, q/k norms, a sliding window) run as in layer.ts.
// The cache keeps every position (a windowed layer reads only its last W rows).
import type { Tensor } from '../tensor.js';
import type { LoraSegmentArg, Op } from '../native.js';
import { LORA_TARGETS, layerWindow, type LoraTarget } from './config.js';
import { ADAPTER_ID, type SingleModel } from './single.js';
import { Rng } from '../rng.js';
import type { Tokenizer } from '../data/tokenizer.js';
import type { LlamaConfig } from './config.js';

export interface GenerateOptions {
  maxNewTokens: number;
  /** 0 = greedy. */
  temperature?: number;
  /** Sample only among the k most likely tokens (0 = all). */
  topK?: number;
  seed?: number;
  /** Stop at this token (default: the tokenizer's EOS, if given). */
  eosId?: number;
  onToken?: (id: number) => void;
}

export class KvCacheDecoder {
  private readonly caches: Array<{ k: Tensor; v: Tensor }> = [];
  length = 0;

  constructor(
    readonly m: SingleModel,
    readonly capacity: number,
  ) {
    const c = m.config;
    if (capacity > c.maxPositionEmbeddings)
      throw new Error(`a KV cache of ${capacity} positions exceeds max_position_embeddings ${c.maxPositionEmbeddings}`);
    const kvd = c.numKvHeads * c.headDim;
    for (let l = 0; l < c.numLayers; l++) {
      this.caches.push({ k: m.device.alloc('f32', [capacity, kvd]), v: m.device.alloc('f32', [capacity, kvd]) });
    }
  }

  /** Runs `ids` (the next positions) through the model; returns the logits of the last one. */
  async feed(ids: number[]): Promise<Float32Array> {
    const m = this.m;
    const c = m.config;
    const n = ids.length;
    if (!n) throw new Error('feed: no tokens');
    if (this.length + n > this.capacity)
      throw new Error(`the KV cache holds ${this.capacity} positions; ${this.length + n} needed`);
    for (const id of ids)
      if (!(id >= 0 && id < c.vocabSize))
        throw new Error(`token id ${id} is out of range for vocab_size ${c.vocabSize}`);
    const d = m.device;
    const H = c.hiddenSize,
      I = c.intermediateSize,
      qd = c.numHeads * c.headDim,
      kvd = c.numKvHeads * c.headDim;
    const owned: Tensor[] = [];
    const t = (shape: number[]) => {
      const x = d.alloc('f32', shape, { zero: false });
      owned.push(x);
      return x;
    };
    // views hold their storage until freed, so they are freed with the rest
    const rows = (x: Tensor, b: number, e: number) => {
      const v = x.rows(b, e);
      owned.push(v);
      return v;
    };
    const tokens = d.fromArray('i32', [n], Int32Array.from(ids));
    const pos = d.fromArray('i32', [n], Int32Array.from(ids.map((_, i) => this.length + i)));
    owned.push(tokens, pos);
    const x = t([n, H]),
      xn = t([n, H]),
      rstd = t([n]),
      q = t([n, qd]),
      k = t([n, kvd]),
      v = t([n, kvd]),
      ao = t([n, qd]);
    // q/k norms: the projections before the per-head norm, and the norm's rstd
    const qRaw = t([n, qd]),
      kRaw = t([n, kvd]),
      qkRstd = t([n * c.numHeads]);
    const reshaped = (x: Tensor, shape: number[]) => {
      const v = x.reshape(shape);
      owned.push(v);
      return v;
    };
    const hmid = t([n, H]),
      gate = t([n, I]),
      up = t([n, I]),
      act = t([n, I]),
      logits = t([1, c.vocabSize]),
      xf = t([1, H]),
      rstdf = t([1]);
    const adapter = m.hasAdapter ? m.program.adapter(ADAPTER_ID) : undefined;
    const xas = new Map<LoraTarget, Tensor>();
    if (adapter) for (const target of adapter.spec.targets) xas.set(target, t([n, adapter.spec.r]));
    const W = m.program.weights;
    const ops: Op[] = [{ op: 'embedding_forward', y: x, ids: tokens, table: W.embed! }];
    const proj = (
      layer: number,
      target: LoraTarget,
      y: Tensor,
      xin: Tensor,
      w: Tensor,
      accumulate = false,
      bias?: Tensor,
    ) => {
      ops.push({ op: 'linear_forward', y, x: xin, w, accumulate });
      if (bias) ops.push({ op: 'add_bias', y, b: bias });
      const mod = adapter?.module(layer, target);
      if (adapter && mod) {
        const seg: LoraSegmentArg = {
          rowStart: 0,
          rowEnd: n,
          a: mod.a,
          b: mod.b,
          scale: adapter.scale,
          dropout: 0,
          xa: xas.get(target)!,
        };
        ops.push({ op: 'lora_forward', y, x: xin, segments: [seg] });
      }
    };
    const { cos, sin } = m.program;
    for (let l = 0; l < c.numLayers; l++) {
      const L = W.layers[l]!;
      const cache = this.caches[l]!;
      ops.push({ op: 'rmsnorm_forward', y: xn, rstd, x, w: L.attnNorm, eps: c.rmsNormEps });
      proj(l, 'q_proj', L.qNorm ? qRaw : q, xn, L.q, false, L.qBias);
      proj(l, 'k_proj', L.kNorm ? kRaw : k, xn, L.k, false, L.kBias);
      proj(l, 'v_proj', v, xn, L.v, false, L.vBias);
      if (L.qNorm && L.kNorm) {
        ops.push({
          op: 'rmsnorm_forward',
          y: reshaped(q, [n, c.numHeads, c.headDim]),
          rstd: qkRstd,
          x: reshaped(qRaw, [n, c.numHeads, c.headDim]),
          w: L.qNorm,
          eps: c.rmsNormEps,
        });
        ops.push({
          op: 'rmsnorm_forward',
          y: reshaped(k, [n, c.numKvHeads, c.headDim]),
          rstd: rows(qkRstd, 0, n * c.numKvHeads),
          x: reshaped(kRaw, [n, c.numKvHeads, c.headDim]),
          w: L.kNorm,
          eps: c.rmsNormEps,
        });
      }
      ops.push({ op: 'rope_forward', y: q, x: q, pos, cos, sin, heads: c.numHeads });
      ops.push({ op: 'rope_forward', y: k, x: k, pos, cos, sin, heads: c.numKvHeads });
      ops.push({ op: 'copy', y: rows(cache.k, this.length, this.length + n), x: k });
      ops.push({ op: 'copy', y: rows(cache.v, this.length, this.length + n), x: v });
      ops.push({
        op: 'attention_decode',
        out: ao,
        q,
        kCache: cache.k,
        vCache: cache.v,
        length: this.length + n,
        heads: c.numHeads,
        kvHeads: c.numKvHeads,
        scale: 1 / Math.sqrt(c.headDim),
        window: layerWindow(c, l),
      });
      ops.push({ op: 'copy', y: hmid, x });
      proj(l, 'o_proj', hmid, ao, L.o, true);
      ops.push({ op: 'rmsnorm_forward', y: xn, rstd, x: hmid, w: L.mlpNorm, eps: c.rmsNormEps });
      proj(l, 'gate_proj', gate, xn, L.gate);
      proj(l, 'up_proj', up, xn, L.up);
      ops.push({ op: 'swiglu_forward', h: act, gate, up });
      ops.push({ op: 'copy', y: x, x: hmid });
      proj(l, 'down_proj', x, act, L.down, true);
    }
    ops.push({ op: 'rmsnorm_forward', y: xf, rstd: rstdf, x: rows(x, n - 1, n), w: W.norm!, eps: c.rmsNormEps });
    ops.push({ op: 'linear_forward', y: logits, x: xf, w: W.head! });
    try {
      await d.run(ops);
      this.length += n;
      return logits.read() as Float32Array;
    } finally {
      for (const o of owned) o.free(); // (the LoRA scratch in xas too)
    }
  }

  free(): void {
    for (const c of this.caches) {
      c.k.free();
      c.v.free();
    }
  }
}

/** Picks the next token from logits: argmax at temperature 0, else a seeded sample. */
export function sampleToken(logits: Float32Array, temperature: number, rng: Rng, topK = 0): number {
  if (!(temperature > 0)) {
    let best = 0;
    for (let i = 1; i < logits.length; i++) if (logits[i]! > logits[best]!) best = i;
    return best;
  }
  let idx = Array.from(logits.keys());
  if (topK > 0 && topK < logits.length) idx = idx.sort((a, b) => logits[b]! - logits[a]!).slice(0, topK);
  const mx = Math.max(...idx.map((i) => logits[i]!));
  const p = idx.map((i) => Math.exp((logits[i]! - mx) / temperature));
  let u = rng.uniform() * p.reduce((a, b) => a + b, 0);
  for (let j = 0; j < idx.length; j++) {
    u -= p[j]!;
    if (u <= 0) return idx[j]!;
  }
  return idx[idx.length - 1]!;
}

/**
 * A prompt's token ids as the model reads it: with the tokenizer's own special tokens (BOS
 * where it adds one) unless the text was already rendered by a chat template. An empty prompt
 * becomes the BOS token alone (the tokenizer's, else config.json bos_token_id), so generating
 * from nothing works the same whether or not the tokenizer's template adds a BOS.
 */
export function encodePrompt(
  tok: Tokenizer,
  config: Pick<LlamaConfig, 'bosTokenId'>,
  text: string,
  chat = false,
): number[] {
  const ids = tok.encode(text, { addSpecialTokens: !chat });
  if (ids.length) return ids;
  const bos = tok.bosId ?? config.bosTokenId;
  if (bos === undefined)
    throw new Error(
      `${tok.source}: the prompt is empty and the tokenizer has no BOS token (nor config.json bos_token_id) to start from`,
    );
  return [bos];
}

export async function generate(m: SingleModel, prompt: number[], o: GenerateOptions): Promise<number[]> {
  if (!prompt.length) throw new Error('generate: the prompt is empty');
  const capacity = Math.min(m.config.maxPositionEmbeddings, prompt.length + o.maxNewTokens);
  if (prompt.length >= m.config.maxPositionEmbeddings)
    throw new Error(`the prompt has ${prompt.length} tokens; the model takes ${m.config.maxPositionEmbeddings}`);
  const dec = new KvCacheDecoder(m, capacity);
  const rng = new Rng(o.seed ?? 0, 'sample');
  const out: number[] = [];
  try {
    let logits = await dec.feed(prompt);
    while (out.length < o.maxNewTokens && dec.length < capacity) {
      const id = sampleToken(logits, o.temperature ?? 0, rng, o.topK ?? 0);
      out.push(id);
      o.onToken?.(id);
      if (o.eosId !== undefined && id === o.eosId) break;
      if (dec.length >= capacity) break;
      logits = await dec.feed([id]);
    }
    return out;
  } finally {
    dec.free();
  }
}

export { LORA_TARGETS };
