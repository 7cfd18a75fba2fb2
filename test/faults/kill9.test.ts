// kill -9 of the whole `mlora train` process mid-run, then `--resume`: every checkpoint
// written before the kill stays complete, the resumed run starts from the newest one, and
// its final adapters are bitwise equal to those of an uninterrupted run. The process kills
// itself (--fault kill:adapter=a,step=4) right after a's checkpoint-4 is complete, wherever
// adapter b is then: the kill is always mid-run, however fast or loaded the machine.
import t from 'tap';
import fs from 'node:fs';
import path from 'node:path';
import { spawn } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import { listCheckpoints } from '../../lib/io/checkpoint.js';
import { openSafetensors } from '../../lib/io/safetensors.js';
import { writeData } from './harness.js';
import { tinyModel } from '../support/models.js';
import { tmpDir } from '../support/files.js';

const CLI = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../../scripts/mlora.js');
const model = await tinyModel(0);
const dir = tmpDir(t, 'kill9');
const names = ['a', 'b'];
const config = (out: string) => {
  const file = path.join(dir, `config-${path.basename(out)}.json`);
  fs.writeFileSync(
    file,
    JSON.stringify({
      model,
      output: out,
      devices: ['cpu:0', 'cpu:1'],
      pipeline: { threads: 1 },
      log: { progress: 'none' },
      adapters: names.map((name, i) => ({
        name,
        data: writeData(dir, name, 80, 300 + i),
        seq_len: 48,
        batch_size: 4,
        micro_batch_size: 2,
        max_steps: 12,
        save_every: 1,
        seed: 7 + i,
        lora: { r: 4, alpha: 8, dropout: 0.1 },
        optimizer: { lr: 5e-3 },
      })),
    }),
  );
  return file;
};

function train(args: string[]): Promise<{ code: number | null; signal: string | null; out: string }> {
  return new Promise((resolve) => {
    const p = spawn(process.execPath, [CLI, 'train', ...args], { stdio: ['ignore', 'pipe', 'pipe'] });
    let out = '';
    p.stdout.on('data', (d) => (out += d));
    p.stderr.on('data', (d) => (out += d));
    p.on('close', (code, signal) => resolve({ code, signal, out }));
  });
}

t.test('kill -9 after a checkpoint, then --resume: bitwise the uninterrupted run', async (t) => {
  const whole = tmpDir(t, 'kill9-whole');
  const w = await train([config(whole)]);
  t.equal(w.code, 0, `uninterrupted run: exit ${w.code}${w.code ? `\n${w.out.slice(-2000)}` : ''}`);

  const out = tmpDir(t, 'kill9-run');
  const cfgFile = config(out);
  const k = await train([cfgFile, '--fault', 'kill:adapter=a,step=4']);
  t.equal(k.signal, 'SIGKILL', `killed mid-run (exit ${k.code}, signal ${k.signal})`);
  const before = new Map(
    names.map((n) => [
      n,
      listCheckpoints(path.join(out, n))
        .filter((c) => c.complete)
        .map((c) => c.step),
    ]),
  );
  t.same(before.get('a'), [1, 2, 3, 4], `a: checkpoints 1..4 before the kill (${JSON.stringify([...before])})`);

  const r = await train([cfgFile, '--resume']);
  t.equal(r.code, 0, `resumed run: exit ${r.code}${r.code ? `\n${r.out.slice(-2000)}` : ''}`);
  for (const n of names) {
    const after = listCheckpoints(path.join(out, n));
    for (const s of before.get(n)!)
      t.ok(after.find((c) => c.step === s)?.complete, `${n}: checkpoint ${s} still complete after the resume`);
    const got = openSafetensors(path.join(out, n, 'adapter_model.safetensors'));
    const want = openSafetensors(path.join(whole, n, 'adapter_model.safetensors'));
    t.same([...got.tensors.keys()].sort(), [...want.tensors.keys()].sort(), `${n}: same tensors`);
    let diff = 0;
    for (const name of want.tensors.keys()) {
      const a = got.readF32(name),
        b = want.readF32(name);
      if (
        Buffer.compare(
          Buffer.from(a.buffer, a.byteOffset, a.byteLength),
          Buffer.from(b.buffer, b.byteOffset, b.byteLength),
        ) !== 0
      )
        diff++;
    }
    t.equal(diff, 0, `${n}: final adapter bitwise equal to the uninterrupted run`);
  }
  const metrics = fs
    .readFileSync(path.join(out, 'metrics.jsonl'), 'utf8')
    .trim()
    .split('\n')
    .map((l) => JSON.parse(l) as { type: string; adapter: string; step: number });
  const lastBefore = before.get('a')!.at(-1)!;
  const resumedSteps = metrics.filter((m) => m.type === 'step' && m.adapter === 'a').map((m) => m.step);
  t.ok(resumedSteps.includes(lastBefore + 1), `the resume went on from step ${lastBefore + 1}`);
});
