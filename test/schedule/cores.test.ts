// Core assignment for the stage actors of one process: disjoint cores in stage order when the
// CPU stages' threads fit in the allowed cores, nothing pinned when they do not.
import t from 'tap';
import { assignCores, pinningEnabled } from '../../lib/schedule/cores.js';

t.test('each CPU stage gets its own cores, in stage order, from the allowed set', async (t) => {
  t.same(assignCores(['cpu:0', 'cpu:1'], [1, 1], [0, 1]), [[0], [1]]);
  t.same(assignCores(['cpu:0', 'cpu:1'], [2, 1], [2, 5, 7, 9]), [[2, 5], [7]], 'ids come from the mask, not 0..n-1');
  t.same(assignCores(['cpu:0'], [2], [0, 1]), [[0, 1]]);
  t.same(assignCores(['cuda:0', 'cpu:0'], [4, 2], [0, 1]), [[], [0, 1]], 'a CUDA stage takes no cores');
});

t.test('more CPU threads than allowed cores: nothing is pinned', async (t) => {
  t.equal(assignCores(['cpu:0', 'cpu:1'], [2, 1], [0, 1]), undefined);
  t.equal(assignCores(['cpu:0', 'cpu:1', 'cpu:2'], [1, 1, 1], [0, 1]), undefined);
  t.equal(assignCores(['cuda:0'], [1], [0, 1]), undefined, 'no CPU stage: nothing to pin');
});

t.test('MLORA_PIN_CORES=1 turns pinning on; other values are refused by name', async (t) => {
  t.equal(pinningEnabled({}), false);
  t.equal(pinningEnabled({ MLORA_PIN_CORES: '0' }), false);
  t.equal(pinningEnabled({ MLORA_PIN_CORES: '1' }), true);
  t.throws(() => pinningEnabled({ MLORA_PIN_CORES: 'yes' }), /MLORA_PIN_CORES='yes': expected 1/);
});
