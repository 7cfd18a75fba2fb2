// Fault injection specs, for `mlora train --fault SPEC` and Supervisor.start({faults}).
//
//   crash:stage=1,after=7     the stage's worker thread dies (process.exit of that thread)
//                             when it handles its 7th message
//   hang:stage=0,after=3      the stage blocks its event loop forever at its 3rd message
//                             (no heartbeats: the supervisor's deadline catches it)
//   corrupt:stage=1,after=5   the stage flips bytes in the slot it sends after its 5th message
//                             (the receiver's checksum catches it)
//   oom:stage=0,after=4       the stage's 4th message fails with an out-of-memory error
//   slow:stage=1,factor=3     the stage takes 3× as long for every message (never killed)
//   nan:adapter=NAME,step=2   adapter NAME's weights become NaN before its step 2: that
//                             adapter stops with a clear error, the others go on
//   kill:adapter=NAME,step=4  the whole process is killed (SIGKILL, as kill -9) right after
//                             adapter NAME's checkpoint at step 4 is complete; the other
//                             adapters are wherever they are (a checkpoint half written...)
//   pause:adapter=NAME,step=3 every adapter pauses once adapter NAME has taken its step 3 and
//                             waits (for a signal, say: tests of Ctrl-C that cannot miss)

/** One injected fault, parsed from a spec above (parseFault). */
export interface FaultSpec {
  kind: 'crash' | 'hang' | 'corrupt' | 'nan' | 'oom' | 'slow' | 'kill' | 'pause';
  stage?: number;
  adapter?: string;
  after?: number;
  step?: number;
  factor?: number;
}

const KEYS: Record<FaultSpec['kind'], string[]> = {
  crash: ['stage', 'after'],
  hang: ['stage', 'after'],
  corrupt: ['stage', 'after'],
  oom: ['stage', 'after'],
  slow: ['stage', 'factor'],
  nan: ['adapter', 'step'],
  kill: ['adapter', 'step'],
  pause: ['adapter', 'step'],
};

export function parseFault(spec: string): FaultSpec {
  const m = /^(\w+):(.*)$/.exec(spec.trim());
  const kinds = Object.keys(KEYS).join(', ');
  if (!m) throw new Error(`fault '${spec}': expected KIND:key=value,... (kinds: ${kinds})`);
  const kind = m[1] as FaultSpec['kind'];
  if (!(kind in KEYS)) throw new Error(`fault '${spec}': unknown kind '${m[1]}' (kinds: ${kinds})`);
  const f: FaultSpec = { kind };
  for (const part of m[2]!.split(',').filter(Boolean)) {
    const kv = /^(\w+)=(.+)$/.exec(part.trim());
    if (!kv) throw new Error(`fault '${spec}': '${part}' is not key=value`);
    const [, key, val] = kv as unknown as [string, string, string];
    if (!KEYS[kind].includes(key))
      throw new Error(`fault '${spec}': '${key}' is not a field of ${kind} (fields: ${KEYS[kind].join(', ')})`);
    if (key === 'adapter') f.adapter = val;
    else {
      const n = Number(val);
      if (!Number.isFinite(n) || n < 0 || (key !== 'factor' && !Number.isInteger(n)))
        throw new Error(
          `fault '${spec}': ${key} must be a ${key === 'factor' ? 'positive number' : 'non-negative integer'}, got '${val}'`,
        );
      (f as unknown as Record<string, number>)[key] = n;
    }
  }
  for (const k of KEYS[kind])
    if ((f as unknown as Record<string, unknown>)[k] === undefined)
      throw new Error(`fault '${spec}': missing ${k}=...`);
  if (kind === 'slow' && !(f.factor! >= 1)) throw new Error(`fault '${spec}': factor must be ≥ 1`);
  return f;
}
