// Generation with a KV cache: the native attention_decode op against a float64 reference, the
// decoder's logits at every step against a full recomputation of the whole sequence
// (StageProgram.logits), greedy and seeded sampling, adapters, stops, errors, and the CLI.
import t, { type Test } from 'tap';
import fs from 'node:fs';
import path from 'node:path';
import { makeModel } from '../../scripts/cli/make-model.js';
import { openSingleModel, type SingleModel } from '../../lib/model/single.js';
import { generate, KvCacheDecoder, sampleToken } from '../../lib/model/generate.js';
import { loadTokenizer } from '../../lib/data/tokenizer.js';
import { Rng } from '../../lib/rng.js';
import { assertClose, closeness, cpuDevice, randn } from '../support/helpers.js';
import { FIX, copyFixtureModel, inProcess, mlora } from './util.js';
import { fullLogits } from '../support/logits.js';
import { tmpDir } from '../support/files.js';
import { main } from '../../scripts/cli/generate.js';

// ---- the op

/** float64: query i (position length−nq+i) attends to cache rows 0..length−nq+i. */
function decodeRef(
  q: Float32Array,
  kc: Float32Array,
  vc: Float32Array,
  nq: number,
  length: number,
  hq: number,
  hkv: number,
  d: number,
  scale: number,
) {
  const out = new Float64Array(nq * hq * d);
  const group = hq / hkv;
  for (let i = 0; i < nq; i++)
    for (let h = 0; h < hq; h++) {
      const kh = Math.floor(h / group),
        last = length - nq + i;
      const s: number[] = [];
      for (let j = 0; j <= last; j++) {
        let dot = 0;
        for (let c = 0; c < d; c++) dot += q[(i * hq + h) * d + c]! * kc[(j * hkv + kh) * d + c]!;
        s.push(dot * scale);
      }
      const mx = Math.max(...s);
      const p = s.map((x) => Math.exp(x - mx));
      const z = p.reduce((a, b) => a + b, 0);
      for (let j = 0; j <= last; j++)
        for (let c = 0; c < d; c++) out[(i * hq + h) * d + c]! += (p[j]! / z) * vc[(j * hkv + kh) * d + c]!;
    }
  return out;
}

t.test(
  'attention_decode matches a float64 reference (nq, length, GQA shapes); rows past length are never read',
  async (t) => {
    const dev = cpuDevice(2);
    const rng = new Rng(11, 'decode');
    // [nq, length, capacity, heads, kvHeads, headDim, scale?]
    const shapes: Array<[number, number, number, number, number, number, number?]> = [
      [1, 1, 4, 4, 2, 8],
      [1, 17, 32, 4, 4, 16],
      [3, 9, 16, 8, 2, 8],
      [5, 5, 5, 6, 3, 4],
      [2, 40, 64, 4, 1, 32],
      [1, 300, 300, 2, 1, 64, 0.5],
      [7, 20, 24, 4, 2, 16],
    ];
    for (const [nq, length, cap, hq, hkv, d, scale] of shapes) {
      const q = randn(rng, nq * hq * d),
        kc = randn(rng, cap * hkv * d),
        vc = randn(rng, cap * hkv * d);
      kc.fill(NaN, length * hkv * d); // beyond length: poison
      vc.fill(NaN, length * hkv * d);
      const out = dev.alloc('f32', [nq, hq * d]);
      const T = (x: Float32Array, s: number[]) => dev.fromArray('f32', s, x);
      await dev.run([
        {
          op: 'attention_decode',
          out,
          q: T(q, [nq, hq * d]),
          kCache: T(kc, [cap, hkv * d]),
          vCache: T(vc, [cap, hkv * d]),
          length,
          heads: hq,
          kvHeads: hkv,
          ...(scale ? { scale } : {}),
        },
      ]);
      const want = decodeRef(q, kc, vc, nq, length, hq, hkv, d, scale ?? 1 / Math.sqrt(d));
      // f32 online softmax vs float64: outputs are convex mixes of N(0,1) values
      assertClose(
        t,
        out.read() as Float32Array,
        want,
        { atol: 2e-6, rtol: 1e-5 },
        `nq ${nq}, length ${length}/${cap}, heads ${hq}/${hkv}, d ${d}`,
      );
    }
  },
);

