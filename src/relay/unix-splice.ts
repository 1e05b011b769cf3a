// Unix sockets and link streams joined both ways, each direction ending on its own (NBD and
// libvirt's RPC both half-close): the two shapes every host-to-host path uses.
//   forwardUnix  a private socket here whose every connection becomes a new link stream
//                (virsh to the peer's libvirtd, the source shim's NBD client to the peer's shim)
//   spliceUnix   a stream the peer opened, connected to a unix socket on this host
import { connect, createServer, type Server, type Socket } from 'node:net';
import type { Duplex } from 'node:stream';
import { listenUnixPrivate } from '../util/unix-listen.ts';

function pipeBoth(a: Duplex, b: Duplex): void {
  a.pipe(b);
  b.pipe(a);
}

/** Splice a link stream and a unix socket both ways; an error on either destroys the other. */
export function spliceUnix(stream: Duplex, path: string, onError: (e: Error) => void): void {
  const sock = connect({ path, allowHalfOpen: true });
  sock.once('error', (e) => { onError(new Error(`cannot use ${path}: ${e.message}`)); stream.destroy(); });
  stream.once('error', () => sock.destroy());
  pipeBoth(sock, stream);
}

export interface UnixForward {
  server: Server;
  /** Stop listening and cut every connection. */
  close(): void;
}

/**
 * Sees each chunk the peer sends back on connection n; `delivered` settles once the chunk is in
 * the client's socket (true), so the client reads it even if this process dies next, or the
 * client's connection failed first (false).
 */
export type PeerChunkTap = (n: number, chunk: Buffer, delivered: Promise<boolean>) => void;

/** Peer to client, as pipe() does it, with each chunk's delivery reported to `tap`. */
function pipeTapped(from: Duplex, to: Socket, tap: (chunk: Buffer, delivered: Promise<boolean>) => void): void {
  from.on('data', (chunk: Buffer) => {
    let more = true;
    const delivered = new Promise<boolean>((r) => { more = to.write(chunk, (e) => r(!e)); });
    tap(chunk, delivered);
    if (!more) { from.pause(); to.once('drain', () => from.resume()); }
  });
  from.once('end', () => to.end());
}

/**
 * Listen on `path` (mode 0600 from creation); each connection is spliced to `open(n)`, n
 * counting from 0; `tap`, if given, sees what the peer sends back.
 */
export async function forwardUnix(path: string, open: (n: number) => Duplex, tap?: PeerChunkTap): Promise<UnixForward> {
  let n = 0;
  const conns = new Set<Socket>();
  const server = createServer({ allowHalfOpen: true }, (sock: Socket) => {
    let s: Duplex;
    try { s = open(n++); } catch { sock.destroy(); return; }
    conns.add(sock);
    // A connection cut without its FIN still ends the stream (the peer's side then closes too).
    sock.once('close', () => { conns.delete(sock); if (!s.writableEnded) s.end(); });
    sock.once('error', () => s.destroy());
    s.once('error', () => sock.destroy());
    if (tap) {
      const k = n - 1;
      sock.pipe(s);
      pipeTapped(s, sock, (chunk, delivered) => tap(k, chunk, delivered));
    } else pipeBoth(sock, s);
  });
  await listenUnixPrivate(server, path, 0o600);
  return { server, close: () => { server.close(); for (const c of conns) c.destroy(); } };
}
