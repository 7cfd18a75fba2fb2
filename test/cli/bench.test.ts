// mlora bench: argument handling (the scenarios themselves are measured, never asserted).
import t from 'tap';
import { availableParallelism } from 'node:os';
import { parseBenchArgs } from '../../scripts/cli/bench.js';

t.test('options and clear errors', async (t) => {
  t.same(parseBenchArgs(['--scenario', 'kernels', '--threads', '2', '--json']), {
    scenario: 'kernels',
    opts: { threads: 2, json: true, quick: false },
  });
  // Like `mlora train`, bench uses every core unless told otherwise.
  t.same(parseBenchArgs(['--scenario=kernels', '--quick']), {
    scenario: 'kernels',
    opts: { threads: availableParallelism(), json: false, quick: true },
  });
  t.match(parseBenchArgs(['--scenario', 'nope']), { error: /unknown scenario 'nope' \(known: kernels/ });
  t.match(parseBenchArgs([]), { error: /missing --scenario/ });
  t.match(parseBenchArgs(['--scenario', 'kernels', '--threads', '0']), {
    error: /--threads must be a positive integer/,
  });
  t.match(parseBenchArgs(['--scenario', 'kernels', '--frobnicate']), { error: /unknown option '--frobnicate'/ });
  t.match(parseBenchArgs(['--scenario']), { error: /--scenario needs a value/ });
  t.same(parseBenchArgs(['--help']), { help: true });
});
