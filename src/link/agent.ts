// The link's far end on the peer host: `vmshift link-agent`. One agent process per link
// holds side 'b' of the Link (so the link's state outlives every carrier connection) and
// takes carriers on a unix socket (what SSH channels are forwarded to) and, optionally, on
// a TLS port. It runs until the link finishes (the dialer's BYE) or fails (the hold time).
// `--start` makes it idempotent to launch over SSH: it starts the agent detached unless one
// already answers on the socket, and returns once the socket is ready.
import { spawn } from 'node:child_process';
import { chmodSync, closeSync, existsSync, mkdirSync, openSync, rmSync } from 'node:fs';
import { createServer, connect } from 'node:net';
import { dirname } from 'node:path';
import { parseArgs } from 'node:util';
import type { Duplex } from 'node:stream';
import { Link } from './link.ts';
import { listenTls } from './tls-carrier.ts';
import type { LinkStream } from './stream.ts';
import { serveDestination } from '../relay/destination.ts';
import { serveLibvirtDestination } from '../relay/libvirt-destination.ts';
import { serveDisks } from '../hostmove/peer.ts';

export interface AgentOptions {
  link: string;
  migration: string;
  socket: string;
  sharedDir?: string;
  holdMs?: number;
  /** Tests and benchmarks: every stream the dialer opens is sent back to it. */
  echo?: boolean;
  /** Benchmarks: every stream the dialer opens is read to its end and discarded (one-way throughput). */
  sink?: boolean;
  /** Memory migration: the destination QEMU's QMP socket (src/relay/destination.ts). */
  destQmp?: string;
  /** Migration driven by libvirt: this host's libvirtd socket (src/relay/libvirt-destination.ts). */
  libvirtSocket?: string;
  /** Moving disks: this host's new thin files and their shims (src/hostmove/peer.ts). */
  disks?: boolean;
  /** This host's vmshiftd config, for its datastores (default /etc/vmshift/vmshiftd.json). */
  disksConfig?: string;
  /** This host's libvirt hook config (vmshiftd's socket ...), for a libvirt domain's disks. */
  hookConfig?: string;
  tls?: { host: string; port: number; ca: string; cert: string; key: string };
}

export function parseAgentArgs(args: string[]): AgentOptions & { start: boolean } {
  const { values: v } = parseArgs({
    args, strict: true, options: {
      start: { type: 'boolean', default: false }, link: { type: 'string' }, migration: { type: 'string' },
      socket: { type: 'string' }, 'shared-dir': { type: 'string' }, 'hold-ms': { type: 'string' }, echo: { type: 'boolean', default: false }, sink: { type: 'boolean', default: false },
      'dest-qmp': { type: 'string' }, 'libvirt-socket': { type: 'string' }, disks: { type: 'boolean', default: false }, 'disks-config': { type: 'string' }, 'hook-config': { type: 'string' },
      'tls-listen': { type: 'string' }, 'tls-ca': { type: 'string' }, 'tls-cert': { type: 'string' }, 'tls-key': { type: 'string' },
    },
  });
  if (!v.link || !v.migration || !v.socket) throw new Error('link-agent: --link, --migration and --socket are required');
  if (v['dest-qmp'] && v['libvirt-socket']) throw new Error('link-agent: --dest-qmp and --libvirt-socket exclude each other');
  let tls: AgentOptions['tls'];
  if (v['tls-listen']) {
    const m = /^(.+):(\d+)$/.exec(v['tls-listen']);
    if (!m || !v['tls-ca'] || !v['tls-cert'] || !v['tls-key']) throw new Error('link-agent: --tls-listen HOST:PORT needs --tls-ca, --tls-cert and --tls-key');
    tls = { host: m[1], port: Number(m[2]), ca: v['tls-ca'], cert: v['tls-cert'], key: v['tls-key'] };
  }
  return {
    start: v.start!, link: v.link, migration: v.migration, socket: v.socket, sharedDir: v['shared-dir'],
    holdMs: v['hold-ms'] ? Number(v['hold-ms']) : undefined, echo: v.echo, sink: v.sink, destQmp: v['dest-qmp'], libvirtSocket: v['libvirt-socket'], disks: v.disks, disksConfig: v['disks-config'], hookConfig: v['hook-config'], tls,
  };
}

