// Fuzzing the parsers of user files (safetensors, adapter dirs, configs, datasets) with seeded
// random mutations of valid files, a fixed number of cases each (the same cases on every
// machine, however fast; MLORA_FUZZ_SCALE multiplies them): every case must end in an Error
// with a message (or a valid parse), never a crash or a huge allocation (a hang would stop the
// file at tap's timeout).
import t from 'tap';
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { Rng } from '../../lib/rng.js';
import { openSafetensors } from '../../lib/io/safetensors.js';
import { loadAdapter } from '../../lib/io/peft.js';
import { parseTrainConfig } from '../../lib/config.js';
import { parseDataset } from '../../lib/data/dataset.js';
import { readConfigFile } from '../../scripts/cli/train-config.js';
import { tmpDir } from '../support/files.js';

const fixtures = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../../../test/fixtures/llama-tiny');
const SCALE = Number(process.env.MLORA_FUZZ_SCALE ?? 1);
const dir = tmpDir(t, 'fuzz');

function mutate(rng: Rng, src: Uint8Array): Uint8Array {
  let b = Buffer.from(src);
  const n = 1 + rng.int(4);
  for (let k = 0; k < n; k++) {
    const at = rng.int(Math.max(1, b.length));
    switch (rng.int(6)) {
      case 0:
        b[at] = rng.int(256);
        break; // flip a byte
      case 1:
        b = b.subarray(0, at);
        break; // truncate
      case 2:
        b = Buffer.concat([
          b.subarray(0, at),
          Buffer.from(Array.from({ length: 1 + rng.int(16) }, () => rng.int(256))),
          b.subarray(at),
        ]);
        break;
      case 3:
        b = Buffer.concat([b.subarray(0, at), b.subarray(at + 1 + rng.int(32))]);
        break; // delete
      case 4: {
        // a digit run becomes a huge number
        const s = b.toString('latin1');
        const m = /\d+/g;
        m.lastIndex = at;
        const hit = m.exec(s);
        if (hit)
          b = Buffer.from(
            s.slice(0, hit.index) +
              ['99999999999', '-1', '1e300', '4294967296', '0'][rng.int(5)] +
              s.slice(hit.index + hit[0].length),
            'latin1',
          );
        break;
      }
      default:
        b = Buffer.concat([b, b.subarray(at, at + rng.int(64))]); // duplicate a slice at the end
    }
  }
  return b;
}

function fuzz(
  name: string,
  seed: number,
  count: number,
  inputs: Uint8Array[],
  check: (bytes: Uint8Array, i: number) => void,
) {
  const rng = new Rng(seed, name);
  let cases = 0,
    errors = 0,
    ok = 0,
    slowest = 0;
  const odd: string[] = [];
  while (cases < Math.max(1, Math.round(count * SCALE))) {
    const bytes = mutate(rng, inputs[rng.int(inputs.length)]!);
    const c0 = performance.now();
    try {
      check(bytes, cases);
      ok++;
    } catch (e) {
      errors++;
      if (!(e instanceof Error) || !e.message) odd.push(`case ${cases}: threw ${String(e)}`);
      else if (e.name === 'RangeError' && /allocat|memory|Array buffer/i.test(e.message))
        odd.push(`case ${cases}: ${e.message}`);
    }
    slowest = Math.max(slowest, performance.now() - c0);
    cases++;
  }
  t.same(odd, [], `${name}: ${cases} cases, ${errors} errors, ${ok} valid, slowest ${slowest.toFixed(0)} ms`);
}

const st = fs.readFileSync(path.join(fixtures, 'adapter/adapter_model.safetensors'));
fuzz('safetensors', 1, 600, [st, st.subarray(0, 8 + Number(st.readBigUInt64LE(0)))], (bytes, i) => {
  const f = path.join(dir, `st-${i % 8}.safetensors`);
  fs.writeFileSync(f, bytes);
  const sf = openSafetensors(f);
  for (const n of sf.tensors.keys()) sf.readF32(n);
});

// a header claiming a huge tensor must be refused without allocating it
{
  const header = Buffer.from(JSON.stringify({ w: { dtype: 'F32', shape: [1 << 30, 1 << 30], data_offsets: [0, 16] } }));
  const len = Buffer.alloc(8);
  len.writeBigUInt64LE(BigInt(header.length));
  const f = path.join(dir, 'huge.safetensors');
  fs.writeFileSync(f, Buffer.concat([len, header, Buffer.alloc(16)]));
  t.throws(
    () => {
      const sf = openSafetensors(f);
      sf.readF32('w');
    },
    /./,
    'a header claiming a 2^60-element tensor is an Error',
  );
}

const acfg = fs.readFileSync(path.join(fixtures, 'adapter/adapter_config.json'));
fuzz('adapter dir', 2, 400, [acfg, st], (bytes, i) => {
  const d = path.join(dir, `ad-${i % 8}`);
  fs.mkdirSync(d, { recursive: true });
  const isConfig = bytes[0] === 0x7b || i % 2 === 0;
  fs.writeFileSync(path.join(d, 'adapter_config.json'), isConfig ? bytes : acfg);
  fs.writeFileSync(path.join(d, 'adapter_model.safetensors'), isConfig ? st : bytes);
  loadAdapter(d);
});

const cfgJson = Buffer.from(
  JSON.stringify(
    {
      model: 'm',
      devices: ['cpu:0', 'cpu:1'],
      output: 'out',
      pipeline: { split: [1, 1], inflight: 4, memory: '1GiB' },
      adapters: [
        {
          name: 'a',
          data: 'a.jsonl',
          lora: { r: 8, alpha: 16, targets: ['q_proj', 'v_proj'] },
          optimizer: { lr: 1e-3, betas: [0.9, 0.99] },
          batch_size: 8,
          micro_batch_size: 2,
          seq_len: 64,
          eval: { data: 'e.jsonl', every: 5 },
        },
      ],
    },
    null,
    1,
  ),
);
const cfgYaml = Buffer.from(
  'model: m\ndevices: [cpu:0, cpu:1]\nadapters:\n  - name: a\n    data: a.jsonl\n    lora: {r: 8, alpha: 16}\n    schedule: {type: cosine, warmup_steps: 2}\n    seq_len: 64\n&x {a: *x}\n'.replace(
    '&x {a: *x}\n',
    '',
  ),
);
fuzz('config', 3, 800, [cfgJson, cfgYaml], (bytes, i) => {
  const f = path.join(dir, `c-${i % 8}.${bytes[0] === 0x7b ? 'json' : 'yaml'}`);
  fs.writeFileSync(f, bytes);
  parseTrainConfig(readConfigFile(f), f);
});

const data = Buffer.from(
  [
    JSON.stringify({ instruction: 'Say hi', input: 'x', output: 'hi' }),
    JSON.stringify({
      messages: [
        { role: 'user', content: 'a' },
        { role: 'assistant', content: 'b' },
      ],
    }),
    JSON.stringify({ text: 'plain' }),
    JSON.stringify({ input_ids: [1, 2, 3], labels: [-100, 2, 3] }),
  ].join('\n'),
);
fuzz('dataset', 4, 20000, [data, Buffer.from(`[${data.toString().split('\n').join(',')}]`)], (bytes, i) => {
  parseDataset(Buffer.from(bytes).toString('utf8'), `d-${i}.jsonl`, { skipBad: i % 2 === 0 });
});
