// Tracker over a real file device. The main test drives a seeded random workload of writes,
// write-zeroes and trims (some unaligned, some concurrent) through three stacked trackers
// (bitmap at 4 KiB, bitmap at 64 KiB, Bloom at 4 KiB) and checks them against a log of what
// was written: the bitmaps hold exactly the written blocks, the Bloom set misses none.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { join } from 'node:path';
import type { WriteOpts } from '../../src/block/device.ts';
import { FileDevice } from '../../src/block/file.ts';
import { Layer } from '../../src/block/layer.ts';
import { Tracker } from '../../src/block/tracker.ts';
import { JobCursors } from '../../src/migrate/cursors.ts';
import type { BloomDirtySet, DirtyRange, DirtySet } from '../../src/tracking/index.ts';
import { cleanupAll, onCleanup, tempDir } from '../helpers/proc.ts';

const KiB = 1024, MiB = 1024 * KiB;
let dir = '';
let n = 0;

test.before(() => {
  dir = tempDir('vms-track-');
});
test.after(cleanupAll);

async function file(size: number): Promise<FileDevice> {
  const dev = await FileDevice.open(join(dir, `t${n++}.raw`), { create: { size } });
  onCleanup(() => dev.close());
  return dev;
}

/** mulberry32: a small seeded PRNG, so a failure replays exactly. */
function prng(seed: number): () => number {
  return () => {
    seed = (seed + 0x6d2b79f5) | 0;
    let t = Math.imul(seed ^ (seed >>> 15), 1 | seed);
    t = (t + Math.imul(t ^ (t >>> 7), 61 | t)) ^ t;
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

type Op = { kind: 'write' | 'zero' | 'trim'; offset: number; length: number };

function randomOps(rand: () => number, count: number, size: number): Op[] {
  const ops: Op[] = [];
  const lengths = [1, 512, 4 * KiB, 16 * KiB, 256 * KiB];
  for (let i = 0; i < count; i++) {
    const r = rand();
    const kind = r < 0.7 ? 'write' : r < 0.85 ? 'zero' : 'trim';
    let offset = Math.floor(rand() * size);
    if (rand() < 0.5) offset -= offset % (4 * KiB); // half aligned, half not
    const max = lengths[Math.floor(rand() * lengths.length)]!;
    const length = Math.min(1 + Math.floor(rand() * max), size - offset);
    ops.push({ kind, offset, length });
  }
  return ops;
}

/** Runs the ops through `dev`, `parallel` at a time. */
async function apply(dev: Layer, ops: Op[], parallel = 8): Promise<void> {
  for (let i = 0; i < ops.length; i += parallel) {
    await Promise.all(ops.slice(i, i + parallel).map((op) =>
      op.kind === 'write' ? dev.write(op.offset, Buffer.alloc(op.length, 1 + (op.offset % 251)))
        : op.kind === 'zero' ? dev.writeZeroes(op.offset, op.length)
          : dev.trim(op.offset, op.length)));
  }
}

/** The blocks of `granularity` the ops touch, as a 0/1 array: the model a dirty set must match. */
function model(ops: Op[], size: number, granularity: number): Uint8Array {
  const blocks = new Uint8Array(Math.ceil(size / granularity));
  for (const op of ops) {
    for (let b = Math.floor(op.offset / granularity); b <= Math.floor((op.offset + op.length - 1) / granularity); b++) blocks[b] = 1;
  }
  return blocks;
}

/** A set's ranges as a 0/1 block array, checking they are ascending, merged and aligned. */
function blocksOf(set: DirtySet): Uint8Array {
  const blocks = new Uint8Array(Math.ceil(set.size / set.granularity));
  let prevEnd = -1;
  for (const r of set.ranges()) {
    assert.ok(r.offset > prevEnd, `range ${r.offset} not ascending/merged after ${prevEnd}`);
    assert.is(r.offset % set.granularity, 0, 'block aligned');
    assert.ok(r.length > 0 && r.offset + r.length <= set.size, 'clamped to size');
    for (let o = r.offset; o < r.offset + r.length; o += set.granularity) blocks[o / set.granularity] = 1;
    prevEnd = r.offset + r.length;
  }
  return blocks;
}

function covered(ranges: DirtyRange[], op: Op): boolean {
  // Every byte of op lies in some range: walk the sorted ranges from the op's start.
  let pos = op.offset;
  for (const r of ranges) {
    if (r.offset <= pos && pos < r.offset + r.length) pos = r.offset + r.length;
    if (pos >= op.offset + op.length) return true;
  }
  return false;
}

/** Equal block sets; on failure names the first differing block instead of dumping both arrays. */
function sameBlocks(actual: Uint8Array, expected: Uint8Array, what: string): void {
  const k = expected.findIndex((v, i) => v !== actual[i]);
  assert.ok(k < 0 && actual.length === expected.length,
    `${what}: block ${k} is ${actual[k] ? 'marked' : 'unmarked'} but was ${expected[k] ? '' : 'not '}written`);
}

function count(blocks: Uint8Array): number {
  return blocks.reduce((a, b) => a + b, 0);
}

test('tracking is exact under a random mixed workload, across a swap', async () => {
  const size = 64 * MiB;
  const dev = await file(size);
  const fine = new Tracker(dev, { kind: 'bitmap', granularity: 4 * KiB });
  const coarse = new Tracker(fine, { kind: 'bitmap' });
  const bloom = new Tracker(coarse, { kind: 'bloom', granularity: 4 * KiB, expectedBlocks: 10_000 });
  const rand = prng(0x5eed);
  const phases = [randomOps(rand, 1500, size), randomOps(rand, 1500, size)];

  const sets: Array<{ fine: DirtySet; coarse: DirtySet; bloom: BloomDirtySet }> = [];
  for (const ops of phases) {
    await apply(bloom, ops);
    // The copier's move: take the sets filled so far, tracking goes on in fresh ones.
    sets.push({ fine: fine.swap(), coarse: coarse.swap(), bloom: bloom.swap() as BloomDirtySet });
  }

  phases.forEach((ops, i) => {
    const { fine: f, coarse: c, bloom: b } = sets[i]!;
    const expectFine = model(ops, size, 4 * KiB);
    assert.ok(count(expectFine) > 1000 && count(expectFine) < expectFine.length - 1000, 'the workload leaves both dirty and clean blocks');
    sameBlocks(blocksOf(f), expectFine, `phase ${i}: 4 KiB bitmap`);
    sameBlocks(blocksOf(c), model(ops, size, 64 * KiB), `phase ${i}: 64 KiB bitmap`);
    assert.is(f.dirtyBytes(), count(expectFine) * 4 * KiB);
    const fineRanges = [...f.ranges()], bloomRanges = [...b.ranges()];
    for (const op of ops) {
      assert.ok(covered(fineRanges, op), `phase ${i}: ${op.kind} ${op.offset}+${op.length} not covered`);
      assert.ok(b.has(op.offset, op.length), `phase ${i}: Bloom missed ${op.kind} ${op.offset}+${op.length}`);
      assert.ok(covered(bloomRanges, op), `phase ${i}: Bloom ranges miss ${op.offset}+${op.length}`);
    }
    // Bloom over-reports a little and never under-reports.
    const bloomBlocks = blocksOf(b);
    const extra = bloomBlocks.reduce((a, v, k) => a + (v && !expectFine[k] ? 1 : 0), 0);
    console.log(`  phase ${i}: ${count(expectFine)} dirty 4 KiB blocks, Bloom adds ${extra} false positives ` +
      `(estimated rate ${(b.estimatedFalsePositiveRate() * 100).toFixed(2)}%)`);
    assert.ok(extra < 0.05 * (expectFine.length - count(expectFine)), 'Bloom false positives stay rare');
  });

  const st = fine.stats();
  assert.is(st.writes, 3000);
  assert.is(st.marked, 3000);
  assert.is(st.skippedAhead, 0);
  assert.is(st.bytesWritten, phases.flat().reduce((a, op) => a + op.length, 0));
  assert.is(st.dirtyBytes, 0, 'the set installed by the last swap is empty');
});

/** Holds writes until released, so a test can decide when a write completes. */
class Hold extends Layer {
  #waiting: Array<() => void> = [];
  get waiting(): number {
    return this.#waiting.length;
  }
  release(): void {
    for (const go of this.#waiting.splice(0)) go();
  }
  override async write(offset: number, data: Buffer, opts?: WriteOpts): Promise<void> {
    await new Promise<void>((go) => this.#waiting.push(go));
    return this.inner.write(offset, data, opts);
  }
}

test('a write in flight during swap() lands in the new set', async () => {
  const hold = new Hold(await file(4 * MiB));
  const tracker = new Tracker(hold, { kind: 'bitmap' });
  const w = tracker.write(MiB, Buffer.alloc(4096, 9));
  await new Promise((r) => setImmediate(r));
  assert.is(hold.waiting, 1);
  const old = tracker.swap();
  hold.release();
  await w;
  assert.not.ok(old.has(MiB, 4096), 'old set must not claim the late write (the copier read it too early)');
  assert.ok(tracker.dirty!.has(MiB, 4096), 'the next pass sees it');
});

test('incremental: writes ahead of the cursor are skipped and counted, checked when they complete', async () => {
  const hold = new Hold(await file(8 * MiB));
  const cursors = new JobCursors();
  const tracker = new Tracker(hold, { kind: 'bitmap', cursor: cursors });
  const write = async (offset: number, length: number) => {
    const p = tracker.write(offset, Buffer.alloc(length, 5));
    await new Promise((r) => setImmediate(r));
    hold.release();
    await p;
  };
  cursors.trackBehindCopier();
  cursors.copierReaches(1 * MiB);
  await write(2 * MiB, 4096);            // ahead: the copier will read it later anyway
  await write(1 * MiB, 4096);            // starts at the cursor: still ahead
  await write(512 * KiB, 1 * MiB);       // starts behind, runs past: marked whole
  await write(100, 10);                  // behind
  const set = tracker.dirty!;
  assert.equal([...set.ranges()], [{ offset: 0, length: 64 * KiB }, { offset: 512 * KiB, length: 1 * MiB }]);
  assert.not.ok(set.has(2 * MiB, 4096));
  let st = tracker.stats();
  assert.is(st.skippedAhead, 2);
  assert.is(st.marked, 2);
  assert.is(st.writes, 4);

  // Issued ahead of the cursor, completed after the copier moved the cursor past it: marked.
  const late = tracker.write(3 * MiB, Buffer.alloc(4096));
  await new Promise((r) => setImmediate(r));
  cursors.copierReaches(4 * MiB);
  hold.release();
  await late;
  assert.ok(set.has(3 * MiB, 4096));

  cursors.trackEverything(); // pass 2 on: everything counts
  await write(7 * MiB, 4096);
  assert.ok(set.has(7 * MiB, 4096));
  st = tracker.stats();
  assert.is(st.skippedAhead, 2);
  assert.is(st.marked, 4);
});

test('heat, stats and write listeners', async () => {
  const tracker = new Tracker(await file(16 * MiB), { kind: 'bitmap', heat: true });
  const seen: string[] = [];
  const off = tracker.onWrite((o, l) => seen.push(`${o}+${l}`));
  tracker.onWrite(() => { throw new Error('a broken listener'); });
  for (let i = 0; i < 30; i++) await tracker.write(5 * MiB + i * 512, Buffer.alloc(512, 1));
  for (let r = 0; r < 16; r += 2) await tracker.writeZeroes(r * MiB, 4096);
  await tracker.trim(9 * MiB, 8192);
  assert.is(seen.length, 30 + 8 + 1);
  assert.is(seen[0], `${5 * MiB}+512`);
  assert.is(seen[seen.length - 1], `${9 * MiB}+8192`);
  off();
  await tracker.write(0, Buffer.alloc(512));
  assert.is(seen.length, 39, 'unsubscribed');

  const st = tracker.stats();
  assert.is(st.hot.length, 5);
  assert.equal(st.hot[0], { offset: 5 * MiB, length: MiB, writes: 30 });
  assert.ok(tracker.heat!.isHot(5 * MiB, 1, 10));
  tracker.heat!.decay();
  assert.is(tracker.stats().hot[0]!.writes, 15);
  assert.is(st.bytesWritten, 30 * 512 + 8 * 4096 + 8192 + 512);
});

test("kind 'none' counts writes but has no set to swap", async () => {
  const tracker = new Tracker(await file(MiB), { kind: 'none' });
  await tracker.write(0, Buffer.alloc(512));
  assert.is(tracker.dirty, null);
  assert.throws(() => tracker.swap(), /none/);
  const st = tracker.stats();
  assert.is(st.writes, 1);
  assert.is(st.marked, 0);
  assert.is(st.dirtyBytes, 0);
  assert.equal(st.hot, []);
});

test.run();