function answers(socket: string): Promise<boolean> {
  return new Promise((resolve) => {
    if (!existsSync(socket)) { resolve(false); return; }
    const s = connect(socket, () => { s.destroy(); resolve(true); });
    s.on('error', () => resolve(false));
  });
}

/** `--start`: launch the agent detached unless it already runs; resolve once it answers. */
export async function startAgent(args: string[], o: AgentOptions, self: string[]): Promise<void> {
  if (await answers(o.socket)) return;
  mkdirSync(dirname(o.socket), { recursive: true, mode: 0o700 });
  const log = openSync(`${o.socket}.log`, 'a', 0o600);
  const child = spawn(self[0], [...self.slice(1), ...args.filter((a) => a !== '--start')], { detached: true, stdio: ['ignore', log, log] });
  child.unref();
  closeSync(log);
  for (let i = 0; i < 400; i++) {
    if (await answers(o.socket)) return;
    if (child.exitCode !== null) throw new Error(`link-agent exited (${child.exitCode}) before ${o.socket} answered; see ${o.socket}.log`);
    await new Promise((r) => setTimeout(r, 25));
  }
  throw new Error(`link-agent: ${o.socket} did not answer within 10 s; see ${o.socket}.log`);
}

/** Serve side 'b' of the link until it finishes (exit code 0) or fails (1). */
export async function runAgent(o: AgentOptions, log: (msg: string) => void = (m) => process.stderr.write(`${new Date().toISOString()} ${m}\n`)): Promise<number> {
  mkdirSync(dirname(o.socket), { recursive: true, mode: 0o700 });
  if (existsSync(o.socket) && !(await answers(o.socket))) rmSync(o.socket); // a stale socket of a dead agent
  const link = new Link({ link: o.link, migration: o.migration, role: 'b', peer: 'the dialing host', sharedDir: o.sharedDir, holdMs: o.holdMs });
  link.on('warning', (m) => log(`warning: ${m}`));
  link.on('carrier', (state, why) => log(`carrier ${state}: ${why}`));
  link.on('stream', (s: LinkStream) => {
    s.on('error', () => {}); // reported once, from the link's 'failed'
    if (o.echo) s.pipe(s);
    else if (o.sink) { s.resume(); s.once('end', () => s.end()); }
  });
  // The incoming socket sits beside the agent's own, in its 0700 directory.
  if (o.destQmp) serveDestination(link, o.destQmp, `${o.socket}.mig`, log);
  if (o.libvirtSocket) serveLibvirtDestination(link, o.libvirtSocket, log);
  if (o.disks) serveDisks(link, { config: o.disksConfig, hookConfig: o.hookConfig, self: [process.execPath, ...process.execArgv, process.argv[1]!], log });
  const server = createServer((s) => link.attach(s as Duplex));
  await new Promise<void>((resolve, reject) => { server.once('error', reject); server.listen(o.socket, () => resolve()); });
  chmodSync(o.socket, 0o600);
  const tls = o.tls ? await listenTls(o.tls, (s) => link.attach(s), (m) => log(`refused: ${m}`)) : null;
  log(`link ${o.link} (migration ${o.migration}) waiting on ${o.socket}${o.tls ? ` and tls ${o.tls.host}:${o.tls.port}` : ''}`);
  const code = await new Promise<number>((resolve) => {
    link.once('bye', () => link.finish().then(() => resolve(0), () => resolve(1)));
    link.once('failed', (e: Error) => { log(`failed: ${e.message}`); resolve(1); });
  });
  server.close();
  tls?.close();
  rmSync(o.socket, { force: true });
  if (o.destQmp) rmSync(`${o.socket}.mig`, { force: true });
  log(`link ${o.link} ${code === 0 ? 'finished' : 'failed'}: ${JSON.stringify(link.stats())}`);
  return code;
}
