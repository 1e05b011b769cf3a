// Large, thin disks (issue 11 section 2): a copier pass jumps from extent to extent, so its
// calls grow with the extents, not the virtual size; a write into a hole the copier is
// jumping over is never lost; the dirty sets and the heat map hold and walk only what was
// written (same cost at 1 GiB and 16 TiB). Costs are counted (calls, words), never timed.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { randomBytes } from 'node:crypto';
import { DEFAULT_CAPS, type BlockDevice, type Extent } from '../../src/block/device.ts';
import { Tracker } from '../../src/block/tracker.ts';
import { JobCursors } from '../../src/migrate/cursors.ts';
import { Copier } from '../../src/migrate/copier.ts';
import { BloomDirtySet, DirtyBitmap, HeatMap, type DirtySet } from '../../src/tracking/index.ts';

const KiB = 1024, MiB = 1024 * KiB, GiB = 1024 * MiB, TiB = 1024 * GiB;
/** Allocation unit of the test device. */
const UNIT = 64 * KiB;

/**
 * A sparse device whose block status costs what its allocation costs (a sorted list of
 * allocated units), like SEEK_DATA on a file; it counts the calls the copier makes.
 * `afterStatus` runs after an answer is computed and before it is returned: a guest write
 * that lands just after the copier asked.
 */
class SparseDevice implements BlockDevice {
  readonly caps = { ...DEFAULT_CAPS };
  readonly name: string;
  readonly units = new Map<number, Buffer>();
  keys: number[] = [];
  calls = { blockStatus: 0, read: 0, write: 0, writeZeroes: 0 };
  afterStatus: ((offset: number, length: number) => Promise<void>) | null = null;

  constructor(readonly size: number, name = 'sparse') {
    this.name = name;
  }

  #index(u: number): number {
    let lo = 0, hi = this.keys.length;
    while (lo < hi) {
      const mid = (lo + hi) >>> 1;
      if (this.keys[mid]! < u) lo = mid + 1;
      else hi = mid;
    }
    return lo;
  }

  #unit(u: number): Buffer {
    let b = this.units.get(u);
    if (!b) {
      b = Buffer.alloc(UNIT);
      this.units.set(u, b);
      this.keys.splice(this.#index(u), 0, u);
    }
    return b;
  }

  #drop(u: number): void {
    if (this.units.delete(u)) this.keys.splice(this.#index(u), 1);
  }

  async read(offset: number, length: number): Promise<Buffer> {
    this.calls.read++;
    const out = Buffer.alloc(length);
    for (let pos = offset; pos < offset + length; ) {
      const u = Math.floor(pos / UNIT), at = pos - u * UNIT, n = Math.min(UNIT - at, offset + length - pos);
      this.units.get(u)?.copy(out, pos - offset, at, at + n);
      pos += n;
    }
    return out;
  }

  async write(offset: number, data: Buffer): Promise<void> {
    this.calls.write++;
    for (let pos = offset; pos < offset + data.length; ) {
      const u = Math.floor(pos / UNIT), at = pos - u * UNIT, n = Math.min(UNIT - at, offset + data.length - pos);
      data.copy(this.#unit(u), at, pos - offset, pos - offset + n);
      pos += n;
    }
  }

  /** Zeroes: whole units become holes (only allocated ones are visited), partial ones are cleared. */
  async writeZeroes(offset: number, length: number): Promise<void> {
    this.calls.writeZeroes++;
    const end = offset + length;
    for (let i = this.#index(Math.floor(offset / UNIT)); i < this.keys.length && this.keys[i]! * UNIT < end; ) {
      const u = this.keys[i]!, s = Math.max(offset, u * UNIT), t = Math.min(end, (u + 1) * UNIT);
      if (s === u * UNIT && t === (u + 1) * UNIT) this.#drop(u);
      else {
        this.units.get(u)!.fill(0, s - u * UNIT, t - u * UNIT);
        i++;
      }
    }
  }

  async trim(offset: number, length: number): Promise<void> {
    await this.writeZeroes(offset, length);
  }
  async flush(): Promise<void> {}
  async cache(): Promise<void> {}
  async close(): Promise<void> {}

  async blockStatus(offset: number, length: number): Promise<Extent[]> {
    this.calls.blockStatus++;
    const end = offset + length, out: Extent[] = [];
    let pos = offset;
    for (let i = this.#index(Math.floor(offset / UNIT)); pos < end && out.length < 64; ) {
      const u = this.keys[i];
      const dataAt = u === undefined ? end : Math.max(pos, u * UNIT);
      if (dataAt > pos) out.push({ offset: pos, length: Math.min(dataAt, end) - pos, hole: true, zero: true });
      if (u === undefined || dataAt >= end) break;
      let j = i;
      while (j + 1 < this.keys.length && this.keys[j + 1] === this.keys[j]! + 1) j++;
      const dataEnd = Math.min(end, (this.keys[j]! + 1) * UNIT);
      out.push({ offset: dataAt, length: dataEnd - dataAt, hole: false, zero: false });
      pos = dataEnd;
      i = j + 1;
    }
    if (this.afterStatus) await this.afterStatus(offset, length);
    return out;
  }
}

