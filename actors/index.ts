// The programmatic API: `import { Supervisor } from 'mlora/actors'`.
//
//   const sup = await Supervisor.start({ model: 'path/to/hf-model', devices: ['cpu:0', 'cpu:1'], output: 'out' });
//   const job = sup.submit({ name: 'my-adapter', data: 'train.jsonl', lora: { r: 8 }, max_steps: 100 });
//   for await (const ev of job.events()) console.log(ev);
//   await sup.close();
//
// `Supervisor` is the job scheduler (actors/scheduler/scheduler.ts, JobScheduler): the name the
// README and existing programs use, kept as an alias (like startSupervisor and SupervisorHooks)
// so they go on working; the supervision of the stage workers is ActorPipeline (actors/runtime.ts).
export {
  JobScheduler,
  JobScheduler as Supervisor,
  startScheduler,
  startScheduler as startSupervisor,
} from './scheduler/scheduler.js';
export { Job } from './scheduler/job.js';
export { resolveLayout } from './scheduler/layout.js';
export type { ResolvedLayout } from './scheduler/layout.js';
export type { StartOptions } from './scheduler/start.js';
export type { SchedulerOptions } from './scheduler/context.js';
export type {
  SchedulerHooks,
  SchedulerHooks as SupervisorHooks,
  PreparedJob,
  MicroBatchSource,
  SourceMicroBatch,
  JobView,
} from './scheduler/job-types.js';
export type { JobEvent, JobState } from './protocol.js';
export type { FaultSpec } from '../lib/faults.js';
export type { AdapterState } from '../lib/lora/state.js';
export type { ScheduleRecord } from '../lib/schedule/record.js';
export type { FaultEvent } from './runtime.js';
export { parseFault } from '../lib/faults.js';
export { parseAdapterConfig, parseTrainConfig, SAFE_NAME } from '../lib/config.js';
export type { AdapterConfig, AdapterConfigInput, TrainConfig } from '../lib/config.js';
