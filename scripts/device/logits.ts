// mlora's logits of a model + PEFT adapter on given devices, written to one safetensors file
// for scripts/device/peft_check.py to compare with PEFT's:
//   node dist/scripts/device/logits.js --model DIR --adapter DIR --devices cuda:0,cpu:0 --out FILE
//                                      [--seqs 2] [--len 64] [--seed 1]
// The file holds input_ids [seqs, len] (I32, random ids ≥ 4 from the seed) and, per device,
// logits_<device with ':' as '_'> [seqs, len, vocab] (F32): each sequence alone from position 0.
import { parseArgs } from 'node:util';
import { openSingleModel, packSequences, batchOnDevice, freeBatch } from '../../lib/model/single.js';
import { writeSafetensors, type StTensorSource } from '../../lib/io/safetensors.js';
import { Rng } from '../../lib/rng.js';

const USAGE =
  'usage: node dist/scripts/device/logits.js --model DIR --adapter DIR --devices cuda:0,cpu:0 --out FILE [--seqs 2] [--len 64] [--seed 1]';

function positiveInt(name: string, v: string | undefined, dflt: number): number {
  if (v === undefined) return dflt;
  const n = Number(v);
  if (!Number.isInteger(n) || n < 1) throw new Error(`--${name} must be a positive integer, got '${v}'`);
  return n;
}

async function main(): Promise<number> {
  const { values: a } = parseArgs({
    options: {
      model: { type: 'string' },
      adapter: { type: 'string' },
      devices: { type: 'string' },
      out: { type: 'string' },
      seqs: { type: 'string' },
      len: { type: 'string' },
      seed: { type: 'string' },
    },
  });
  if (!a.model || !a.adapter || !a.devices || !a.out) {
    console.error(`logits: --model, --adapter, --devices and --out are required\n${USAGE}`);
    return 2;
  }
  const seqs = positiveInt('seqs', a.seqs, 2),
    len = positiveInt('len', a.len, 64),
    seed = positiveInt('seed', a.seed, 1);
  const tensors: Record<string, StTensorSource> = {};
  let ids: Int32Array | undefined;
  for (const dev of a.devices.split(',')) {
    const m = await openSingleModel(a.model, a.adapter, { device: dev, threads: 2 });
    try {
      const V = m.config.vocabSize;
      if (!ids) {
        const rng = new Rng(seed);
        ids = Int32Array.from({ length: seqs * len }, () => 4 + rng.int(V - 4));
        tensors.input_ids = { dtype: 'I32', shape: [seqs, len], data: () => ids! };
      }
      const logits = new Float32Array(seqs * len * V);
      for (let s = 0; s < seqs; s++) {
        const b = batchOnDevice(m, packSequences([{ inputIds: ids.subarray(s * len, (s + 1) * len) }]), 1 + s);
        try {
          logits.set(await m.program.logits(b.mb, b.tokens), s * len * V);
        } finally {
          freeBatch(b);
        }
      }
      tensors[`logits_${dev.replace(':', '_')}`] = { dtype: 'F32', shape: [seqs, len, V], data: () => logits };
      console.log(`logits: ${dev}: ${seqs}×${len} tokens, vocab ${V}`);
    } finally {
      m.free();
    }
  }
  writeSafetensors(a.out, tensors, { model: a.model, adapter: a.adapter });
  console.log(`logits: wrote ${a.out}`);
  return 0;
}

main().then(
  (c) => (process.exitCode = c),
  (e: unknown) => {
    console.error(`logits: ${(e as Error).message}`);
    process.exitCode = 1;
  },
);
