#!/usr/bin/env node
// clang-format over the native sources tracked by git (native/src: .cc .h .cu .cuh), with the
// repository's .clang-format. `--check` (npm run lint) changes nothing and fails on any
// difference; `--write` (npm run format) formats in place. Where clang-format is not installed
// (Debian/Ubuntu: apt-get install clang-format) the step is skipped with that message, so the
// rest of the lint still runs.
import { spawnSync } from 'node:child_process';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
const mode = process.argv[2];
if (mode !== '--check' && mode !== '--write') {
  console.error('usage: node scripts/clang-format.mjs --check|--write');
  process.exit(2);
}
const bin = process.env.CLANG_FORMAT ?? 'clang-format';
const probe = spawnSync(bin, ['--version'], { encoding: 'utf8' });
if (probe.error || probe.status !== 0) {
  console.log(`clang-format: skipped, '${bin}' is not installed (apt-get install clang-format, or set CLANG_FORMAT)`);
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
