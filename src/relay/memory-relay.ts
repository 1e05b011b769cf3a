// The memory relay: QEMU's migration stream (and its return path) carried over the link's
// `memory` stream, unparsed. On the source host a unix socket the source QEMU's
// `migrate uri=unix:PATH` connects to; on the destination host a connection to the socket
// the destination QEMU's `migrate-incoming uri=unix:PATH` listens on. Each direction ends on
// its own (half-close), so the return path outlives the forward stream's end: the source waits
// for the destination's SHUT after its last byte. With the memory cache (src/relay/cache/) the
// forward direction goes through its encoder on the source and its decoder on the destination;
// the return path is never parsed.
import { chmodSync, existsSync, lstatSync, rmSync } from 'node:fs';
import { connect, createServer, type Server, type Socket } from 'node:net';
import { crc32 } from 'node:zlib';
import type { Duplex, Transform } from 'node:stream';
import type { CacheEncoder } from './cache/encoder.ts';
import { decoderStream, encoderStream } from './cache/streams.ts';
import { BUSY } from './cache/governor.ts';

export const MEMORY_STREAM = 'memory';

export interface RelayCounts {
  /** Bytes from the source QEMU towards the destination. */
  forward: number;
  /** Return-path bytes from the destination QEMU back to the source. */
  back: number;
  /** Forward bytes on the link (differs from `forward` with the cache). */
  link: number;
  /**
   * CRC-32 of the forward bytes as QEMU wrote them (source) or was given them (destination):
   * the destination compares it with the source's before it runs the guest.
   */
  forwardCrc: number;
  /** With the cache: milliseconds the relay spent in its encoder or decoder (set at the end). */
  codecMs?: number;
}

/** The forward bytes on the QEMU side of a relay: count and running CRC. */
function addForward(counts: RelayCounts, b: Buffer): void {
  counts.forward += b.length;
  if (b.length) counts.forwardCrc = crc32(b, counts.forwardCrc);
}

/**
 * Both directions between a QEMU socket and a link stream; `done` once both ended. `codec`
 * sits in the forward direction (the cache's encoder or decoder).
 */
function splice(sock: Socket, stream: Duplex, counts: RelayCounts, fwdIsSock: boolean, codec?: Transform): Promise<void> {
  return new Promise((resolve, reject) => {
    let ended = 0;
    const oneEnded = () => { if (++ended === 2) resolve(); };
    const [from, to] = fwdIsSock ? [sock, stream] : [stream, sock];
    // The forward bytes are counted on the QEMU side (with their CRC) and on the link side;
    // without a codec both are the same chunks.
    const qemuSide = (b: Buffer) => addForward(counts, b);
    const linkSide = (b: Buffer) => { counts.link += b.length; };
    to.on('data', (b: Buffer) => { counts.back += b.length; });
    if (!fwdIsSock) {
      // Towards the destination QEMU the link hands on its socket reads as they came (16 KiB
      // TLS records, 32 KiB SSH packets): corked for one turn of the event loop, what arrived
      // together goes to QEMU in one writev instead of a syscall each.
      let corked = false;
      (codec ?? from).on('data', () => {
        if (corked) return;
        corked = true;
        sock.cork();
        setImmediate(() => { corked = false; sock.uncork(); });
      });
    }
    if (codec) {
      from.on('data', fwdIsSock ? qemuSide : linkSide);
      codec.on('data', fwdIsSock ? linkSide : qemuSide);
      from.pipe(codec).pipe(to);
      codec.once('error', (e) => { sock.destroy(); stream.destroy(e); reject(e); });
    } else {
      from.on('data', (b: Buffer) => { qemuSide(b); linkSide(b); });
      from.pipe(to);
    }
    to.pipe(from);
    sock.once('end', oneEnded);
    stream.once('end', oneEnded);
    sock.once('error', (e) => { stream.destroy(e); reject(new Error(`relay: QEMU's migration socket: ${e.message}`)); });
    stream.once('error', (e) => { sock.destroy(); reject(e); });
  });
}

export interface CacheOptions {
  /** Memory for page copies on each side, bytes. */
  budget: number;
  /** Let the governor turn compression down while the link keeps up (default true; tests turn it off). */
  turnDown?: boolean;
}

