#!/usr/bin/env node
// The `mlora` command: starts the compiled CLI (dist/scripts/mlora.js). This launcher is
// plain JavaScript and tracked, so npm can link the bin before the TypeScript is built.
import { existsSync } from 'node:fs';
import { fileURLToPath } from 'node:url';

const cli = new URL('../dist/scripts/mlora.js', import.meta.url);
if (!existsSync(fileURLToPath(cli))) {
  console.error('mlora: the TypeScript is not built yet: run `npm install` (or `npm run build`) in the mlora folder');
  process.exit(1);
}
await import(cli.href);