t.test('attention_decode: bad arguments name the argument', async (t) => {
  const dev = cpuDevice();
  const f = (s: number[]) => dev.alloc('f32', s);
  const hq = 4,
    hkv = 2,
    d = 8,
    nq = 2,
    cap = 10;
  const q = f([nq, hq * d]);
  const good = {
    op: 'attention_decode',
    out: f([nq, hq * d]),
    q,
    kCache: f([cap, hkv * d]),
    vCache: f([cap, hkv * d]),
    length: 5,
    heads: hq,
    kvHeads: hkv,
  } as const;
  await dev.run([good]);
  const cases: Array<[Record<string, unknown>, RegExp]> = [
    [{ heads: 0 }, /heads must be a positive multiple of kvHeads/],
    [{ kvHeads: 3 }, /heads must be a positive multiple of kvHeads/],
    [{ kvHeads: undefined }, /argument 'kvHeads'/],
    [{ length: undefined }, /argument 'length'/],
    [{ q: f([nq, hq * d + 1]) }, /argument 'q' must be \[nq, heads·headDim\], got \[2,33\]/],
    [{ out: f([nq, hkv * d]) }, /argument 'out' has shape \[2,16\], expected \[2,32\]/],
    [{ kCache: f([cap, hq * d]) }, /argument 'kCache' has shape \[10,32\]/],
    [{ vCache: f([cap - 1, hkv * d]) }, /argument 'vCache' has shape \[9,16\], expected \[10,16\]/],
    [{ vCache: dev.alloc('i32', [cap, hkv * d]) }, /argument 'vCache' has dtype i32, expected f32/],
    [{ length: 1 }, /length 1 must be in \[2, 10\] \(the cache capacity\)/],
    [{ length: 11 }, /length 11 must be in \[2, 10\]/],
    [{ out: q }, /arguments 'out' and 'q' overlap/],
  ];
  for (const [patch, re] of cases) {
    const op = { ...good, ...patch };
    t.throws(() => dev.runSync([op as never]), re, String(re));
  }
});

// ---- the decoder against a full recomputation

// f32 kernels summed in other orders (one row vs all rows, online vs blocked softmax)
const LOGIT_TOL = { atol: 2e-5, rtol: 1e-4 };

/** Feeds `chunks` in order; after each, the last logits vs the full recomputation of the prefix. */
async function checkSteps(t: Test, m: SingleModel, ids: number[], chunks: number[], label: string) {
  const dec = new KvCacheDecoder(m, ids.length + 3);
  let at = 0,
    worst = 0;
  try {
    for (const n of chunks) {
      const got = await dec.feed(ids.slice(at, at + n));
      at += n;
      t.equal(dec.length, at);
      const full = await fullLogits(m, ids.slice(0, at));
      const V = m.config.vocabSize;
      const want = full.subarray((at - 1) * V, at * V);
      const c = closeness(got, want, LOGIT_TOL);
      worst = Math.max(worst, c.maxAbs);
      if (c.worst > 1) assertClose(t, got, want, LOGIT_TOL, `${label}: step at length ${at}`);
    }
    t.pass(
      `${label}: ${chunks.length} steps to length ${at}, max |logit diff| ${worst.toExponential(2)} (atol ${LOGIT_TOL.atol}, rtol ${LOGIT_TOL.rtol})`,
    );
  } finally {
    dec.free();
  }
}

t.test('KV-cache logits equal a full recomputation at every step (tiny preset; fixture + adapter)', async (t) => {
  const dir = tmpDir(t, 'gen');
  await makeModel(dir, 'tiny', 3);
  const rng = new Rng(2, 'ids');
  const ids = Array.from({ length: 40 }, () => rng.int(512));
  const m = await openSingleModel(dir);
  await checkSteps(t, m, ids, [6, ...Array(20).fill(1), 3, 1, 10], 'tiny');
  m.free();
  const fix = copyFixtureModel(t);
  const base = await openSingleModel(fix);
  const ad = await openSingleModel(fix, path.join(FIX, 'adapter'));
  const ids2 = ids.map((x) => x % 256);
  await checkSteps(t, ad, ids2, [5, ...Array(15).fill(1), 4], 'fixture + adapter');
  const a = await fullLogits(ad, ids2.slice(0, 8)),
    b = await fullLogits(base, ids2.slice(0, 8));
  t.ok(closeness(a, b, { atol: 1e-3, rtol: 0 }).worst > 1, 'the adapter changes the logits');
  base.free();
  ad.free();
});

