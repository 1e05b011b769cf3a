// `vmshift link-agent --listen HOST:PORT`: the peer end of TLS links, long-lived (SSH links
// start an agent per link over SSH instead; TLS has no such way in, so something must
// listen). Every connection is TCP+TLS with a client certificate signed by --tls-ca
// (src/link/tls-carrier.ts: refused otherwise, and logged); its first frame, the dialer's
// HELLO, names the link: the first connection of a link creates its side 'b' (with a memory
// migration's destination half, src/relay/destination.ts, the destination QMP socket named
// by the dialer's `prepare`), later ones (reconnects after a cut) are handed to that link.
// A link goes from the table once it has finished or failed. A client with a valid
// certificate is trusted as root over SSH is: it may name any QMP socket on this host.
import { mkdirSync, rmSync } from 'node:fs';
import { join } from 'node:path';
import type { Duplex } from 'node:stream';
import { Link } from './link.ts';
import { Frame, HEADER } from './frames.ts';
import { listenTls, type TlsFiles } from './tls-carrier.ts';
import type { LinkStream } from './stream.ts';
import { serveDestination } from '../relay/destination.ts';

export interface ListenerOptions extends TlsFiles {
  host: string;
  port: number;
  /** A 0700 directory for the destination QEMUs' incoming sockets. */
  socketDir: string;
  sharedDir?: string;
  holdMs?: number;
  /** Tests: streams are echoed back instead of serving a migration. */
  echo?: boolean;
  /** Links served at once; one more is refused. */
  maxLinks?: number;
}

interface Routing { link: string; migration: string; role: string }

/** The dialer's HELLO (the first frame), and every byte read so far, to hand on to the link unread. */
function firstHello(sock: Duplex, timeoutMs: number): Promise<{ hello: Routing; raw: Buffer }> {
  return new Promise((resolve, reject) => {
    let raw = Buffer.alloc(0);
    const done = (e: Error | null) => {
      clearTimeout(t);
      sock.off('data', onData);
      sock.off('error', onErr);
      sock.pause();
      if (e) { reject(e); return; }
      try {
        const len = raw.readUInt32BE(4);
        const h = JSON.parse(raw.subarray(HEADER, HEADER + len).toString('utf8')) as Routing;
        if (typeof h?.link !== 'string' || typeof h.migration !== 'string') throw new Error('no link named');
        resolve({ hello: h, raw });
      } catch (err) {
        reject(new Error(`the first frame is not a valid HELLO (${(err as Error).message})`));
      }
    };
    const onData = (b: Buffer) => {
      raw = Buffer.concat([raw, b]);
      if (raw.length >= HEADER && raw.readUInt8(0) !== Frame.HELLO) return done(new Error('the first frame is not a HELLO'));
      if (raw.length >= HEADER && raw.readUInt32BE(4) > 64 * 1024) return done(new Error('HELLO too large'));
      if (raw.length >= HEADER && raw.length >= HEADER + raw.readUInt32BE(4)) done(null);
    };
    const onErr = (e: Error) => done(e);
    const t = setTimeout(() => done(new Error(`no HELLO within ${timeoutMs} ms`)), timeoutMs);
    sock.on('data', onData);
    sock.on('error', onErr);
  });
}

export async function runListener(o: ListenerOptions, log: (m: string) => void): Promise<{ close: () => void; links: () => number }> {
  mkdirSync(o.socketDir, { recursive: true, mode: 0o700 });
  const links = new Map<string, Link>();
  const open = (h: Routing, who: string): Link => {
    const link = new Link({ link: h.link, migration: h.migration, role: 'b', peer: who, sharedDir: o.sharedDir, holdMs: o.holdMs });
    links.set(h.link, link);
    const tag = `link ${h.link}:`;
    link.on('warning', (m) => log(`${tag} warning: ${m}`));
    link.on('carrier', (state, why) => log(`${tag} carrier ${state}: ${why}`));
    link.on('stream', (s: LinkStream) => {
      s.on('error', () => {}); // reported once, from the link's 'failed'
      if (o.echo) s.pipe(s);
    });
    const incoming = join(o.socketDir, `link-${h.link}.mig`);
    if (!o.echo) serveDestination(link, undefined, incoming, (m) => log(`${tag} ${m}`));
    const gone = (how: string) => {
      links.delete(h.link);
      rmSync(incoming, { force: true });
      log(`${tag} ${how}: ${JSON.stringify(link.stats())}`);
    };
    link.once('bye', () => link.finish().then(() => gone('finished'), () => gone('failed')));
    link.once('failed', (e: Error) => gone(`failed (${e.message})`));
    log(`${tag} new (migration ${h.migration}) from ${who}`);
    return link;
  };
  const server = await listenTls(o, (sock) => {
    const s = sock as Duplex & { remoteAddress?: string; remotePort?: number };
    const who = `${s.remoteAddress}:${s.remotePort}`;
    firstHello(sock, 10_000).then(({ hello, raw }) => {
      let link = links.get(hello.link);
      if (link && link.opts.migration !== hello.migration) throw new Error(`link ${hello.link} is migration ${link.opts.migration}, not ${hello.migration}`);
      if (!link) {
        if (links.size >= (o.maxLinks ?? 16)) throw new Error(`already serving ${links.size} links`);
        link = open(hello, who);
      }
      sock.unshift(raw);
      link.attach(sock);
      sock.resume();
    }).catch((e: Error) => {
      log(`refused: ${who}: ${e.message}`);
      sock.destroy();
    });
  }, (m) => log(`refused: ${m}`));
  log(`listening for TLS links on ${o.host}:${o.port}`);
  return {
    close: () => { server.close(); for (const l of links.values()) l.abort('the listener stops'); },
    links: () => links.size,
  };
}
