// The control plane (actors/rpc.ts, actors/stage-workers.ts): a comlink call carries an error's
// code across the port; a call to a stage that hangs fails with a coded error instead of waiting
// forever, whether the heartbeat watchdog or the call's timeout sees it first; after a recovery
// the pipeline's calls reach the new stage actor.
import t from 'tap';
import fs from 'node:fs';
import { MessageChannel } from 'node:worker_threads';
import { serveStage, stageApi, type StageApi } from '../../actors/rpc.js';
import { ActorPipeline, type ActorPipelineOptions, type FaultEvent } from '../../actors/runtime.js';
import type { StageWorkers } from '../../actors/stage-workers.js';
import { ErrorCode, errorCode, MloraError } from '../../lib/errors.js';
import { tinyModelWithLayers, twoStageOptions } from '../support/models.js';

const model = await tinyModelWithLayers(2);
t.teardown(() => fs.rmSync(model, { recursive: true, force: true }));

t.test("a stage API call's error arrives with its code and message", async (t) => {
  const { port1, port2 } = new MessageChannel();
  // only the two methods the test calls: what is under test is the port between them
  const api = {
    gradSumsq: async (a: number) => a * 1.5,
    memory: async () => {
      throw new MloraError(ErrorCode.OutOfMemory, 'device cpu:9: out of memory (budget 1024 bytes)');
    },
  } as Partial<StageApi> as StageApi;
  serveStage(api, port2);
  const remote = stageApi(port1);
  t.equal(await remote.gradSumsq(3), 4.5, 'a value comes back');
  const e = (await remote.memory().catch((x: unknown) => x)) as Error;
  t.equal(errorCode(e), ErrorCode.OutOfMemory, 'the code crossed the port');
  t.match(e.message, /device cpu:9: out of memory \(budget 1024 bytes\)/);
  port1.close();
});

const options = (extra: Partial<ActorPipelineOptions>) => twoStageOptions(model, extra);

const workersOf = (p: ActorPipeline) => p['workers'] as StageWorkers;

t.test('a call to a hung stage fails (coded) when its heartbeats stop; the new stage answers', async (t) => {
  const faults: FaultEvent[] = [];
  // the hang fires at stage 1's first mailbox message: the call below
  const p = await ActorPipeline.start(
    options({ faults: [{ kind: 'hang', stage: 1, after: 1 }], hangTimeoutMs: 1_000, onFault: (f) => faults.push(f) }),
  );
  try {
    const e = (await workersOf(p)
      .call(1, 'memory', [])
      .catch((x: unknown) => x)) as Error;
    t.equal(errorCode(e), ErrorCode.Unavailable, `failed with a code (${e.message})`);
    const mem = await p.memory();
    t.same(
      mem.map((m) => m.device),
      ['cpu:0', 'cpu:1'],
      'the replaced stage answers its calls',
    );
    t.same(
      faults.map((f) => [f.stage, f.fault, f.recoveredMs !== undefined]),
      [[1, 'hang', true]],
      'one hang of stage 1, recovered',
    );
  } finally {
    await p.close();
  }
});

t.test('a call to a hung stage fails (coded) at its timeout when no watchdog judges it', async (t) => {
  const p = await ActorPipeline.start(options({ faults: [{ kind: 'hang', stage: 1, after: 1 }], hangTimeoutMs: 1e9 }));
  try {
    const e = (await workersOf(p)
      .call(1, 'memory', [], 500)
      .catch((x: unknown) => x)) as Error;
    t.equal(errorCode(e), ErrorCode.Unavailable, 'failed with a code');
    t.match(e.message, /stage 1: 'memory' got no reply within 500 ms/);
  } finally {
    await p.close(); // the hung stage does not answer its shutdown either: terminated
  }
});
