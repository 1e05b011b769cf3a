// The Mirror layer's rules: behind the cursor writes reach both devices, ahead only the
// source (and `pending`), writes into the held window wait for it, and a destination
// failure is recorded for the job without failing the guest's write.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { MemoryDevice } from '../../src/block/memory.ts';
import { Mirror } from '../../src/block/mirror.ts';
import { DirtyBitmap } from '../../src/tracking/bitmap.ts';
import { BlockError } from '../../src/block/device.ts';
import { JobCursors } from '../../src/migrate/cursors.ts';

const SIZE = 1024 * 1024, G = 4096;
const fill = (b: number, n = G) => Buffer.alloc(n, b);

test('inactive: writes go to the source only', async () => {
  const src = new MemoryDevice(SIZE), dst = new MemoryDevice(SIZE);
  const cursors = new JobCursors();
  const m = new Mirror(src, dst, cursors);
  await m.write(0, fill(1));
  assert.equal(await src.read(0, G), fill(1));
  assert.equal(await dst.read(0, G), fill(0));
});

test('active: behind the cursor mirrored, ahead marked pending and source only', async () => {
  const src = new MemoryDevice(SIZE), dst = new MemoryDevice(SIZE);
  const cursors = new JobCursors();
  const m = new Mirror(src, dst, cursors);
  const pending = new DirtyBitmap(SIZE, G);
  m.start(pending);
  cursors.mirroredUpTo(64 * 1024);
  await m.write(0, fill(2));
  await m.write(128 * 1024, fill(3));
  await m.trim(8192, G);
  assert.equal(await dst.read(0, G), fill(2), 'behind: on the destination');
  assert.equal(await dst.read(128 * 1024, G), fill(0), 'ahead: not on the destination');
  assert.equal(await src.read(128 * 1024, G), fill(3));
  assert.ok(pending.has(128 * 1024, G) && !pending.has(0, G));
  assert.is(m.stats().mirroredBytes, 2 * G);
});

test('a write into the held window waits, then is mirrored behind the moved cursor', async () => {
  const src = new MemoryDevice(SIZE), dst = new MemoryDevice(SIZE);
  const cursors = new JobCursors();
  const m = new Mirror(src, dst, cursors);
  m.start(new DirtyBitmap(SIZE, G));
  await m.hold(0, 64 * 1024);
  let done = false;
  const w = m.write(G, fill(4)).then(() => (done = true));
  await new Promise((r) => setTimeout(r, 20));
  assert.not.ok(done, 'the write waits for the window');
  assert.equal(await src.read(G, G), fill(0), 'and has not reached the source');
  // The copier copies the window, moves the cursor past it, releases.
  await dst.write(0, await src.read(0, 64 * 1024));
  cursors.mirroredUpTo(64 * 1024);
  m.release();
  await w;
  assert.equal(await dst.read(G, G), fill(4), 'mirrored after the window');
  assert.is(m.stats().waitedWrites, 1);
});

test('hold waits for writes in flight in the window', async () => {
  const src = new MemoryDevice(SIZE), dst = new MemoryDevice(SIZE);
  let finish!: () => void;
  const slow = Object.create(src) as MemoryDevice;
  slow.write = (o, d) => new Promise<void>((r) => (finish = r)).then(() => src.write(o, d));
  const cursors = new JobCursors();
  const m = new Mirror(slow, dst, cursors);
  m.start(new DirtyBitmap(SIZE, G));
  cursors.mirroredUpTo(0);
  const w = m.write(0, fill(5));
  let held = false;
  const h = m.hold(0, 64 * 1024).then(() => (held = true));
  await new Promise((r) => setTimeout(r, 20));
  assert.not.ok(held, 'the copier waits for the write in flight');
  finish();
  await w;
  await h;
  assert.ok(held);
  m.release();
});

test('a destination failure does not fail the guest write; the job sees it', async () => {
  const src = new MemoryDevice(SIZE), dst = new MemoryDevice(SIZE);
  dst.write = () => Promise.reject(new BlockError('ENOSPC', 'memory: full'));
  const cursors = new JobCursors();
  const m = new Mirror(src, dst, cursors);
  m.start(null);
  cursors.mirroredUpTo(SIZE);
  await m.write(0, fill(6));
  assert.equal(await src.read(0, G), fill(6));
  assert.match(m.error!.message, /mirroring to .* failed: memory: full/);
  assert.is((m.error as { code?: string }).code, 'destination-failed', 'the job tells it apart by its code');
  assert.not.ok(m.active, 'mirroring stops');
});

test('the cursor is the job\'s: it never moves back, and the mirror describes itself with it', async () => {
  const src = new MemoryDevice(SIZE), dst = new MemoryDevice(SIZE, { name: 'dest' });
  const cursors = new JobCursors();
  const m = new Mirror(src, dst, cursors);
  assert.is(m.describe(), 'mirror to dest (inactive)');
  cursors.mirrorFromStart();
  m.start(null);
  cursors.mirroredUpTo(128 * 1024);
  assert.is(m.cursor, 128 * 1024);
  assert.is(m.describe(), 'mirror to dest (active, in step below 131072)');
  assert.throws(() => cursors.mirroredUpTo(64 * 1024), /moved back/);
});

