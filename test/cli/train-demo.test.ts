// The embedded demo, as a new user runs it (`mlora train` with no config), in fast mode: four
// adapters fine-tuning the shipped stories260K on the story datasets over two CPU stages. Every
// adapter's training loss goes down, its held-out loss ends clearly below the base model's, and
// every output a user is promised is there and well-formed, including the greedy samples
// before and after training.
import t from 'tap';
import fs from 'node:fs';
import path from 'node:path';
import { loadAdapter } from '../../lib/io/peft.js';
import { listCheckpoints } from '../../lib/io/checkpoint.js';
import { mlora, readMetrics } from './util.js';
import { STORIES260K as MODEL, STORY_DATA as STORIES } from '../support/files.js';
import { evaluateDataset } from '../../scripts/cli/eval.js';
import { loadTokenizer } from '../../lib/data/tokenizer.js';
import { openSingleModel } from '../../lib/model/single.js';
import { generate } from '../../lib/model/generate.js';

const NAMES = ['robot', 'sea', 'rhyme', 'dialogue'];
const PROMPTS: Record<string, string> = {
  robot: 'Once upon a time,',
  sea: 'Once upon a time,',
  rhyme: 'Once upon a time,',
  dialogue: 'Mom:',
};

/** The base model's greedy continuation of a prompt, as long as the fast demo's samples (24 tokens). */
async function baseSample(prompt: string): Promise<string> {
  const tok = loadTokenizer(MODEL);
  const m = await openSingleModel(MODEL);
  try {
    const ids = tok.encode(prompt, { addSpecialTokens: true });
    return tok.decodeAfter(ids, await generate(m, ids, { maxNewTokens: 24, eosId: tok.eosId! }), {
      skipSpecialTokens: true,
    });
  } finally {
    m.free();
  }
}