t.test('generate: greedy is deterministic and is the argmax of full recomputations; sampling is seeded', async (t) => {
  const dir = tmpDir(t, 'gen');
  await makeModel(dir, 'tiny', 4);
  const m = await openSingleModel(dir);
  t.teardown(() => m.free());
  const prompt = [1, 50, 60, 70, 80];
  const g1 = await generate(m, prompt, { maxNewTokens: 12 });
  const g2 = await generate(m, prompt, { maxNewTokens: 12 });
  t.same(g1, g2, 'greedy: same tokens twice');
  t.equal(g1.length, 12, 'max-new-tokens');
  const seq = [...prompt];
  for (let i = 0; i < 12; i++) {
    const V = m.config.vocabSize;
    const lg = await fullLogits(m, seq);
    seq.push(sampleToken(lg.subarray((seq.length - 1) * V), 0, new Rng(0)));
  }
  t.same(g1, seq.slice(prompt.length), 'greedy = argmax of full recomputations');
  const s1 = await generate(m, prompt, { maxNewTokens: 20, temperature: 1, seed: 9 });
  const s2 = await generate(m, prompt, { maxNewTokens: 20, temperature: 1, seed: 9 });
  const s3 = await generate(m, prompt, { maxNewTokens: 20, temperature: 1, seed: 10 });
  t.same(s1, s2, 'same seed: same sample');
  t.not(s1.join(','), s3.join(','), 'another seed: another sample');
  t.not(s1.join(','), g1.concat(Array(8).fill(-1)).join(','), 'sampling is not greedy');
  t.same(await generate(m, prompt, { maxNewTokens: 12, temperature: 1, topK: 1, seed: 5 }), g1, 'top-k 1 is greedy');
  const seen: number[] = [];
  const e = await generate(m, prompt, { maxNewTokens: 12, eosId: g1[3]!, onToken: (id) => seen.push(id) });
  t.same(e, g1.slice(0, 4), 'stops at (and includes) eos');
  t.same(seen, e, 'onToken sees every token');
  t.same(await generate(m, prompt, { maxNewTokens: 0 }), [], 'max-new-tokens 0');
  // the whole sequence stays within max_position_embeddings (512)
  const long = Array.from({ length: 508 }, (_, i) => 3 + (i % 400));
  const l = await generate(m, long, { maxNewTokens: 10 });
  t.ok(l.length >= 4 && long.length + l.length <= 513, `a prompt of 508 tokens gets ${l.length} more`);
});

t.test('sampleToken: seeded draws follow softmax(logits / T), restricted to the top k', async (t) => {
  const logits = Float32Array.from([1, 0, 2, -1]);
  for (const [T, k] of [
    [1, 0],
    [0.5, 0],
    [2, 2],
  ] as const) {
    const rng = new Rng(1, 'draws');
    const n = 20000,
      count = [0, 0, 0, 0];
    for (let i = 0; i < n; i++) count[sampleToken(logits, T, rng, k)]!++;
    const keep = k ? [0, 2] : [0, 1, 2, 3];
    const z = keep.reduce((s, i) => s + Math.exp(logits[i]! / T), 0);
    const p = [0, 1, 2, 3].map((i) => (keep.includes(i) ? Math.exp(logits[i]! / T) / z : 0));
    // 4 standard deviations of a binomial proportion at n = 20000 is < 0.015
    assertClose(
      t,
      count.map((c) => c / n),
      p,
      { atol: 0.015, rtol: 0 },
      `T ${T}, top-k ${k}`,
    );
  }
});

t.test('errors: prompt too long, cache capacity, bad tokens', async (t) => {
  const dir = tmpDir(t, 'gen');
  await makeModel(dir, 'tiny', 5);
  const m = await openSingleModel(dir);
  t.teardown(() => m.free());
  await t.rejects(generate(m, Array(512).fill(7), { maxNewTokens: 4 }), {
    message: 'the prompt has 512 tokens; the model takes 512',
  });
  await t.rejects(generate(m, [], { maxNewTokens: 4 }), { message: /the prompt is empty/ });
  await t.rejects(generate(m, [1, 600], { maxNewTokens: 4 }), {
    message: 'token id 600 is out of range for vocab_size 512',
  });
  t.throws(() => new KvCacheDecoder(m, 513), {
    message: 'a KV cache of 513 positions exceeds max_position_embeddings 512',
  });
  const dec = new KvCacheDecoder(m, 4);
  t.teardown(() => dec.free());
  await dec.feed([1, 2, 3]);
  await t.rejects(dec.feed([4, 5]), { message: 'the KV cache holds 4 positions; 5 needed' });
  t.equal(dec.length, 3, 'a refused feed changes nothing');
  await t.rejects(dec.feed([]), { message: /no tokens/ });
  await dec.feed([4]);
  t.equal(dec.length, 4);
});

