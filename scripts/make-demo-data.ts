#!/usr/bin/env node
// Regenerates data/demo/*.jsonl from lib/data/demo.ts (deterministic: the files are
// committed, and running this again must leave `git diff` empty).
//   node dist/scripts/make-demo-data.js [OUT_DIR]     (default: data/demo)
import { mkdirSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { demoDatasets } from '../lib/data/demo.js';

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..');
const out = path.resolve(process.argv[2] ?? path.join(root, 'data', 'demo'));
mkdirSync(out, { recursive: true });
for (const [name, records] of Object.entries(demoDatasets())) {
  const file = path.join(out, `${name}.jsonl`);
  writeFileSync(file, records.map((r) => JSON.stringify(r)).join('\n') + '\n');
  console.log(`${path.relative(process.cwd(), file)}: ${records.length} records`);
}
