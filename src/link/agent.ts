// The link's far end on the peer host: `vmshift link-agent`. One agent process per link
// holds side 'b' of the Link (so the link's state outlives every carrier connection) and
// takes carriers on a unix socket (what SSH channels are forwarded to) and, optionally, on
// a TLS port. It runs until the link finishes (the dialer's BYE) or fails (the hold time).
// `--start` (src/link/agent-start.ts) makes it idempotent to launch over SSH.
import { chmodSync, existsSync, mkdirSync, rmSync } from 'node:fs';
import { createServer } from 'node:net';
import { dirname } from 'node:path';
import type { Duplex } from 'node:stream';
import { Link } from './link.ts';
import { listenTls } from './tls-carrier.ts';
import type { LinkStream } from './stream.ts';
import { answers, type AgentOptions } from './agent-start.ts';

export type { AgentOptions };

/** Serve side 'b' of the link until it finishes (exit code 0) or fails (1). */
export async function runAgent(o: AgentOptions, log: (msg: string) => void = (m) => process.stderr.write(`${new Date().toISOString()} ${m}\n`)): Promise<number> {
  mkdirSync(dirname(o.socket), { recursive: true, mode: 0o700 });
  if (existsSync(o.socket) && !(await answers(o.socket))) rmSync(o.socket); // a stale socket of a dead agent
  // Each role's code loads only where it is used (the disks' code brings the config schema),
  // and before the link exists: nothing it receives may come before its handler.
  const roles = {
    destination: o.destQmp ? await import('../relay/destination.ts') : null,
    libvirt: o.libvirtSocket ? await import('../relay/libvirt-destination.ts') : null,
    disks: o.disks ? await import('../hostmove/peer.ts') : null,
  };
  const startedAt = new Date().toISOString();
  const link = new Link({ link: o.link, migration: o.migration, role: 'b', peer: 'the dialing host', sharedDir: o.sharedDir, holdMs: o.holdMs });
  link.on('warning', (m) => log(`warning: ${m}`));
  link.on('carrier', (state, why) => log(`carrier ${state}: ${why}`));
  link.on('stream', (s: LinkStream) => {
    s.on('error', () => {}); // reported once, from the link's 'failed'
    if (o.echo) s.pipe(s);
    else if (o.sink) { s.resume(); s.once('end', () => s.end()); }
  });
  // The incoming socket sits beside the agent's own, in its 0700 directory.
  if (o.destQmp) roles.destination!.serveDestination(link, o.destQmp, `${o.socket}.mig`, log);
  if (o.libvirtSocket) roles.libvirt!.serveLibvirtDestination(link, o.libvirtSocket, log);
  const disks = o.disks ? roles.disks!.serveDisks(link, { config: o.disksConfig, hookConfig: o.hookConfig, self: [process.execPath, ...process.execArgv, process.argv[1]!], log }) : null;
  // A move's destination end: `vmshift status` here asks this agent (src/hostmove/move-status.ts).
  const moveStatus = disks ? await (await import('../hostmove/move-status.ts')).listenAgentStatus(o.socket, () => {
    const d = disks.status();
    return { role: 'destination', domain: null, peer: 'the dialing host', phase: d.phase, startedAt, link: link.stats(), memory: null, disks: d.disks };
  }).catch((e: Error) => { log(`no status socket: ${e.message}`); return null; }) : null;
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
  await moveStatus?.close().catch(() => {});
  rmSync(o.socket, { force: true });
  if (o.destQmp) rmSync(`${o.socket}.mig`, { force: true });
  // Benchmarks read this (bench/memory.ts): the far end's CPU for the bytes it carried.
  const cpu = process.cpuUsage();
  log(`cpu: ${Math.round((cpu.user + cpu.system) / 1000)} ms user+system`);
  log(`link ${o.link} ${code === 0 ? 'finished' : 'failed'}: ${JSON.stringify(link.stats())}`);
  return code;
}
