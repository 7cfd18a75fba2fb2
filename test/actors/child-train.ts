// A short training in a child process (used by shutdown.test.ts): two stage actors, one
// adapter, two steps, then sup.close(). It never calls process.exit: the process must end by
// itself once close() has ended every worker, timer and port.
import { Supervisor } from '../../actors/index.js';
import { adapter } from './util.js';

const model = process.argv[2]!;
const sup = await Supervisor.start({ model, devices: ['cpu:0', 'cpu:1'], threads: 1 });
const job = sup.submit(adapter('child', 'arithmetic', { max_steps: 2 }));
let steps = 0;
for await (const ev of job.events()) if (ev.type === 'step') steps++;
await sup.close();
console.log(`child: ${steps} steps, state ${job.state}`);
