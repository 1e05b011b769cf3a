// The destination of `vmshift migrate DOMAIN URI`: a libvirt URI of the form
// qemu+ssh://[USER@]HOST[:PORT]/system[?keyfile=K&known_hosts=F&socket=S], read the way
// libvirt reads it (keyfile, known_hosts and socket are libvirt's own parameters for
// qemu+ssh). vmshift reaches the host over SSH itself (host key verified against known_hosts)
// and carries libvirt's connection to the peer's libvirtd socket over its link.
export interface DestUri {
  user: string;
  host: string;
  port: number;
  /** The peer libvirtd's socket (libvirt's `socket` parameter; default the system socket). */
  socket: string;
  keyfile?: string;
  knownHosts?: string;
}

export class DestUriError extends Error {
  override name = 'DestUriError';
}

const SYSTEM_SOCKET = '/run/libvirt/libvirt-sock';
const KNOWN = new Set(['keyfile', 'known_hosts', 'socket', 'no_verify', 'no_tty', 'sshauth', 'command', 'netcat', 'proxy', 'mode']);

export function parseDestUri(uri: string): DestUri {
  const m = /^qemu\+ssh:\/\/(?:([A-Za-z0-9_][A-Za-z0-9._-]*)@)?(\[[0-9a-fA-F:]+\]|[A-Za-z0-9][A-Za-z0-9.-]*)(?::(\d{1,5}))?(\/[a-z]*)(?:\?(.*))?$/.exec(uri);
  if (!m) throw new DestUriError(`${uri}: expected qemu+ssh://[USER@]HOST[:PORT]/system (vmshift reaches the peer over SSH)`);
  if (m[4] !== '/system') throw new DestUriError(`${uri}: only the system instance (/system) can take a migration here, not ${m[4]}`);
  const port = m[3] ? Number(m[3]) : 22;
  if (port < 1 || port > 65535) throw new DestUriError(`${uri}: port ${port} is out of range`);
  const q = new URLSearchParams(m[5] ?? '');
  for (const k of q.keys()) if (!KNOWN.has(k)) throw new DestUriError(`${uri}: unknown parameter "${k}"`);
  if (q.get('no_verify') === '1') throw new DestUriError(`${uri}: no_verify=1 is refused: vmshift always verifies the peer's host key`);
  const socket = q.get('socket') ?? SYSTEM_SOCKET;
  if (!socket.startsWith('/')) throw new DestUriError(`${uri}: socket must be an absolute path`);
  return {
    user: m[1] ?? 'root', host: m[2].replace(/^\[|\]$/g, ''), port, socket,
    keyfile: q.get('keyfile') ?? undefined, knownHosts: q.get('known_hosts') ?? undefined,
  };
}