t.test('mlora train --fast: the demo end to end', async (t) => {
  const dir = t.testdir();
  const out = path.join(dir, 'out');
  const r = mlora(['train', '--fast', '--output', out, '--devices', 'cpu:0,cpu:1', '--threads', '1']);
  t.equal(r.code, 0, r.err);
  t.match(
    r.out,
    /fine-tuning stories260K \(.*data\/models\/stories260K\) with 4 adapters on data\/demo\/stories\/ \(robot, sea, rhyme, dialogue\)/,
  );
  t.match(
    r.out,
    /stage 0 on cpu:0: (?:layers 0-\d|layer 0 to the attention of layer \d) \+ embedding(?: \+ norm\/head\/loss of \d+% of the targeted rows \(training\))?\nstage 1 on cpu:1: (?:layers \d-4|the MLP of layer \d to layer 4) \+ norm\/head\/loss/,
  );
  for (const n of NAMES)
    t.match(r.out, new RegExp(`\\n${n} +done +8/8 +\\d+\\.\\d{4} `), `${n}: a row in the summary table`);
  t.match(r.out, /overall: \d+ tokens in [\d.]+ s = \d+ tokens\/s; bubble ratio [\d.]+%/);

  const recs = readMetrics(out);
  // the summary's bubble ratio, with what it is made of
  const pipe = recs.filter((x) => x.type === 'pipeline');
  t.equal(pipe.length, 1, 'one pipeline record');
  const busy = pipe[0]?.busy as number[] | undefined;
  const evalBusy = pipe[0]?.eval_busy as number[] | undefined;
  t.ok(
    busy?.length === 2 &&
      evalBusy?.length === 2 &&
      busy.every((b, s) => b > 0 && b <= 1 && evalBusy[s]! >= 0 && evalBusy[s]! <= b) &&
      Math.abs((pipe[0]!.bubble as number) - (1 - (busy[0]! + busy[1]!) / 2)) < 2e-3,
    `busy ${JSON.stringify(busy)} (evaluation ${JSON.stringify(evalBusy)}), bubble ${String(pipe[0]?.bubble)} = 1 − mean busy`,
  );
  const printed = Number(/bubble ratio ([\d.]+)%/.exec(r.out)?.[1]);
  t.ok(Math.abs(printed - 100 * (pipe[0]?.bubble as number)) <= 0.06, `the summary prints it (${printed}%)`);
  const steps = recs.filter((x) => x.type === 'step');
  t.equal(steps.length, 4 * 8, 'one step record per adapter step');
  for (const s of steps) {
    t.ok(
      typeof s.time === 'string' &&
        !Number.isNaN(Date.parse(s.time)) &&
        Number.isFinite(s.loss) &&
        Number.isFinite(s.lr) &&
        Number.isFinite(s.gradNorm) &&
        Number.isInteger(s.tokens) &&
        Number.isInteger(s.step),
      `record ${String(s.adapter)} step ${String(s.step)} has time, loss, lr, tokens, gradNorm`,
    );
  }
  for (const n of NAMES) {
    const mine = steps.filter((x) => x.adapter === n);
    const loss = mine.map((x) => x.loss as number);
    t.same(
      mine.map((x) => x.step),
      [1, 2, 3, 4, 5, 6, 7, 8],
      `${n}: steps 1..8 in order`,
    );
    t.ok(loss.at(-1)! < loss[0]!, `${n}: loss goes down, ${loss[0]!.toFixed(4)} → ${loss.at(-1)!.toFixed(4)}`);
    const mean = (a: number[]) => a.reduce((x, y) => x + y, 0) / a.length;
    t.ok(mean(loss.slice(-2)) < mean(loss.slice(0, 2)), `${n}: mean of the last two steps below the first two`);
    t.ok(
      mine.every((x, i) => i === 0 || (x.tokens as number) > (mine[i - 1]!.tokens as number)),
      `${n}: tokens grow`,
    );
    t.ok(
      recs.some((x) => x.type === 'done' && x.adapter === n && x.steps === 8),
      `${n}: a done record`,
    );
    t.ok(
      recs.some((x) => x.type === 'checkpoint' && x.adapter === n && x.step === 4),
      `${n}: a checkpoint record at step 4`,
    );
    // held-out: the demo's eval split before the first step (the base model: B = 0) and after the
    // last, against mlora eval of the base model on the same split
    const ev = recs.filter((x) => x.type === 'eval' && x.adapter === n);
    t.same(
      ev.map((x) => x.step),
      [0, 8],
      `${n}: eval records before step 1 and after step 8`,
    );
    const base = await evaluateDataset({
      model: MODEL,
      data: path.join(STORIES, `${n}.eval.jsonl`),
      seqLen: 256,
      batchTokens: 4096,
    });
    t.ok(
      ev.every((x) => x.tokens === base.tokens),
      `${n}: the eval covers the whole held-out split`,
    );
    t.ok(
      Math.abs((ev[0]!.loss as number) - base.loss) < 1e-5,
      `${n}: the step-0 eval is the base model's (${(ev[0]!.loss as number).toFixed(6)} vs ${base.loss.toFixed(6)})`,
    );
    t.ok(
      (ev[1]!.loss as number) < base.loss - 0.15,
      `${n}: held-out loss ${base.loss.toFixed(4)} (base) → ${(ev[1]!.loss as number).toFixed(4)} after 8 steps`,
    );
    // greedy samples of the demo prompt: before = the base model's own continuation, after = changed
    const sm = recs.filter((x) => x.type === 'sample' && x.adapter === n);
    t.same(
      sm.map((x) => [x.when, x.step, x.prompt]),
      [
        ['before', 0, PROMPTS[n]],
        ['after', 8, PROMPTS[n]],
      ],
      `${n}: a sample before and after`,
    );
    t.equal(
      sm[0]!.text,
      await baseSample(PROMPTS[n]!),
      `${n}: the sample before training is the base model's greedy continuation`,
    );
    t.not(sm[1]!.text, sm[0]!.text, `${n}: training changed the greedy sample: ${JSON.stringify(sm[1]!.text)}`);
    t.match(
      r.out,
      new RegExp(
        `\\[${n}\\] greedy samples\\n  prompt ${JSON.stringify(PROMPTS[n]).replace(/[.*+?^${}()|[\]\\]/g, '\\$&')}\\n    before \\(step 0\\): .*\\n    after  \\(step 8\\): `,
      ),
      `${n}: samples in the summary`,
    );

    // The PEFT adapter: loads, matches the demo's settings, trained (B no longer zero).
    const ad = loadAdapter(path.join(out, n));
    const pairs = ad.layers.flatMap((l) => Object.values(l));
    t.equal(ad.layers.length, 5, `${n}: PEFT adapter over all five layers`);
    t.equal(pairs.length, 5 * ad.targetModules.length, `${n}: one A/B pair per layer and target`);
    t.ok(
      pairs.every((p) => p.b.some((v) => v !== 0)),
      `${n}: every B was trained away from zero`,
    );
    const cks = listCheckpoints(path.join(out, n));
    t.same(
      cks.map((c) => [c.step, c.complete]),
      [[4, true]],
      `${n}: one complete checkpoint, at step 4`,
    );
    t.same(
      loadAdapter(cks[0]!.dir).targetModules,
      ad.targetModules,
      `${n}: the checkpoint is itself a loadable PEFT adapter`,
    );
  }
  const demoR = { robot: 8, sea: 4, rhyme: 16, dialogue: 8 } as const;
  for (const n of NAMES)
    t.equal(loadAdapter(path.join(out, n)).r, demoR[n as keyof typeof demoR], `${n}: r as configured`);

  const html = fs.readFileSync(path.join(out, 'report.html'), 'utf8');
  t.match(html, /^<!doctype html>/);
  t.match(html, /<\/html>$/);
  t.match(html, /<h2>Training loss<\/h2><figure><svg data-chart="loss"/);
  t.match(html, /<h2>Stage utilisation over time<\/h2><figure class="wide"><svg data-chart="stages"/);
  const loss = /<svg data-chart="loss".*?<\/svg>/.exec(html)?.[0] ?? '';
  t.same(
    [...loss.matchAll(/<g data-series="([^"]+)"><title>[^<]*<\/title><polyline /g)].map((m) => m[1]).sort(),
    [...NAMES].sort(),
    'one loss curve per adapter',
  );
  // (test/cli/report.test.ts checks every chart in a browser)
});