/** A destination whose writes hang while `cut` is set (a link that is down), and land when it is lifted. */
function cuttable(size: number) {
  const dev = new MemoryDevice(size, { name: 'peer' });
  const held: Array<() => void> = [];
  let cut = false, calls = 0;
  const write = dev.write.bind(dev);
  dev.write = (o, d, opts) => {
    calls++;
    if (!cut) return write(o, d, opts);
    return new Promise<void>((r) => held.push(r)).then(() => write(o, d, opts));
  };
  return {
    dev,
    calls: () => calls,
    cut: () => { cut = true; },
    heal: () => { cut = false; for (const r of held.splice(0)) r(); },
  };
}

test('degraded: a write the peer leaves unanswered is answered by the source alone, later ones skip the peer, all lagging until taken', async () => {
  const src = new MemoryDevice(SIZE), peer = cuttable(SIZE);
  const cursors = new JobCursors();
  const m = new Mirror(src, peer.dev, cursors, { degradeAfterMs: 50, granularity: G });
  m.start(new DirtyBitmap(SIZE, G));
  cursors.mirroredUpTo(SIZE);
  await m.write(0, fill(1));
  assert.not.ok(m.degraded);
  peer.cut();
  const t0 = performance.now();
  await m.write(G, fill(2));
  const waited = performance.now() - t0;
  assert.ok(waited >= 45 && waited < 1000, `answered after the grace time, not after the cut: ${waited} ms`);
  assert.ok(m.degraded && !m.settled, 'degraded, a late write still out');
  const before = peer.calls();
  await m.write(4 * G, fill(3));
  assert.is(peer.calls(), before, 'degraded: the peer is not asked any more');
  assert.equal(await src.read(4 * G, G), fill(3), 'the source has it');
  assert.throws(() => m.takeLagging(), /still out/, 'not taken while a late write may still land');
  let settled = false;
  const s = m.untilSettled().then(() => (settled = true));
  await new Promise((r) => setTimeout(r, 20));
  assert.not.ok(settled);
  peer.heal();
  await s;
  assert.equal(await peer.dev.read(G, G), fill(2), 'the late write landed');
  const lag = m.takeLagging()!;
  assert.equal([...lag.ranges()], [{ offset: G, length: G }, { offset: 4 * G, length: G }]);
  assert.not.ok(m.degraded, 'taken: the job copies them again');
  const st = m.stats();
  assert.is(st.degradedWrites, 2);
  assert.is(st.writes, 3);
  assert.ok(st.writeMaxMs >= 45 && st.writeMaxMs < 1000, JSON.stringify(st));
  await m.write(8 * G, fill(4));
  assert.equal(await peer.dev.read(8 * G, G), fill(4), 'mirrored again');
});

test('onDegrade: no write is answered by the source alone before the degradation is recorded; a failed record makes it wait for the peer', async () => {
  const src = new MemoryDevice(SIZE), peer = cuttable(SIZE);
  const cursors = new JobCursors();
  let record!: () => void, fail!: (e: Error) => void, calls = 0;
  const m = new Mirror(src, peer.dev, cursors, { degradeAfterMs: 30, granularity: G, onDegrade: () => { calls++; return new Promise<void>((res, rej) => { record = res; fail = rej; }); } });
  m.start(new DirtyBitmap(SIZE, G));
  cursors.mirroredUpTo(SIZE);
  peer.cut();
  let first = false, second = false;
  const w1 = m.write(0, fill(1)).then(() => (first = true));
  await new Promise((r) => setTimeout(r, 80));
  assert.ok(m.degraded, 'the peer is late: the write is lagging');
  const w2 = m.write(4 * G, fill(2)).then(() => (second = true));
  await new Promise((r) => setTimeout(r, 20));
  assert.not.ok(first || second, 'neither is acknowledged before the record is durable');
  assert.is(calls, 1, 'one record per degradation');
  record();
  await Promise.all([w1, w2]);
  peer.heal();
  await m.untilSettled();
  m.takeLagging();
  // The next degradation is recorded again; a record that fails: the guest waits for the peer.
  peer.cut();
  let third = false;
  const w3 = m.write(8 * G, fill(3)).then(() => (third = true));
  await new Promise((r) => setTimeout(r, 80));
  assert.is(calls, 2);
  fail(new Error('EIO'));
  await new Promise((r) => setTimeout(r, 20));
  assert.not.ok(third, 'not recorded: it waits for the peer');
  peer.heal();
  await w3;
  assert.equal(await peer.dev.read(8 * G, G), fill(3), 'the peer has it');
});

test('without degradeAfterMs a write waits for the peer, however long', async () => {
  const src = new MemoryDevice(SIZE), peer = cuttable(SIZE);
  const cursors = new JobCursors();
  const m = new Mirror(src, peer.dev, cursors);
  m.start(null);
  cursors.mirroredUpTo(SIZE);
  peer.cut();
  let done = false;
  const w = m.write(0, fill(5)).then(() => (done = true));
  await new Promise((r) => setTimeout(r, 100));
  assert.not.ok(done, 'the guest waits for both hosts');
  peer.heal();
  await w;
  assert.not.ok(m.degraded);
});

test.run();
