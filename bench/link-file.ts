// `npm run bench -- link-file [--mib N] [--chunk KiB] [--rounds N] [--dir DIR]`: what the shared-file carrier
// alone carries: both ends of a link in this process, the network off from the start, one
// stream of N MiB (default 64, written --chunk KiB, default 64, per event-loop turn as the
// memory relay writes what QEMU sends) from a to b through the files in DIR (default a temp dir;
// give a directory on the storage to measure, e.g. an NFS mount). Prints MiB/s per round,
// the process's CPU per MiB, and how many fdatasync calls the run made (strace is not
// needed: the count comes from the link's own file writers).
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { LinkStream } from '../src/link/stream.ts';
import { syncCount } from '../src/link/record-file.ts';
import { cleanupAll } from '../test/helpers/proc.ts';
import { createHash, randomBytes } from 'node:crypto';
import type { Duplex } from 'node:stream';
import { digest, linkPair, within } from '../test/helpers/link-pair.ts';

const MiB = 1024 * 1024;

/**
 * Write as the memory relay does: one `chunk`-sized write per event-loop turn (QEMU's
 * migration socket gives its bytes in reads of up to 64 KiB), honouring backpressure.
 */
async function writeLikeASocket(w: Duplex, total: number, chunk: number): Promise<string> {
  const h = createHash('sha256');
  const block = randomBytes(chunk * 16);
  for (let sent = 0, i = 0; sent < total; i++) {
    const piece = Buffer.from(block.subarray((i % 16) * chunk, (i % 16) * chunk + Math.min(chunk, total - sent)));
    h.update(piece);
    sent += piece.length;
    if (!w.write(piece)) await new Promise<void>((r) => w.once('drain', () => r()));
    else await new Promise<void>((r) => setImmediate(r));
  }
  w.end();
  return h.digest('hex');
}

export async function main(argv: string[]): Promise<void> {
  const opt = (name: string, dflt: string) => { const i = argv.indexOf(name); return i >= 0 ? argv[i + 1] : dflt; };
  const mib = Number(opt('--mib', '64')), rounds = Number(opt('--rounds', '3')), chunk = Number(opt('--chunk', '64'));
  const base = opt('--dir', tmpdir());
  try {
    for (let r = 0; r < rounds; r++) {
      const dir = mkdtempSync(join(base, 'vmshift-link-file-'));
      try {
        const p = linkPair({ shared: true, dir, backoffMs: { first: 1000, max: 1000 } });
        p.network(false);
        const got = new Promise<{ sha: string; bytes: number }>((res) => p.b.once('stream', (s: LinkStream) => { s.end(); res(digest(s)); }));
        const syncs0 = syncCount(), cpu0 = process.cpuUsage(), t0 = performance.now();
        const s = p.a.stream('bulk');
        s.resume();
        const sent = await writeLikeASocket(s, mib * MiB, chunk * 1024);
        const back = await within(600_000, got);
        const ms = performance.now() - t0;
        const cpu = process.cpuUsage(cpu0);
        if (back.sha !== sent || back.bytes !== mib * MiB) throw new Error(`round ${r}: the stream arrived changed (${back.bytes} bytes)`);
        await Promise.all([p.a.finish(), p.b.finish()]);
        console.log(`round ${r + 1}: ${mib} MiB file-only in ${(ms / 1000).toFixed(2)} s = ${(mib / (ms / 1000)).toFixed(1)} MiB/s, CPU ${((cpu.user + cpu.system) / 1000 / mib).toFixed(1)} ms/MiB, ${syncCount() - syncs0} fdatasyncs`);
      } finally {
        await cleanupAll();
        rmSync(dir, { recursive: true, force: true });
      }
    }
  } finally {
    await cleanupAll();
  }
}
