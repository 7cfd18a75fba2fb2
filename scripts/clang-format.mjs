#!/usr/bin/env node
// clang-format over the native sources tracked by git (native/src: .cc .h .cu .cuh), with the
// repository's .clang-format. `--check` (npm run lint) changes nothing and fails on any
// difference; `--write` (npm run format) formats in place. A missing clang-format is installed
// the way scripts/ensure-system-deps.mjs installs system packages (apt-get, as root on Debian);
// where that cannot be done the step is skipped with the reason, and the rest of the lint runs.
import { spawnSync } from 'node:child_process';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { ensureClangFormat } from './ensure-system-deps.mjs';

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
const mode = process.argv[2];
if (mode !== '--check' && mode !== '--write') {
  console.error('usage: node scripts/clang-format.mjs --check|--write');
  process.exit(2);
}
const { clangFormat: bin, reason } = ensureClangFormat();
if (!bin) {
  console.log(`clang-format: skipped: ${reason}`);
  process.exit(0);
}
const listed = spawnSync('git', ['ls-files', '-z', 'native/src'], { cwd: root, encoding: 'utf8' });
if (listed.status !== 0) {
  console.error(`clang-format: git ls-files failed: ${listed.stderr}`);
  process.exit(1);
}
const files = listed.stdout.split('\0').filter((f) => /\.(cc|h|cu|cuh)$/.test(f));
const args = mode === '--check' ? ['--dry-run', '-Werror'] : ['-i'];
const r = spawnSync(bin, [...args, ...files], { cwd: root, stdio: 'inherit' });
process.exit(r.status ?? 1);
