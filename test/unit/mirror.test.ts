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

test.run();
