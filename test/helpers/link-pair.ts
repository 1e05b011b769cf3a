// Two Link ends in one process over a unix socket, with a handle to cut the current carrier
// (destroy the socket) or hold the network off, for the link's unit and fuzz tests.
import { createServer, connect, type Socket } from 'node:net';
import { createHash, randomBytes } from 'node:crypto';
import { join } from 'node:path';
import type { Duplex, Readable } from 'node:stream';
import { Link, type LinkOptions } from '../../src/link/link.ts';
import { onCleanup, tempDir } from './proc.ts';

export interface Pair {
  a: Link;
  b: Link;
  /** Destroy the live carrier socket(s). */
  cut(): void;
  /** While off, dials fail and accepted sockets are dropped (a network that is gone). */
  network(on: boolean): void;
  dir: string;
  dials: number;
}

/** `shared`: both sides use the pair's dir as shared dir; `sharedSide`: only that side does. */
export function linkPair(opts: Partial<LinkOptions> & { shared?: boolean; sharedSide?: 'a' | 'b'; dir?: string } = {}): Pair {
  const { shared, sharedSide, dir: given, ...linkOpts } = opts;
  const dir = given ?? tempDir('vmshift-link-');
  const sock = join(dir, 'b.sock');
  let netOn = true;
  const live = new Set<Socket>();
  const common = { link: `l${randomBytes(4).toString('hex')}`, migration: 'm1', ...linkOpts };
  const sharedFor = (side: 'a' | 'b') => (shared || sharedSide === side ? dir : undefined);
  const b = new Link({ ...common, role: 'b', peer: 'a', sharedDir: sharedFor('b') });
  const server = createServer((s) => {
    if (!netOn) { s.destroy(); return; }
    live.add(s);
    s.on('close', () => live.delete(s));
    b.attach(s);
  });
  server.listen(sock);
  const pair: Pair = {
    a: undefined as unknown as Link, b, dir, dials: 0,
    cut: () => { for (const s of live) s.destroy(); },
    network: (on) => { netOn = on; if (!on) pair.cut(); },
  };
  pair.a = new Link({
    ...common, role: 'a', peer: 'b', sharedDir: sharedFor('a'),
    dial: () => new Promise<Duplex>((resolve, reject) => {
      pair.dials++;
      if (!netOn) { reject(new Error('network is off')); return; }
      const s = connect(sock, () => { live.add(s); s.on('close', () => live.delete(s)); resolve(s); });
      s.once('error', reject);
    }),
  });
  onCleanup(() => {
    for (const l of [pair.a, b]) {
      for (const s of l.allStreams) s.on('error', () => {});
      if (l.state === 'running') l.abort('test over');
    }
    for (const s of live) s.destroy();
    server.close();
  });
  return pair;
}

/** sha256 and length of everything a readable gives until its end. */
export function digest(r: Readable): Promise<{ sha: string; bytes: number }> {
  return new Promise((resolve, reject) => {
    const h = createHash('sha256');
    let bytes = 0;
    r.on('data', (b: Buffer) => { h.update(b); bytes += b.length; });
    r.on('end', () => resolve({ sha: h.digest('hex'), bytes }));
    r.on('error', reject);
  });
}

/**
 * Write `total` pseudo-random bytes in random-sized pieces, honouring backpressure; resolves
 * with their sha256 once all are handed to the stream (and it was ended).
 */
export async function writeRandom(w: Duplex, total: number, seed = 1): Promise<string> {
  const h = createHash('sha256');
  let x = seed >>> 0;
  const rnd = () => { x ^= x << 13; x >>>= 0; x ^= x >>> 17; x ^= x << 5; x >>>= 0; return x; };
  const block = randomBytes(1 << 20);
  for (let sent = 0; sent < total;) {
    const n = Math.min(total - sent, 1 + (rnd() % (200 * 1024)));
    const start = rnd() % (block.length - n);
    const piece = Buffer.from(block.subarray(start, start + n)); // a copy: the link keeps it until acked
    h.update(piece);
    sent += n;
    if (!w.write(piece)) await new Promise<void>((r) => w.once('drain', () => r()));
  }
  w.end();
  return h.digest('hex');
}

export const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/** `p`, or a rejection after `ms` (a stream that never completes fails the test instead of hanging it). */
export function within<T>(ms: number, p: Promise<T>, what = 'the streams'): Promise<T> {
  let t: NodeJS.Timeout;
  return Promise.race([p, new Promise<T>((_, reject) => { t = setTimeout(() => reject(new Error(`${what} did not complete within ${ms} ms`)), ms); })]).finally(() => clearTimeout(t));
}
