// What Linux says about this process's threads (/proc/self/task): their names and the CPUs
// each may run on, for the pinning tests.
import fs from 'node:fs';

/** The allowed CPU list ("0-1", "3") in a /proc status file. */
export function allowedCpus(statusFile: string): string {
  return /Cpus_allowed_list:\s*(\S+)/.exec(fs.readFileSync(statusFile, 'utf8'))?.[1] ?? '';
}

/** This process's threads: name (comm) and allowed CPU list. */
export function processThreads(): Array<{ name: string; cpus: string }> {
  return fs.readdirSync('/proc/self/task').map((id) => ({
    name: fs.readFileSync(`/proc/self/task/${id}/comm`, 'utf8').trim(),
    cpus: allowedCpus(`/proc/self/task/${id}/status`),
  }));
}