/** A source of `size` with `extents` runs of `extentLen` random bytes spread evenly; returns their offsets. */
async function thinSource(size: number, extents: number, extentLen: number): Promise<{ dev: SparseDevice; at: number[] }> {
  const dev = new SparseDevice(size, `source:${size}`);
  const at: number[] = [];
  for (let i = 0; i < extents; i++) {
    const offset = Math.floor(size / extents / UNIT) * UNIT * i + (i % 3) * UNIT;
    await dev.write(offset, randomBytes(extentLen));
    at.push(offset);
  }
  dev.calls = { blockStatus: 0, read: 0, write: 0, writeZeroes: 0 };
  return { dev, at };
}

async function assertSameData(src: SparseDevice, dst: SparseDevice): Promise<void> {
  assert.equal(dst.keys, src.keys, 'the destination holds data exactly where the source does');
  for (const u of src.keys) assert.ok(src.units.get(u)!.equals(dst.units.get(u)!), `unit ${u} differs`);
}

test('a full pass over a thin disk costs its extents: same reads and about the same block-status calls at 1 TiB and 16 TiB', async () => {
  const seen: Array<{ size: number; status: number; reads: number }> = [];
  for (const size of [TiB, 16 * TiB]) {
    const { dev: src } = await thinSource(size, 64, 256 * KiB);
    // A destination that does not read as zeroes: stale data in a hole of the source must be zeroed.
    const dst = new SparseDevice(size, 'dest');
    await dst.write(size / 2 + 5 * UNIT, randomBytes(UNIT));
    const copier = new Copier(src, dst, { chunkSize: MiB, concurrency: 4 });
    await copier.copy([{ offset: 0, length: size }], { destIsZero: false });
    await assertSameData(src, dst);
    assert.is(copier.stats.dataBytes, 64 * 256 * KiB);
    assert.is(copier.stats.extentBytes, 64 * 256 * KiB, 'only data extents are chunked');
    assert.is(copier.stats.processedBytes, size, 'the whole range is accounted for');
    seen.push({ size, status: src.calls.blockStatus, reads: src.calls.read });
  }
  const [small, large] = seen as [typeof seen[0], typeof seen[0]];
  assert.is(small.reads, 64, 'one read per data extent');
  assert.is(large.reads, 64, 'one read per data extent, whatever the size');
  // Holes are jumped in one step each: 16x the virtual size, the same calls.
  assert.is(large.status, small.status, `block-status calls: ${small.status} at 1 TiB, ${large.status} at 16 TiB`);
  assert.ok(large.status <= 64 * 3 + 2, `${large.status} block-status calls for 64 extents`);
});

test('a fresh destination is not written in the holes at all', async () => {
  const { dev: src } = await thinSource(4 * TiB, 16, UNIT);
  const dst = new SparseDevice(4 * TiB, 'dest');
  const copier = new Copier(src, dst, { chunkSize: MiB });
  await copier.copy([{ offset: 0, length: 4 * TiB }], { destIsZero: true });
  await assertSameData(src, dst);
  assert.is(dst.calls.writeZeroes, 0);
  assert.is(copier.stats.skippedBytes, 4 * TiB - 16 * UNIT);
});