export interface SourceRelay {
  /** The unix socket path for the source QEMU's `migrate uri=unix:PATH`. */
  path: string;
  counts: RelayCounts;
  /** The cache's encoder (its stats) when the relay runs the cache. */
  cache: CacheEncoder | null;
  /** Resolves once the migration stream ran both ways to its end; rejects on a failure. */
  done: Promise<void>;
  /** Resolves once the source QEMU closed its side of the stream: `counts.forward(Crc)` are final. */
  forwardEnded: Promise<void>;
  close(): void;
}

/**
 * Listen on `path` (a fresh path in a private directory) for exactly one connection, the
 * source QEMU's; relay it over `open()` (the link's memory stream, opened on connection).
 */
export async function sourceRelay(path: string, open: () => Duplex, cache?: CacheOptions): Promise<SourceRelay> {
  if (existsSync(path)) throw new Error(`relay: ${path} already exists; refusing to replace it`);
  const counts: RelayCounts = { forward: 0, back: 0, link: 0, forwardCrc: 0 };
  const relay = { cache: null as CacheEncoder | null };
  let taken = false;
  let forwardEnd!: () => void;
  const forwardEnded = new Promise<void>((resolve) => { forwardEnd = resolve; });
  let settle!: { resolve: () => void; reject: (e: Error) => void };
  const done = new Promise<void>((resolve, reject) => { settle = { resolve, reject }; });
  done.catch(() => {});
  const server: Server = createServer({ allowHalfOpen: true }, (sock) => {
    if (taken) { sock.destroy(); return; } // one migration, one connection
    taken = true;
    server.close();
    sock.once('end', () => forwardEnd());
    const stream = open();
    let codec: Transform | undefined;
    if (cache) {
      // What waits for the link: unacknowledged bytes the link stream keeps, and its write
      // buffer. The link's send window (src/link/window.ts) now holds the writer at a few MiB
      // where it once let 32 MiB pile up, so a writer held by it (or bytes in its buffer) is
      // the governor's "busy" too: counted as at least BUSY, the figure that meant it before.
      const link = stream as Duplex & { resident?: number; held?: boolean; heldMs?: number };
      const backlog = () => {
        const b = (link.resident ?? 0) + stream.writableLength;
        return link.held || stream.writableLength > 0 ? Math.max(b, BUSY + 1) : b;
      };
      const e = encoderStream({ budget: cache.budget, backlog: cache.turnDown === false ? undefined : backlog, heldMs: () => link.heldMs ?? 0 });
      relay.cache = e.encoder;
      codec = e.stream;
    }
    splice(sock, stream, counts, true, codec).then(settle.resolve, settle.reject);
  });
  await new Promise<void>((resolve, reject) => { server.once('error', reject); server.listen(path, () => resolve()); });
  chmodSync(path, 0o600);
  const close = () => {
    server.close();
    try { if (lstatSync(path).isSocket()) rmSync(path); } catch { /* gone already */ }
  };
  return { path, counts, get cache() { return relay.cache; }, done, forwardEnded, close };
}

/** Connect `stream` (the link's memory stream, on the destination) to the destination QEMU's incoming socket. */
export async function destRelay(path: string, stream: Duplex, cache = false): Promise<{ counts: RelayCounts; done: Promise<void> }> {
  const sock = await new Promise<Socket>((resolve, reject) => {
    const s = connect({ path, allowHalfOpen: true }, () => { s.off('error', reject); resolve(s); });
    s.once('error', (e) => reject(new Error(`relay: cannot reach the destination QEMU's incoming socket ${path}: ${e.message}`)));
  });
  const counts: RelayCounts = { forward: 0, back: 0, link: 0, forwardCrc: 0 };
  const d = cache ? decoderStream() : null;
  const done = splice(sock, stream, counts, false, d?.stream).finally(() => { if (d) counts.codecMs = Math.round(d.decoder.ms); });
  done.catch(() => {});
  return { counts, done };
}

/**
 * CPU milliseconds (user + system) this process used since `from` (a `process.cpuUsage()`): what
 * one end of a move costs, for `done` and the agent's log (from the move's start: the process's
 * own start, module loading and compiling, is ~1 s and would hide the relay's share).
 */
export function cpuMsSince(from: NodeJS.CpuUsage): number {
  const c = process.cpuUsage(from);
  return Math.round((c.user + c.system) / 1000);
}