t.test('the CLI: text, --json, adapter, errors', async (t) => {
  const dir = tmpDir(t, 'gen');
  await makeModel(dir, 'tiny', 6);
  const tok = loadTokenizer(dir);
  const r = mlora(['generate', '--model', dir, '--prompt', 'Once upon a time', '--max-new-tokens', '8']);
  t.equal(r.code, 0, r.err);
  t.match(r.out, /^Once upon a time/);
  t.match(r.err, /\(\d+ tokens in [\d.]+ s\)/);
  const j = mlora(['generate', '--model', dir, '--prompt', 'Once upon a time', '--max-new-tokens', '8', '--json']);
  t.equal(j.code, 0, j.err);
  const o = JSON.parse(j.out) as { prompt: string; completion: string; tokens: number[]; ms: number };
  t.equal(o.prompt, 'Once upon a time');
  t.ok(o.tokens.length >= 1 && o.tokens.length <= 8);
  t.equal(o.completion, tok.decode(o.tokens, { skipSpecialTokens: true }));
  t.equal(r.out, `Once upon a time${o.completion}\n`, 'text output = prompt + the same greedy completion');
  const m = await openSingleModel(dir);
  const lib = await generate(m, tok.encode('Once upon a time', { addSpecialTokens: true }), {
    maxNewTokens: 8,
    ...(tok.eosId !== undefined ? { eosId: tok.eosId } : {}),
  });
  m.free();
  t.same(o.tokens, lib, 'the CLI generates what the library does');
  const s = async (seed: string) =>
    JSON.parse(
      (
        await inProcess(
          main,
          '--model',
          dir,
          '--prompt',
          'Hi',
          '--max-new-tokens',
          '10',
          '--temperature',
          '1',
          '--seed',
          seed,
          '--json',
        )
      ).out,
    ).tokens as number[];
  t.same(await s('3'), await s('3'), 'same seed, same sample');
  t.not((await s('3')).join(), (await s('4')).join(), 'another seed, another sample');

  // a model dir without tokenizer.json
  const fix = copyFixtureModel(t);
  const noTok = await inProcess(main, '--model', fix, '--prompt', 'x');
  t.equal(noTok.code, 1);
  t.match(noTok.err, /tokenizer\.json/);
  // a tokenizer that does not belong to the model
  for (const f of ['tokenizer.json', 'tokenizer_config.json']) fs.copyFileSync(path.join(dir, f), path.join(fix, f));
  const mixed = await inProcess(main, '--model', fix, '--prompt', 'x');
  t.equal(mixed.code, 1);
  t.match(mixed.err, /tokenizer\.json has 512 tokens, more than the model's vocab_size 256/);
  // the fixture adapter has the tiny preset's projection shapes (only the vocab differs)
  const ad = await inProcess(
    main,
    '--model',
    dir,
    '--adapter',
    path.join(FIX, 'adapter'),
    '--prompt',
    'Once upon a time',
    '--max-new-tokens',
    '8',
    '--json',
  );
  t.equal(ad.code, 0, ad.err);
  t.not(
    (JSON.parse(ad.out).tokens as number[]).join(','),
    o.tokens.join(','),
    'the adapter changes the greedy completion',
  );

  // an empty prompt starts from BOS, also with a tokenizer whose template adds none
  const noBos = tmpDir(t, 'gen-nobos');
  fs.cpSync(dir, noBos, { recursive: true });
  const tj = JSON.parse(fs.readFileSync(path.join(noBos, 'tokenizer.json'), 'utf8')) as { post_processor: unknown };
  tj.post_processor = null;
  fs.writeFileSync(path.join(noBos, 'tokenizer.json'), JSON.stringify(tj));
  t.same(
    loadTokenizer(noBos).encode('', { addSpecialTokens: true }),
    [],
    'this tokenizer adds no BOS to an empty text',
  );
  const empty = (d: string) => mlora(['generate', '--model', d, '--prompt', '', '--max-new-tokens', '5', '--json']);
  const e1 = empty(dir),
    e2 = empty(noBos);
  t.equal(e1.code, 0, e1.err);
  t.equal(e2.code, 0, e2.err);
  t.same(JSON.parse(e2.out).tokens, JSON.parse(e1.out).tokens, 'both start from BOS and continue alike');
  const m2 = await openSingleModel(dir);
  t.same(
    JSON.parse(e1.out).tokens,
    await generate(m2, [tok.bosId!], { maxNewTokens: 5, eosId: tok.eosId! }),
    'what generation from BOS alone gives',
  );
  m2.free();

  for (const [args, re] of [
    [['--prompt', 'x'], /--model and --prompt are required/],
    [['--model', dir], /--model and --prompt are required/],
    [
      ['--model', dir, '--prompt', 'x', '--max-new-tokens', 'abc'],
      /--max-new-tokens must be a non-negative integer, got 'abc'/,
    ],
    [
      ['--model', dir, '--prompt', 'x', '--max-new-tokens', '2.5'],
      /--max-new-tokens must be a non-negative integer, got '2.5'/,
    ],
    [['--model', dir, '--prompt', 'x', '--top-k', '1.5'], /--top-k must be a non-negative integer/],
    [
      ['--model', dir, '--prompt', 'x', '--temperature', 'hot'],
      /--temperature must be a non-negative number, got 'hot'/,
    ],
    [['--model', dir, '--prompt', 'x', '--bogus'], /Unknown option '--bogus'/],
  ] as Array<[string[], RegExp]>) {
    const b = await inProcess(main, ...args);
    t.equal(b.code, 2, `${args.join(' ')}: usage error`);
    t.match(b.err, re);
  }
});
