// The memory relay: QEMU's migration stream (and its return path) carried over the link's
// `memory` stream, unparsed. On the source host a unix socket the source QEMU's
// `migrate uri=unix:PATH` connects to; on the destination host a connection to the socket
// the destination QEMU's `migrate-incoming uri=unix:PATH` listens on. Each direction ends on
// its own (half-close), so the return path outlives the forward stream's end: the source waits
// for the destination's SHUT after its last byte.
import { chmodSync, existsSync, lstatSync, rmSync } from 'node:fs';
import { connect, createServer, type Server, type Socket } from 'node:net';
import type { Duplex } from 'node:stream';

export const MEMORY_STREAM = 'memory';

export interface RelayCounts {
  /** Bytes from the source QEMU towards the destination. */
  forward: number;
  /** Return-path bytes from the destination QEMU back to the source. */
  back: number;
}

/** Both directions between a QEMU socket and a link stream; `done` once both ended. */
function splice(sock: Socket, stream: Duplex, counts: RelayCounts, fwdIsSock: boolean): Promise<void> {
  return new Promise((resolve, reject) => {
    let ended = 0;
    const oneEnded = () => { if (++ended === 2) resolve(); };
    sock.on('data', (b: Buffer) => { if (fwdIsSock) counts.forward += b.length; else counts.back += b.length; });
    stream.on('data', (b: Buffer) => { if (fwdIsSock) counts.back += b.length; else counts.forward += b.length; });
    sock.pipe(stream);
    stream.pipe(sock);
    sock.once('end', oneEnded);
    stream.once('end', oneEnded);
    sock.once('error', (e) => { stream.destroy(e); reject(new Error(`relay: QEMU's migration socket: ${e.message}`)); });
    stream.once('error', (e) => { sock.destroy(); reject(e); });
  });
}

export interface SourceRelay {
  /** The unix socket path for the source QEMU's `migrate uri=unix:PATH`. */
  path: string;
  counts: RelayCounts;
  /** Resolves once the migration stream ran both ways to its end; rejects on a failure. */
  done: Promise<void>;
  close(): void;
}

/**
 * Listen on `path` (a fresh path in a private directory) for exactly one connection, the
 * source QEMU's; relay it over `open()` (the link's memory stream, opened on connection).
 */
export async function sourceRelay(path: string, open: () => Duplex): Promise<SourceRelay> {
  if (existsSync(path)) throw new Error(`relay: ${path} already exists; refusing to replace it`);
  const counts: RelayCounts = { forward: 0, back: 0 };
  let taken = false;
  let settle!: { resolve: () => void; reject: (e: Error) => void };
  const done = new Promise<void>((resolve, reject) => { settle = { resolve, reject }; });
  done.catch(() => {});
  const server: Server = createServer({ allowHalfOpen: true }, (sock) => {
    if (taken) { sock.destroy(); return; } // one migration, one connection
    taken = true;
    server.close();
    splice(sock, open(), counts, true).then(settle.resolve, settle.reject);
  });
  await new Promise<void>((resolve, reject) => { server.once('error', reject); server.listen(path, () => resolve()); });
  chmodSync(path, 0o600);
  const close = () => {
    server.close();
    try { if (lstatSync(path).isSocket()) rmSync(path); } catch { /* gone already */ }
  };
  return { path, counts, done, close };
}

/** Connect `stream` (the link's memory stream, on the destination) to the destination QEMU's incoming socket. */
export async function destRelay(path: string, stream: Duplex): Promise<{ counts: RelayCounts; done: Promise<void> }> {
  const sock = await new Promise<Socket>((resolve, reject) => {
    const s = connect({ path, allowHalfOpen: true }, () => { s.off('error', reject); resolve(s); });
    s.once('error', (e) => reject(new Error(`relay: cannot reach the destination QEMU's incoming socket ${path}: ${e.message}`)));
  });
  const counts: RelayCounts = { forward: 0, back: 0 };
  const done = splice(sock, stream, counts, false);
  done.catch(() => {});
  return { counts, done };
}
