// The destination half of `vmshift migrate DOMAIN qemu+ssh://HOST/system`, run inside
// `vmshift link-agent --libvirt-socket PATH` on the peer host. libvirt drives both QEMUs here;
// the agent only carries bytes and answers one question:
//   control `libvirt-prepare` -> make the migration socket's directory (the destination QEMU,
//       started by libvirt's Prepare, listens at that path) and read the probe files the source
//       wrote beside its disks; answer `libvirt-ready` with what each held (null: not seen)
//   stream `memory`    -> connected to the migration socket (src/relay/memory-relay.ts)
//   streams `libvirt-N` -> each connected to this host's libvirtd socket: the source's virsh
//       talks to this libvirt through the link, so a reset of the network is hidden from it
//   control `libvirt-resume` -> the commit (the source's virsh holds Finish's success answer):
//       resume the paused domain through this host's libvirtd, with a virsh session opened at
//       `libvirt-prepare`, so the guest's pause holds no link round trip but the source's word
// Nothing here starts or stops a guest: libvirt does; the one resume is on the source's word.
import { existsSync, mkdirSync, openSync, readSync, closeSync, rmdirSync, constants as fsc } from 'node:fs';
import { dirname } from 'node:path';
import type { Link } from '../link/link.ts';
import type { LinkStream } from '../link/stream.ts';
import { CONTROL_STREAM, Control } from './control.ts';
import { MEMORY_STREAM, destRelay } from './memory-relay.ts';
import { spliceUnix } from './unix-splice.ts';
import { VirshSession } from '../libvirt/virsh-session.ts';

export const LIBVIRT_STREAM_PREFIX = 'libvirt-';
/** A probe file holds a token of a few dozen bytes; read no more than this. */
const MAX_PROBE = 256;

function readProbe(path: string): string | null {
  if (!path.startsWith('/')) return null;
  try {
    const fd = openSync(path, fsc.O_RDONLY | fsc.O_NOFOLLOW);
    try {
      const b = Buffer.alloc(MAX_PROBE);
      const n = readSync(fd, b, 0, MAX_PROBE, 0);
      return b.subarray(0, n).toString('utf8');
    } finally {
      closeSync(fd);
    }
  } catch {
    return null;
  }
}

export function serveLibvirtDestination(link: Link, libvirtSocket: string, log: (m: string) => void): void {
  let migrateSocket: string | null = null;
  let madeDir: string | null = null;
  let session: VirshSession | null = null;

  const onControl = async (ctl: Control) => {
    for (;;) {
      let m;
      try { m = await ctl.next(); } catch { break; }
      if (m.op === 'libvirt-prepare') {
        try {
          if (!m.migrateSocket.startsWith('/') || m.migrateSocket.includes('/../')) throw new Error(`bad migration socket path ${m.migrateSocket}`);
          if (existsSync(m.migrateSocket)) throw new Error(`${m.migrateSocket} already exists on this host: another migration uses it`);
          const dir = dirname(m.migrateSocket);
          if (!existsSync(dir)) { mkdirSync(dir, { recursive: true, mode: 0o700 }); madeDir = dir; }
          migrateSocket = m.migrateSocket;
          // Connected now: the resume at the commit must not wait for virsh to start.
          session ??= new VirshSession(`qemu+unix:///system?socket=${libvirtSocket}`);
          void session.run(['uri']).catch((e: Error) => log(`virsh session: ${e.message}`));
          ctl.send({ op: 'libvirt-ready', probes: m.probes.map(readProbe) });
          log(`prepared: migration socket ${migrateSocket}, ${m.probes.length} probe(s)`);
        } catch (e) {
          ctl.send({ op: 'error', message: `on the destination: ${(e as Error).message}` });
        }
      } else if (m.op === 'libvirt-resume') {
        const t0 = performance.now();
        try {
          if (!session) throw new Error('libvirt-resume before libvirt-prepare');
          await session.run(['resume', '--domain', m.domain], 30_000);
          ctl.send({ op: 'libvirt-resumed', ms: Math.round(performance.now() - t0) });
          log(`resumed ${m.domain} in ${Math.round(performance.now() - t0)} ms`);
        } catch (e) {
          ctl.send({ op: 'error', message: `on the destination: cannot resume ${m.domain}: ${(e as Error).message}` });
        }
      } else if (m.op === 'abort') {
        log(`the source ended the migration: ${m.reason}`);
        ctl.send({ op: 'aborted' });
        ctl.end();
        break;
      }
    }
    ctl.end();
    session?.close();
    if (madeDir) try { rmdirSync(madeDir); } catch { /* not empty or gone: left as it is */ }
  };

  link.on('stream', (s: LinkStream) => {
    if (s.streamName === CONTROL_STREAM) void onControl(new Control(s, 'the source host'));
    else if (s.streamName === MEMORY_STREAM) {
      if (!migrateSocket) { s.destroy(new Error('memory stream before libvirt-prepare')); return; }
      destRelay(migrateSocket, s).then(
        (r) => r.done.then(() => log(`memory stream done: ${r.counts.forward} bytes in, ${r.counts.back} bytes of return path out`), (e: Error) => log(`memory relay: ${e.message}`)),
        (e: Error) => { log(e.message); s.destroy(e); },
      );
    } else if (s.streamName.startsWith(LIBVIRT_STREAM_PREFIX)) {
      spliceUnix(s, libvirtSocket, (e) => log(`libvirt connection ${s.streamName}: ${e.message}`));
    }
  });
}
