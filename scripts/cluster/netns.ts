// Several "hosts" on one machine, for the cluster tests and the cluster benchmark: one Linux
// network namespace per host, each joined by a veth pair to a bridge that lives in a namespace
// of its own, so nothing of the topology touches the machine's own network (its addresses,
// 10.231.0.0/24, exist only inside these namespaces, and parallel runs each have their own
// bridge). Names are `mlc-<base>-<random>-<host>`: a deterministic base per caller plus a random
// suffix, so two runs never collide. Every run records its owner process in a marker file;
// a later run removes the namespaces of owners that are gone (a killed test's leftovers) and
// never those of a live parallel run.
import { execFileSync, spawn, spawnSync, type ChildProcess, type SpawnOptions } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { existsSync, mkdirSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import path from 'node:path';

const MARKERS = '/tmp/mlora-netns';
const SUBNET = '10.231.0';

export interface NsHost {
  name: string;
  ns: string;
  ip: string;
}

/** Why namespaces cannot be made here (undefined: they can). */
export function netnsUnavailable(): string | undefined {
  if (process.platform !== 'linux') return 'network namespaces need Linux';
  if (typeof process.getuid !== 'function' || process.getuid() !== 0) return 'making network namespaces needs root';
  const r = spawnSync('ip', ['netns', 'list'], { encoding: 'utf8', timeout: 10_000 });
  if (r.error || r.status !== 0) return `'ip netns' does not work here: ${r.error?.message ?? r.stderr.trim()}`;
  return undefined;
}

function ip(args: string[]): void {
  execFileSync('ip', args, { stdio: ['ignore', 'ignore', 'pipe'], timeout: 15_000 });
}

function pidAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (e) {
    return (e as NodeJS.ErrnoException).code === 'EPERM';
  }
}

function namespaces(): string[] {
  const r = spawnSync('ip', ['netns', 'list'], { encoding: 'utf8', timeout: 10_000 });
  return r.status === 0
    ? r.stdout
        .split('\n')
        .map((l) => l.split(' ')[0]!)
        .filter(Boolean)
    : [];
}

/** Ends every process inside a namespace and deletes it. */
function deleteNamespace(ns: string): void {
  const r = spawnSync('ip', ['netns', 'pids', ns], { encoding: 'utf8', timeout: 10_000 });
  for (const p of (r.stdout ?? '')
    .split('\n')
    .map(Number)
    .filter((n) => n > 0)) {
    try {
      process.kill(p, 'SIGKILL');
    } catch {
      /* gone already */
    }
  }
  spawnSync('ip', ['netns', 'del', ns], { timeout: 10_000 });
}

/** Removes the namespaces that runs of `base` left behind when their process died without teardown. */
export function removeLeftovers(base: string): string[] {
  const removed: string[] = [];
  if (!existsSync(MARKERS)) return removed;
  const all = namespaces();
  for (const f of readdirSync(MARKERS)) {
    if (!f.startsWith(`mlc-${base}-`)) continue;
    const owner = Number(readFileSync(path.join(MARKERS, f), 'utf8'));
    if (owner > 0 && pidAlive(owner)) continue;
    for (const ns of all.filter((n) => n.startsWith(`${f}-`))) {
      deleteNamespace(ns);
      removed.push(ns);
    }
    rmSync(path.join(MARKERS, f), { force: true });
  }
  return removed;
}

export class Topology {
  readonly prefix: string;
  readonly hosts = new Map<string, NsHost>();
  private readonly children = new Set<ChildProcess>();
  private down = false;

  /** Hosts named `names` get 10.231.0.2, .3, ... in that order. */
  constructor(base: string, names: string[]) {
    if (!/^[a-z0-9]{1,12}$/.test(base))
      throw new Error(`topology base '${base}' must be 1-12 lowercase letters or digits`);
    removeLeftovers(base);
    this.prefix = `mlc-${base}-${randomBytes(3).toString('hex')}`;
    mkdirSync(MARKERS, { recursive: true });
    writeFileSync(path.join(MARKERS, this.prefix), String(process.pid));
    const bridge = `${this.prefix}-br`;
    try {
      ip(['netns', 'add', bridge]);
      ip(['-n', bridge, 'link', 'add', 'br0', 'type', 'bridge']);
      ip(['-n', bridge, 'link', 'set', 'br0', 'up']);
      names.forEach((name, i) => {
        if (!/^[A-Za-z0-9_]{1,20}$/.test(name)) throw new Error(`host name '${name}' must be letters, digits or _`);
        const ns = `${this.prefix}-${name}`;
        const host: NsHost = { name, ns, ip: `${SUBNET}.${i + 2}` };
        ip(['netns', 'add', ns]);
        this.hosts.set(name, host);
        ip(['-n', bridge, 'link', 'add', `v${i}`, 'type', 'veth', 'peer', 'name', 'eth0', 'netns', ns]);
        ip(['-n', bridge, 'link', 'set', `v${i}`, 'master', 'br0']);
        ip(['-n', bridge, 'link', 'set', `v${i}`, 'up']);
        ip(['-n', ns, 'addr', 'add', `${host.ip}/24`, 'dev', 'eth0']);
        ip(['-n', ns, 'link', 'set', 'eth0', 'up']);
        ip(['-n', ns, 'link', 'set', 'lo', 'up']);
      });
    } catch (e) {
      this.teardown();
      throw new Error(
        `could not build the namespace topology ${this.prefix}: ${(e as Error & { stderr?: Buffer }).stderr?.toString().trim() || (e as Error).message}`,
      );
    }
  }

  host(name: string): NsHost {
    const h = this.hosts.get(name);
    if (!h) throw new Error(`no host '${name}' in topology ${this.prefix}`);
    return h;
  }

  /** Starts a process inside a host's namespace (ended by teardown if still running). */
  spawn(host: string, cmd: string, args: string[], opts: SpawnOptions = {}): ChildProcess {
    if (this.down) throw new Error(`topology ${this.prefix} is torn down`);
    const c = spawn('ip', ['netns', 'exec', this.host(host).ns, cmd, ...args], {
      stdio: ['ignore', 'pipe', 'pipe'],
      ...opts,
    });
    this.children.add(c);
    c.once('exit', () => this.children.delete(c));
    return c;
  }

  /** Cuts (or restores) a host's link to the bridge: a host that is alive but unreachable. */
  setLink(host: string, up: boolean): void {
    ip(['-n', this.host(host).ns, 'link', 'set', 'eth0', up ? 'up' : 'down']);
  }

  /** Kills what runs in the namespaces and deletes them. Idempotent. */
  teardown(): void {
    if (this.down) return;
    this.down = true;
    for (const c of this.children) c.kill('SIGKILL');
    for (const ns of namespaces().filter((n) => n.startsWith(`${this.prefix}-`))) deleteNamespace(ns);
    rmSync(path.join(MARKERS, this.prefix), { force: true });
  }

  /** Namespaces of this topology that still exist (none after teardown). */
  remaining(): string[] {
    return namespaces().filter((n) => n.startsWith(`${this.prefix}-`));
  }
}
