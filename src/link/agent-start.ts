// Starting the link's agent on the peer host: `vmshift link-agent --start` (run over SSH on
// the first dial) parses the agent's options and starts the agent (src/link/agent.ts)
// detached unless one already answers on the socket, then returns once it answers. Kept
// apart from the agent itself so that this short-lived process loads none of the link, relay
// or disk code: it is on the path of every migration's first byte (docs/performance.md).
import { spawn } from 'node:child_process';
import { closeSync, existsSync, mkdirSync, openSync } from 'node:fs';
import { connect } from 'node:net';
import { dirname } from 'node:path';
import { parseArgs } from 'node:util';

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

export function answers(socket: string): Promise<boolean> {
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
