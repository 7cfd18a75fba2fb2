// Connecting to the cluster's NATS server. The URL carries the credentials the way users write
// them (nats://user:pass@host:4222, or nats://TOKEN@host:4222); tls://host:4222 (or a CA file)
// requires TLS; an nkey seed file authenticates with an nkey instead. The password never
// appears in an error message or a log line: describe() shows the URL without it.
import { readFileSync } from 'node:fs';
import { connect, nkeyAuthenticator, type NatsConnection, type NodeConnectionOptions } from '@nats-io/transport-node';

export interface ClusterAuth {
  /** PEM file of the CA that signed the server's certificate (turns TLS on). */
  tlsCa?: string;
  /** Client certificate and key (mutual TLS). */
  tlsCert?: string;
  tlsKey?: string;
  /** File holding an nkey seed (SU...): authenticates by signing the server's nonce. */
  nkeySeed?: string;
}

export interface ClusterUrl {
  servers: string;
  user?: string;
  pass?: string;
  token?: string;
  tls: boolean;
}

export function parseClusterUrl(url: string): ClusterUrl {
  let u: URL;
  try {
    u = new URL(url);
  } catch {
    throw new Error(`--cluster '${describe(url)}' is not a URL (expected nats://user:password@host:4222)`);
  }
  if (u.protocol !== 'nats:' && u.protocol !== 'tls:')
    throw new Error(`--cluster '${describe(url)}': the scheme must be nats:// or tls://, not ${u.protocol}//`);
  if (!u.hostname) throw new Error(`--cluster '${describe(url)}' names no host`);
  const servers = `${u.hostname}:${u.port || '4222'}`;
  const user = decodeURIComponent(u.username);
  const pass = decodeURIComponent(u.password);
  const out: ClusterUrl = { servers, tls: u.protocol === 'tls:' };
  if (user && pass) Object.assign(out, { user, pass });
  else if (user) out.token = user;
  return out;
}

/** The URL with its password or token replaced by '***' (for messages). */
export function describe(url: string): string {
  return url.replace(
    /\/\/([^@/]*)@/,
    (_m, cred: string) => `//${cred.includes(':') ? `${cred.split(':')[0]}:***` : '***'}@`,
  );
}

/**
 * `persistent`: reconnect for as long as it takes (a stage host outlives a cut link and offers
 * its devices again when it is back). Otherwise (a run's supervisor) a lost link is a fault the
 * run handles by restarting the stages elsewhere; reconnecting for long would only hide it, so
 * the client tries for a few seconds and then gives up.
 */
export async function clusterConnect(
  url: string,
  name: string,
  auth: ClusterAuth = {},
  persistent = false,
): Promise<NatsConnection> {
  const c = parseClusterUrl(url);
  const opts: NodeConnectionOptions = {
    servers: c.servers,
    name,
    timeout: 10_000,
    reconnectTimeWait: 500,
    maxReconnectAttempts: persistent ? -1 : 5,
    pingInterval: 5_000,
    maxPingOut: 2,
  };
  if (c.user) Object.assign(opts, { user: c.user, pass: c.pass });
  if (c.token) opts.token = c.token;
  if (auth.nkeySeed)
    opts.authenticator = nkeyAuthenticator(new TextEncoder().encode(readFileSync(auth.nkeySeed, 'utf8').trim()));
  if (c.tls || auth.tlsCa || auth.tlsCert) {
    opts.tls = {
      ...(auth.tlsCa ? { ca: readFileSync(auth.tlsCa, 'utf8') } : {}),
      ...(auth.tlsCert ? { cert: readFileSync(auth.tlsCert, 'utf8') } : {}),
      ...(auth.tlsKey ? { key: readFileSync(auth.tlsKey, 'utf8') } : {}),
    };
  }
  try {
    return await connect(opts);
  } catch (e) {
    const msg = (e as Error).message;
    const why = /authorization|authentication/i.test(msg)
      ? 'the server refused the credentials (Authorization Violation)'
      : msg;
    throw new Error(`cannot connect to the cluster at ${describe(url)}: ${why}`);
  }
}
