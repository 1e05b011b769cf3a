// The link's send window (src/link/window.ts): sized from the delivery rate and round trip it
// measures, so that a writer is held to what the network carries rather than to the memory
// bound (the memory migration's downtime: docs/performance.md).
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import type { LinkStream } from '../../src/link/stream.ts';
import { SendWindow } from '../../src/link/window.ts';
import { cleanupAll } from '../helpers/proc.ts';
import { createHash } from 'node:crypto';
import { linkPair, sleep, writeRandom } from '../helpers/link-pair.ts';

const MiB = 1024 * 1024;
test.after.each(cleanupAll);

/**
 * A path with a bottleneck of `perMs` bytes per ms and a round trip of `rttMs` beyond it (a
 * FIFO queue in front), the writer filling the window but for 300 ms of every 900 (as QEMU
 * pauses between passes; then the queue drains and a round trip can be sampled with little
 * in flight): runs `ms` ms of it.
 */
function drive(w: SendWindow, perMs: number, rttMs: number, ms: number): void {
  let sent = 0, busyUntil = 0;
  const acks: Array<{ at: number; offset: number }> = [];
  for (let t = 0; t < ms; t++) {
    while (acks.length && acks[0].at <= t) { const a = acks.shift()!; w.onAck(a.offset, t); }
    const acked = acks.length ? acks[0].offset - 64 * 1024 : sent;
    while (t % 900 < 600 && sent - acked < w.bytes) {
      const before = sent - acked;
      sent += 64 * 1024;
      w.onSend(sent, t, before);
      busyUntil = Math.max(t, busyUntil) + (64 * 1024) / perMs;
      acks.push({ at: busyUntil + rttMs, offset: sent });
    }
  }
}

test('the window settles at the measured rate x max(50 ms, 1.5 x the typical round trip sampled with little in flight), between its floor and ceiling', () => {
  // 20 MiB/s, 50 ms: 1 MiB in flight fills the path; the window is 1.5 times that.
  const w = new SendWindow(256 * 1024, 32 * MiB);
  drive(w, (20 * MiB) / 1000, 50, 4000);
  const { minRttMs, mibps } = w.stats();
  assert.ok(minRttMs !== null && minRttMs >= 50 && minRttMs < 60, `round trip ${minRttMs}`);
  assert.is(mibps, 20);
  assert.ok(w.bytes > 1.3 * MiB && w.bytes < 2 * MiB, `window ${w.bytes}`);
  // A short round trip: the time budget (50 ms at the rate); a long fat path: the ceiling.
  const fast = new SendWindow(MiB, 32 * MiB);
  drive(fast, (100 * MiB) / 1000, 1, 2000);
  assert.ok(fast.bytes > 4.5 * MiB && fast.bytes < 5.5 * MiB, `window ${fast.bytes}`);
  const slow = new SendWindow(MiB, 32 * MiB);
  drive(slow, (2 * MiB) / 1000, 1, 2000);
  assert.is(slow.bytes, MiB, 'at its floor');
  const fat = new SendWindow(MiB, 8 * MiB);
  drive(fat, (100 * MiB) / 1000, 200, 8000);
  assert.is(fat.bytes, 8 * MiB);
});

test('a reader that takes 10 MiB/s holds the writer near what it takes, far below the 32 MiB memory bound', async () => {
  // Before the window, the writer ran 32 MiB ahead of the reader (maxResident): a QEMU
  // writing its stream saw memory speed and stopped its guest with that much in flight.
  const p = linkPair({ maxResident: 32 * MiB });
  const rx = new Promise<LinkStream>((r) => p.b.once('stream', (s: LinkStream) => { s.end(); r(s); }));
  const s = p.a.stream('paced');
  const writing = writeRandom(s, 24 * MiB, 5);
  const r = await rx;
  // 256 KiB every 25 ms (~10 MiB/s) in paused mode; sample what the writer has unacknowledged.
  const h = createHash('sha256');
  let most = 0;
  while (!r.readableEnded) {
    await sleep(25);
    most = Math.max(most, s.sendNext - s.acked);
    const n = Math.min(256 * 1024, r.readableLength);
    const c = n ? (r.read(n) as Buffer | null) : null;
    if (c) h.update(c);
    else if (r.readableLength === 0) r.read(0); // lets the end through once everything was read
  }
  assert.is(h.digest('hex'), await writing, 'the stream arrived byte for byte');
  // ~2-4 MiB here on a quiet machine, up to ~7 at load 20 (a delayed reader reads in a burst, which the rate samples see).
  assert.ok(most < 12 * MiB, `at most ${(most / MiB).toFixed(1)} MiB unacknowledged (memory bound 32 MiB)`);
  await Promise.all([p.a.finish(), p.b.finish()]);
});

test.run();