test('a guest write into a hole just after the copier asked is copied or marked, never lost', async () => {
  for (const when of ['after the first answer', 'after the confirming answer'] as const) {
    const size = TiB;
    const { dev: src } = await thinSource(size, 4, UNIT);
    const dst = new SparseDevice(size, 'dest');
    const cursors = new JobCursors();
    const tracker = new Tracker(src, { kind: 'bitmap', granularity: 4096, cursor: cursors });
    cursors.trackBehindCopier();
    const target = 100 * GiB + 12345; // inside the hole after the second extent
    const payload = randomBytes(4096);
    let statusCalls = 0, wrote = false;
    src.afterStatus = async (offset, length) => {
      statusCalls++;
      // The first call whose answer covers the target is the finding one; the next is the confirmation.
      if (wrote || !(offset <= target && target < offset + length)) return;
      if (when === 'after the first answer' || (statusCalls > 1 && tracker.cursor > target)) {
        wrote = true;
        src.afterStatus = null;
        await tracker.write(target, payload);
      }
    };
    const copier = new Copier(src, dst, { chunkSize: MiB });
    await copier.copy([{ offset: 0, length: size }], {
      destIsZero: true,
      beforeChunk: (_s, end) => cursors.copierReaches(end),
    });
    assert.ok(wrote, `${when}: the write happened`);
    const onDest = (await dst.read(target, 4096)).equals(payload);
    const marked = tracker.dirty!.has(target, 4096);
    assert.ok(onDest || marked, `${when}: the write is neither on the destination nor marked dirty`);
    if (when === 'after the first answer') assert.ok(onDest, 'the confirming block status saw it and it was copied');
    else assert.ok(marked, 'the cursor had moved past the hole: the write was marked');
  }
});

/** Reference: the runs of a set of block indexes. */
function runs(blocks: Set<number>, g: number, size: number): Array<[number, number]> {
  const sorted = [...blocks].sort((a, b) => a - b), out: Array<[number, number]> = [];
  for (const b of sorted) {
    const last = out[out.length - 1];
    if (last && last[0] + last[1] === b * g) last[1] += g;
    else out.push([b * g, g]);
  }
  if (out.length) {
    const last = out[out.length - 1]!;
    last[1] = Math.min(last[0] + last[1], size) - last[0];
  }
  return out;
}

function list(set: DirtySet, from?: number): Array<[number, number]> {
  return [...set.ranges(from)].map((r) => [r.offset, r.length]);
}

test('sparse bitmap: exact against a reference at 16 TiB, across leaf edges, and walking it costs what was written', () => {
  const g = 4096, size = 16 * TiB + 3 * g + 100;
  const leafBytes = 8192 * g; // one leaf's span
  const marks: Array<[number, number]> = [
    [0, 1], [leafBytes - g, 2 * g], [5 * leafBytes - 3, 10], [7 * TiB + 1, 40 * g], [size - 50, 50],
    [3 * leafBytes, leafBytes], // exactly one whole leaf (shared FULL leaf)
    [3 * leafBytes + 5 * g, g], // a mark inside a full leaf changes nothing
  ];
  for (let i = 0; i < 200; i++) marks.push([Math.floor(Math.random() * (size / g)) * g + Math.floor(Math.random() * g), 1 + Math.floor(Math.random() * 20 * g)]);
  const bm = new DirtyBitmap(size, g), ref = new Set<number>();
  for (const [o, l] of marks) {
    bm.mark(o, l);
    for (let b = Math.floor(o / g); b <= Math.floor((Math.min(o + l, size) - 1) / g); b++) ref.add(b);
  }
  assert.equal(list(bm), runs(ref, g, size));
  assert.is(bm.dirtyBlocks(), ref.size);
  const from = 7 * TiB + 10 * g + 7;
  assert.equal(list(bm, from), runs(new Set([...ref].filter((b) => b >= Math.floor(from / g))), g, size));
  for (let i = 0; i < 300; i++) {
    const o = Math.floor(Math.random() * size), l = 1 + Math.floor(Math.random() * 64 * g);
    let want = false;
    for (let b = Math.floor(o / g); b <= Math.floor((Math.min(o + l, size) - 1) / g) && !want; b++) want = ref.has(b);
    assert.is(bm.has(o, l), want, `has(${o}, ${l})`);
  }
  assert.ok(bm.leaves <= marks.length * 2 + 2, `${bm.leaves} leaves for ${marks.length} marks`);
  assert.ok(bm.memoryBytes() < bm.denseBytes() / 1000, `${bm.memoryBytes()} bytes (dense: ${bm.denseBytes()})`);

  // The same writes near the start: walking costs the same words on 1 GiB and on 16 TiB.
  const scanned = [GiB, 16 * TiB].map((s) => {
    const b = new DirtyBitmap(s, g);
    for (let i = 0; i < 50; i++) b.mark(i * 7 * MiB, 4096);
    assert.is([...b.ranges()].length, 50);
    return b.scannedWords;
  });
  assert.is(scanned[1], scanned[0], `words read: ${scanned.join(' vs ')}`);

  // A whole-disk discard costs a small entry per leaf, no bits.
  const big = new DirtyBitmap(16 * TiB, 64 * KiB);
  big.mark(0, 16 * TiB);
  assert.equal(list(big), [[0, 16 * TiB]]);
  assert.ok(big.memoryBytes() < 4 * MiB, `${big.memoryBytes()} bytes after marking everything (dense ${big.denseBytes()})`);
});

