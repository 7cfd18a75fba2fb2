// The programmatic API: `import { Supervisor } from 'mlora/actors'`.
//
//   const sup = await Supervisor.start({ model: 'path/to/hf-model', devices: ['cpu:0', 'cpu:1'], output: 'out' });
//   const job = sup.submit({ name: 'my-adapter', data: 'train.jsonl', lora: { r: 8 }, max_steps: 100 });
//   for await (const ev of job.events()) console.log(ev);
//   await sup.close();
export { Supervisor, startSupervisor, Job, resolveLayout } from './supervisor.js';
export type { StartOptions, SchedulerOptions, ResolvedLayout } from './supervisor.js';
export type { SupervisorHooks, PreparedJob, MicroBatchSource, SourceMicroBatch, JobView } from './job-types.js';
export type { JobEvent, JobState } from './protocol.js';
export type { FaultSpec } from '../lib/faults.js';
export type { AdapterState } from '../lib/lora/state.js';
export type { ScheduleRecord } from '../lib/schedule/record.js';
export type { FaultEvent } from './runtime.js';
export { parseFault } from '../lib/faults.js';
export { parseAdapterConfig, parseTrainConfig, SAFE_NAME } from '../lib/config.js';
export type { AdapterConfig, AdapterConfigInput, TrainConfig } from '../lib/config.js';
