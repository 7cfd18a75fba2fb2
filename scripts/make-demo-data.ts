#!/usr/bin/env node
// Regenerates data/demo/*.jsonl (the task datasets, lib/data/demo.ts) and
// data/demo/stories/*.jsonl (the story datasets of the demo with their held-out splits,
// lib/data/demo-stories.ts). Deterministic: the files are committed, and running this again
// must leave `git diff` empty.
//   node dist/scripts/make-demo-data.js [OUT_DIR]     (default: data/demo)
import { mkdirSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { demoDatasets } from '../lib/data/demo.js';
import { storyDatasets } from '../lib/data/demo-stories.js';

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..');
const out = path.resolve(process.argv[2] ?? path.join(root, 'data', 'demo'));
const write = (file: string, records: unknown[]) => {
  mkdirSync(path.dirname(file), { recursive: true });
  writeFileSync(file, records.map((r) => JSON.stringify(r)).join('\n') + '\n');
  console.log(`${path.relative(process.cwd(), file)}: ${records.length} records`);
};
for (const [name, records] of Object.entries(demoDatasets())) write(path.join(out, `${name}.jsonl`), records);
for (const [name, { train, eval: held }] of Object.entries(storyDatasets())) {
  write(path.join(out, 'stories', `${name}.jsonl`), train);
  write(path.join(out, 'stories', `${name}.eval.jsonl`), held);
}
