// A link to a peer host whose far end is a `vmshift link-agent` started there over SSH: the
// one recipe every host-to-host move uses (memory `--qmp`, disks `--disk`, libvirt DOMAIN).
// The first dial runs `PEER_VMSHIFT link-agent --start --link ID --migration KIND-ID --socket
// DIR/NAME-ID.sock [what the agent serves] [--shared-dir] [--hold-ms]` (idempotent), every
// dial then opens a streamlocal channel to that socket (src/link/ssh-carrier.ts).
import { randomBytes } from 'node:crypto';
import type { Duplex } from 'node:stream';
import { Link } from './link.ts';
import { sshDialer, shellLine } from './ssh-carrier.ts';

export interface SshPeer {
  host: string;
  port: number;
  user: string;
  identity: string;
  knownHosts: string;
  /** The vmshift command on the peer. */
  peerVmshift: string;
  /** Where the peer's agent puts its socket (a 0700 directory is made). */
  peerSocketDir: string;
  sharedDir?: string;
  holdMs?: number;
}

export const peerName = (p: { user: string; host: string; port: number }) => `${p.user}@${p.host}:${p.port}`;

/** The dialer for a link whose far end is an agent started over SSH; `serve` are its flags for what it serves. */
export function agentDialer(p: SshPeer, id: string, migration: string, socketName: string, serve: string[]): () => Promise<Duplex> {
  const socket = `${p.peerSocketDir}/${socketName}-${id}.sock`;
  const start = [p.peerVmshift, 'link-agent', '--start', '--link', id, '--migration', migration, '--socket', socket, ...serve,
    ...(p.sharedDir ? ['--shared-dir', p.sharedDir] : []), ...(p.holdMs ? ['--hold-ms', String(p.holdMs)] : [])];
  return sshDialer({ host: p.host, port: p.port, user: p.user, identity: p.identity, knownHosts: p.knownHosts, remoteSocket: socket, startCommand: shellLine(start), connectTimeoutMs: 10_000 });
}

/** A new link (side 'a') to an agent on the peer; `kind` prefixes its migration id (mem, disks, dom). */
export function agentLink(p: SshPeer, kind: string, socketName: string, serve: string[]): Link {
  const id = randomBytes(6).toString('hex');
  const migration = `${kind}-${id}`;
  return new Link({ link: id, migration, role: 'a', peer: peerName(p), sharedDir: p.sharedDir, holdMs: p.holdMs, dial: agentDialer(p, id, migration, socketName, serve) });
}