t.test('--dry-run prints the split, memory per stage and admission order, and trains nothing', async (t) => {
  const dir = t.testdir();
  const out = path.join(dir, 'out');
  const r = mlora(['train', '--fast', '--dry-run', '--output', out, '--devices', 'cpu:0,cpu:1', '--memory', '1GiB']);
  t.equal(r.code, 0, r.err);
  t.match(r.out, /model .*stories260K: 5 layers, hidden 64, 8\/4 heads, vocab 512/);
  t.match(
    r.out,
    /stage 0 on cpu:0: (?:layers 0-\d|layer 0 to the attention of layer \d) \+ embedding(?: \+ norm\/head\/loss of \d+% of the targeted rows \(training\))?\nstage 1 on cpu:1: (?:layers \d-4|the MLP of layer \d to layer 4) \+ norm\/head\/loss/,
  );
  t.match(
    r.out,
    /\nsplit costs: measured on this machine over a step of 4 adapters \(5 micro-batches, ~\d+ tokens; sequences of ~\d+ tokens, \d+% of the rows targeted \(sampled from the data\)\): a layer's attention [\d.]+ ms, its MLP [\d.]+ ms, the head [\d.]+ ms\n/,
  );
  t.match(r.out, /memory per stage \(largest planned micro-batch: \d+ tokens from \d adapter\(s\), 8 in flight\):/);
  for (const s of [0, 1]) {
    t.match(
      r.out,
      new RegExp(
        `  stage ${s} cpu:${s} \\(\\d+ threads?\\): base [\\d.]+ [KM]iB \\(linears [\\d.]+ KiB f32, rest [\\d.]+ KiB, GEMM panels [\\d.]+ [KM]iB\\), adapters [\\d.]+ [KM]iB, activations [\\d.]+ [KM]iB × 2, scratch [\\d.]+ [KM]iB; total [\\d.]+ [KM]iB of 1(\\.0)? GiB, headroom [\\d.]+ MiB`,
      ),
    );
  }
  t.match(r.out, /admission order: robot, sea, rhyme, dialogue/);
  t.match(r.out, /estimated throughput: ~\d+ tokens\/s/);
  t.notMatch(r.out, /step 1\//, 'no training step');
  t.notOk(fs.existsSync(out), 'nothing written to the output folder');
});

t.test(
  'the full demo config (not run by the tests: minutes) is valid: every path exists, every adapter has held-out data',
  async (t) => {
    const { demoConfig, DEMO_MODEL } = await import('../../scripts/cli/train-demo.js');
    const { checkPaths } = await import('../../scripts/cli/train-config.js');
    const { parseTrainConfig } = await import('../../lib/config.js');
    for (const fast of [false, true]) {
      const cfg = parseTrainConfig(demoConfig(DEMO_MODEL, '/nonexistent/out', fast), 'demo config');
      t.doesNotThrow(() => checkPaths(cfg, 'demo config'), `fast=${fast}: every path exists`);
      t.same(
        cfg.adapters.map((a) => a.name),
        NAMES,
      );
      for (const a of cfg.adapters) {
        t.equal(a.eval?.data, path.join(STORIES, `${a.name}.eval.jsonl`), `fast=${fast} ${a.name}: held-out split`);
        t.equal(a.max_steps, fast ? 8 : 60);
      }
    }
  },
);
