// eval in a training run: the held-out loss before the first step (step 0), every `every`
// steps and after the last; greedy completions of eval.prompts before training and after it,
// each equal to what `mlora generate` prints for the base model (a fresh adapter adds exactly
// zero: B starts at 0) and for the finished adapter. The summary shows before -> after.
import t from 'tap';
import path from 'node:path';
import { mlora, readMetrics, smallConfig, writeJson } from './util.js';
import { tinyModelIn } from '../support/models.js';
import { DEMO_DATA } from '../support/files.js';

t.test(
  'eval at step 0 and after the last step; greedy samples before and after, as mlora generate makes them',
  async (t) => {
    const dir = t.testdir();
    const model = await tinyModelIn(path.join(dir, 'model'));
    const out = path.join(dir, 'out');
    const cfg = smallConfig(model, out, { steps: 4, saveEvery: 2 });
    const prompts = ['The capital of France is', ''];
    const adapters: Array<Record<string, unknown>> = cfg.adapters.map((a) => ({ ...a }));
    adapters[0]!.eval = { data: path.join(DEMO_DATA, 'capitals.jsonl'), every: 3, prompts, max_new_tokens: 6 };
    adapters[0]!.optimizer = { lr: 3e-2 }; // enough to change the greedy text in 4 steps
    const r = mlora(['train', writeJson(path.join(dir, 'c.json'), { ...cfg, adapters })]);
    t.equal(r.code, 0, r.err);
    const recs = readMetrics(out);
    const evals = recs.filter((x) => x.type === 'eval' && x.adapter === 'capitals');
    t.same(
      evals.map((e) => e.step),
      [0, 3, 4],
      'eval before the first step, at every 3rd and after the last',
    );
    t.same(
      recs.filter((x) => x.type === 'eval' && x.adapter === 'arithmetic'),
      [],
      'no eval for an adapter without one',
    );
    t.ok(
      (evals[2]!.loss as number) < (evals[0]!.loss as number),
      `held-out loss went down: ${String(evals[0]!.loss)} -> ${String(evals[2]!.loss)}`,
    );
    t.match(
      r.out,
      new RegExp(
        `capitals +done +4/4 +[\\d.]+ +${(evals[0]!.loss as number).toFixed(4)} -> ${(evals[2]!.loss as number).toFixed(4)}`,
      ),
      'the summary shows before -> after',
    );

    const samples = recs.filter((x) => x.type === 'sample');
    t.same(
      samples.map((s) => [s.adapter, s.when, s.step, s.prompt]),
      [
        ['capitals', 'before', 0, prompts[0]],
        ['capitals', 'before', 0, prompts[1]],
        ['capitals', 'after', 4, prompts[0]],
        ['capitals', 'after', 4, prompts[1]],
      ],
      'one sample per prompt before and after, in order',
    );
    const gen = (prompt: string, adapter?: string) => {
      const g = mlora([
        'generate',
        '--model',
        model,
        ...(adapter ? ['--adapter', adapter] : []),
        '--prompt',
        prompt,
        '--max-new-tokens',
        '6',
        '--json',
      ]);
      t.equal(g.code, 0, g.err);
      return (JSON.parse(g.out) as { completion: string }).completion;
    };
    for (const s of samples) {
      const want = gen(s.prompt as string, s.when === 'after' ? path.join(out, 'capitals') : undefined);
      t.equal(
        s.text,
        want,
        `${String(s.when)} ${JSON.stringify(s.prompt)}: the text mlora generate makes${s.when === 'before' ? ' with the base model' : ' with the adapter'}`,
      );
    }
    t.not(samples[2]!.text, samples[0]!.text, 'training changed the greedy completion');
    t.match(
      r.out,
      /\[capitals\] greedy samples\n {2}prompt "The capital of France is"\n {4}before \(step 0\): .*\n {4}after {2}\(step 4\): /,
      'the summary shows the samples',
    );
  },
);
