// A real QEMU migration stream (the tiny guest in mode=dirty, `migrate` to `exec:cat > FILE`)
// passed through a link pair with random carrier cuts and network-off stretches (served by
// the shared file) arrives with the same sha256, byte for byte, and nothing is left in the
// shared directory afterwards.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { createHash } from 'node:crypto';
import { readdirSync, readFileSync, statSync } from 'node:fs';
import { join } from 'node:path';
import type { LinkStream } from '../../src/link/stream.ts';
import { QmpClient } from '../../src/qemu/qmp.ts';
import { cleanupAll, tempDir, waitForSocket } from '../helpers/proc.ts';
import { bootGuest, ensureGuest } from '../helpers/guest.ts';
import { digest, linkPair, sleep, within } from '../helpers/link-pair.ts';

test.after(cleanupAll);

/** Record one migration of a running, dirtying guest into a file; returns its path. */
async function recordMigration(dir: string): Promise<string> {
  await ensureGuest();
  const qmpPath = join(dir, 'rec.qmp');
  const g = bootGuest({ mode: 'dirty', params: { mib: 8, delay: 100 }, qmpSocket: qmpPath });
  await waitForSocket(qmpPath, g.daemon);
  await g.waitFor(/^VMSHIFT-DIRTY 2$/, 120_000);
  const out = join(dir, 'stream.bin');
  const q = await QmpClient.connect(qmpPath);
  try {
    await q.execute('migrate', { uri: `exec:cat > ${out}` });
    for (let i = 0; ; i++) {
      const m = await q.execute<{ status: string; 'error-desc'?: string }>('query-migrate');
      if (m.status === 'completed') break;
      if (m.status === 'failed' || i > 600) throw new Error(`recording failed: ${JSON.stringify(m)}`);
      await sleep(100);
    }
  } finally {
    await q.close();
    await g.stop();
  }
  return out;
}

test('a recorded QEMU migration stream through random cuts and file-only stretches: same sha256', async () => {
  const dir = tempDir('vmshift-recorded-');
  const file = await recordMigration(dir);
  const stream = readFileSync(file);
  assert.ok(stream.length > 8 * 1024 * 1024, `a real stream: ${stream.length} bytes`);
  assert.is(stream.readUInt32BE(0), 0x5145564d, 'it starts with QEMU\'s QEVM magic');
  const want = createHash('sha256').update(stream).digest('hex');

  const p = linkPair({ shared: true, backoffMs: { first: 5, max: 20 }, deadAfterMs: 200, spillAfterMs: 50, filePollMs: 5 });
  const rx = new Promise<LinkStream>((r) => p.b.once('stream', (s: LinkStream) => { s.end(); r(s); }));
  const got = rx.then(digest);
  const s = p.a.stream('memory');
  // Faults while the stream goes, at random points of every 2 MiB: a cut of the carrier (it
  // redials), or the network off for 100-300 ms while writing goes on (the file carries it).
  let cuts = 0, offs = 0;
  const restores: Promise<void>[] = [];
  const piece = 32 * 1024; // QEMU's buffer size
  let nextFault = Math.floor(Math.random() * 2 * 1024 * 1024);
  for (let at = 0; at < stream.length; at += piece) {
    if (at >= nextFault) {
      nextFault += 1024 * 1024 + Math.floor(Math.random() * 2 * 1024 * 1024);
      if ((cuts + offs) % 2 === 0) { p.cut(); cuts++; } else {
        p.network(false);
        offs++;
        restores.push(sleep(100 + Math.random() * 200).then(() => p.network(true)));
      }
    }
    if (!s.write(stream.subarray(at, Math.min(stream.length, at + piece)))) await new Promise<void>((r) => s.once('drain', () => r()));
  }
  s.end();
  const r = await within(60_000, got);
  await Promise.all(restores);
  assert.is(r.bytes, stream.length);
  assert.is(r.sha, want, 'byte for byte the stream QEMU wrote');
  assert.ok(cuts >= 1 && offs >= 1, `faults: ${cuts} cuts, ${offs} network-off stretches`);
  assert.ok(p.b.stats().fromFileBytes > 0, `the file carried part of it: ${JSON.stringify(p.b.stats())}`);
  await within(20_000, Promise.all([p.a.finish(), p.b.finish()]), 'finish');
  assert.equal(readdirSync(p.dir).filter((n) => n.startsWith('vmshift-link-')), []);
  assert.ok(statSync(file).size === stream.length);
});

test.run();
