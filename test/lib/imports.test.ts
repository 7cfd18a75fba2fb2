// lib/ is the library; actors/ is a runtime built on it. A lib/ module that imports actors/ (a
// type included) ties the library to one runtime and makes cycles between the two folders
// possible, so every import of every .ts file under lib/ is checked here; and no two modules of
// lib/ and actors/ import each other, directly or around a loop (types included).
import t from 'tap';
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../../..');

/** Module specifiers of a source text, with the 1-based line each is on. */
function specifiers(text: string): Array<{ line: number; spec: string }> {
  const out: Array<{ line: number; spec: string }> = [];
  // static imports and re-exports (`from '...'`, `import '...'`, over several lines too) and dynamic import('...')
  const re = /\bfrom\s*['"]([^'"]+)['"]|\bimport\s*['"]([^'"]+)['"]|\bimport\s*\(\s*['"]([^'"]+)['"]/g;
  for (const m of text.matchAll(re)) {
    out.push({ line: text.slice(0, m.index).split('\n').length, spec: (m[1] ?? m[2] ?? m[3])! });
  }
  return out;
}

/** Imports of `file` (absolute) whose target lies under actors/. */
function actorImports(file: string, text: string): string[] {
  return specifiers(text)
    .filter(
      ({ spec }) =>
        spec.startsWith('.') && path.resolve(path.dirname(file), spec).startsWith(path.join(root, 'actors') + path.sep),
    )
    .map(({ line, spec }) => `${path.relative(root, file)}:${line}: imports ${spec}`);
}

function tsFiles(dir: string): string[] {
  return fs
    .readdirSync(dir, { withFileTypes: true })
    .flatMap((e) =>
      e.isDirectory() ? tsFiles(path.join(dir, e.name)) : e.name.endsWith('.ts') ? [path.join(dir, e.name)] : [],
    )
    .sort();
}

t.test('the check finds an actors/ import in every form it can take', async (t) => {
  const file = path.join(root, 'lib/model/x.ts');
  const text = [
    "import { a } from './a.js';",
    "import type { B } from '../../actors/protocol.js';",
    'export { c } from "../../actors/stage.js";',
    "import '../../actors/shm.js';",
    'const m = await import("../../actors/local.js");',
    'import {',
    '  d,',
    "} from '../../actors/runtime.js';",
    "import { e } from '../io/actors.js';",
  ].join('\n');
  t.same(actorImports(file, text), [
    'lib/model/x.ts:2: imports ../../actors/protocol.js',
    'lib/model/x.ts:3: imports ../../actors/stage.js',
    'lib/model/x.ts:4: imports ../../actors/shm.js',
    'lib/model/x.ts:5: imports ../../actors/local.js',
    'lib/model/x.ts:8: imports ../../actors/runtime.js',
  ]);
});

t.test('no file under lib/ imports actors/', async (t) => {
  const files = tsFiles(path.join(root, 'lib'));
  t.ok(files.length > 20, `${files.length} files under lib/`);
  const bad = files.flatMap((f) => actorImports(f, fs.readFileSync(f, 'utf8')));
  t.same(bad, [], bad.join('\n'));
});

/** The first import loop found among `files` (absolute paths), as relative paths, or []. */
function importLoop(files: string[]): string[] {
  const set = new Set(files);
  const deps = new Map(
    files.map((f) => [
      f,
      specifiers(fs.readFileSync(f, 'utf8'))
        .filter(({ spec }) => spec.startsWith('.'))
        .map(({ spec }) => path.resolve(path.dirname(f), spec).replace(/\.js$/, '.ts'))
        .filter((d) => set.has(d)),
    ]),
  );
  const state = new Map<string, 'open' | 'done'>();
  const stack: string[] = [];
  const visit = (f: string): string[] => {
    state.set(f, 'open');
    stack.push(f);
    for (const d of deps.get(f)!) {
      if (state.get(d) === 'open') return [...stack.slice(stack.indexOf(d)), d].map((x) => path.relative(root, x));
      if (!state.has(d)) {
        const loop = visit(d);
        if (loop.length) return loop;
      }
    }
    stack.pop();
    state.set(f, 'done');
    return [];
  };
  for (const f of files) {
    if (state.has(f)) continue;
    const loop = visit(f);
    if (loop.length) return loop;
  }
  return [];
}

t.test('no import loops among the modules of lib/ and actors/', async (t) => {
  const loop = importLoop([...tsFiles(path.join(root, 'lib')), ...tsFiles(path.join(root, 'actors'))]);
  t.same(loop, [], `import loop: ${loop.join(' -> ')}`);
});