test('Bloom set: never misses, walks only the stretches written (same tests at 1 GiB and 16 TiB), whole stretches unhashed', () => {
  const tested = [GiB, 16 * TiB].map((size) => {
    const bloom = new BloomDirtySet(size, { granularity: 4096, expectedBlocks: 10_000 });
    const offsets = Array.from({ length: 100 }, (_, i) => i * 9 * MiB + (i % 5) * 4096);
    for (const o of offsets) bloom.mark(o, 4096);
    const got = [...bloom.ranges()];
    for (const o of offsets) assert.ok(got.some((r) => r.offset <= o && o < r.offset + r.length), `block at ${o} missed`);
    assert.ok(bloom.has(offsets[3]!, 1));
    return bloom.testedBlocks;
  });
  assert.is(tested[1], tested[0], `blocks tested: ${tested.join(' vs ')}`);
  assert.ok(tested[0]! <= 100 * 64 * 2, `${tested[0]} blocks tested for 100 marks`);

  const bloom = new BloomDirtySet(16 * TiB, { granularity: 64 * KiB });
  bloom.mark(GiB, 100 * GiB + 64 * KiB); // a large discard: whole stretches plus one block
  const before = bloom.testedBlocks;
  assert.equal(list(bloom), [[GiB, 100 * GiB + 64 * KiB]]);
  assert.ok(bloom.testedBlocks - before <= 2 * 64, 'the whole stretches were taken without testing their blocks');
  assert.ok(Math.abs(bloom.dirtyBytes() - (100 * GiB + 64 * KiB)) <= 64 * KiB * 2, `dirtyBytes ${bloom.dirtyBytes()}`);
  assert.ok(bloom.memoryBytes() < 2 * MiB, `default sizing is capped: ${bloom.memoryBytes()} bytes at 16 TiB`);
});

test('heat map holds only regions written, at any disk size', () => {
  const heat = new HeatMap(16 * TiB);
  for (let i = 0; i < 10; i++) heat.record(8 * TiB + i * 4096, 4096);
  heat.record(TiB, 4096);
  assert.is(heat.regions, 2);
  assert.ok(heat.memoryBytes() <= 2 * 2048, `${heat.memoryBytes()} bytes for two stretches written`);
  assert.equal(heat.hotRegions(1), [{ offset: 8 * TiB, length: MiB, writes: 10 }]);
  heat.record(0, 16 * TiB); // a whole-disk discard is no rewrite pattern
  assert.is(heat.regions, 2);
  for (let i = 0; i < 14; i++) heat.decay(0.5);
  assert.is(heat.regions, 0, 'decayed regions are dropped');
});

test.run();
