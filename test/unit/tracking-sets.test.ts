// The dirty sets and the heat map on their own: exact ranges of the bitmap (word edges,
// partial last block, offsets beyond 2^32), its memory at 1 TiB, the Bloom set's
// never-miss guarantee and measured false-positive rate, and heat ranking with decay.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { BloomDirtySet, DirtyBitmap, HeatMap, createDirtySet, type DirtySet } from '../../src/tracking/index.ts';

const KiB = 1024, MiB = 1024 * KiB, GiB = 1024 * MiB, TiB = 1024 * GiB;

function list(set: DirtySet, from?: number): Array<[number, number]> {
  return [...set.ranges(from)].map((r) => [r.offset, r.length]);
}

test('bitmap ranges merge across word edges, clamp the partial last block, and start at `from`', () => {
  const g = 512;
  const size = 100 * g + 100; // 101 blocks, the last one 100 bytes long
  const bm = new DirtyBitmap(size, g);
  bm.mark(10, 1);                 // block 0
  bm.mark(31 * g + 5, g);         // blocks 31-32: across the first word edge
  bm.mark(40 * g, 56 * g);        // blocks 40-95: a fully dirty word (64-95) inside a run
  bm.mark(size - 1, 1000);        // last block, clamped to the size
  bm.mark(size + 10, 10);         // past the end: ignored
  bm.mark(0, 0);                  // empty: ignored
  assert.equal(list(bm), [[0, g], [31 * g, 2 * g], [40 * g, 56 * g], [100 * g, 100]]);
  assert.equal(list(bm, 45 * g + 7), [[45 * g, 51 * g], [100 * g, 100]], 'from inside a run');
  assert.equal(list(bm, 97 * g), [[100 * g, 100]]);
  assert.equal(list(bm, size), []);
  assert.is(bm.dirtyBlocks(), 1 + 2 + 56 + 1);
  assert.is(bm.dirtyBytes(), (1 + 2 + 56) * g + 100);

  assert.ok(bm.has(0, 1));
  assert.ok(bm.has(g - 1, 2), 'a range touching a dirty block');
  assert.not.ok(bm.has(g, 30 * g), 'blocks 1-30 are clean');
  assert.not.ok(bm.has(33 * g, 7 * g), 'blocks 33-39 are clean');
  assert.ok(bm.has(33 * g, 7 * g + 1));
  assert.not.ok(bm.has(0, 0));

  bm.clear();
  assert.equal(list(bm), []);
  assert.is(bm.dirtyBytes(), 0);
  assert.not.ok(bm.has(0, size));
});

test('bitmap: a fully dirty device is one range; the last word edge is handled', () => {
  const bm = new DirtyBitmap(64 * 4096, 4096); // exactly two words
  bm.mark(0, 64 * 4096);
  assert.equal(list(bm), [[0, 64 * 4096]]);
  assert.is(bm.dirtyBytes(), 64 * 4096);
  bm.clear();
  bm.mark(63 * 4096, 1);
  assert.equal(list(bm), [[63 * 4096, 4096]]);
});

test('a 1 TiB bitmap at 64 KiB handles offsets past 2^32 and holds only the leaves written', () => {
  const bm = new DirtyBitmap(TiB);
  assert.is(bm.granularity, 64 * KiB);
  assert.is(bm.denseBytes(), 2 * MiB);
  assert.is(bm.memoryBytes(), 0);
  bm.mark(TiB - 100, 50);
  bm.mark(5 * GiB + 1, 64 * KiB); // two blocks, far above 2^32
  assert.equal(list(bm), [[5 * GiB, 128 * KiB], [TiB - 64 * KiB, 64 * KiB]]);
  assert.ok(bm.has(5 * GiB + 100 * KiB, 1));
  assert.not.ok(bm.has(5 * GiB + 128 * KiB, 64 * KiB));
  assert.is(bm.leaves, 2);
  assert.ok(bm.memoryBytes() < 4 * KiB, `${bm.memoryBytes()} bytes`);
});

test('granularity must be a power of two of at least 512', () => {
  assert.throws(() => new DirtyBitmap(MiB, 1000), /power of two/);
  assert.throws(() => new DirtyBitmap(MiB, 256), /power of two/);
  assert.throws(() => new BloomDirtySet(MiB, { granularity: 3 * 4096 }), /power of two/);
  assert.is(createDirtySet('bitmap', MiB, { granularity: 512 }).granularity, 512);
});

test('Bloom set never misses a marked block; false-positive rate is measured and near its target', () => {
  const size = 64 * GiB; // 1 Mi blocks of 64 KiB
  const marked = 10_000;
  const bloom = new BloomDirtySet(size, { expectedBlocks: marked, falsePositiveRate: 0.01 });
  const stride = 97;
  for (let i = 0; i < marked; i++) bloom.mark(i * stride * 64 * KiB + 123, 1);
  for (let i = 0; i < marked; i++) assert.ok(bloom.has(i * stride * 64 * KiB, 64 * KiB), `block ${i * stride} missed`);

  let falsePositives = 0, clean = 0;
  for (let b = 0; b < bloom.blocks; b++) {
    if (b % stride === 0 && b / stride < marked) continue;
    clean++;
    if (bloom.test(b)) falsePositives++;
  }
  const measured = falsePositives / clean;
  const estimated = bloom.estimatedFalsePositiveRate();
  const bitmapBytes = new DirtyBitmap(size).denseBytes();
  console.log(`  Bloom: ${marked} blocks marked of ${bloom.blocks}, k=${bloom.hashes}, ${bloom.words.byteLength} bytes ` +
    `(bitmap: ${bitmapBytes}); false positives ${falsePositives}/${clean} = ${(measured * 100).toFixed(3)}% ` +
    `(target 1%, estimated ${(estimated * 100).toFixed(3)}%)`);
  assert.ok(measured < 0.02, `false-positive rate ${measured} is far above the 1% target`);
  assert.ok(estimated > measured / 2 && estimated < measured * 2, `estimate ${estimated} vs measured ${measured}`);
  assert.ok(bloom.words.byteLength * 8 < bitmapBytes, 'the Bloom set is much smaller than the bitmap');
  const est = bloom.estimatedBlocks();
  assert.ok(Math.abs(est - marked) < marked * 0.05, `estimated ${est} distinct blocks, marked ${marked}`);
  assert.is(bloom.dirtyBytes(), est * 64 * KiB);
});

test('Bloom ranges cover every marked block, merged and clamped', () => {
  const g = 4096;
  const size = 1000 * g + 10;
  const bloom = new BloomDirtySet(size, { granularity: g, expectedBlocks: 100 });
  bloom.mark(5 * g, 3 * g);    // blocks 5-7
  bloom.mark(size - 5, 5);     // the partial last block
  const ranges = list(bloom);
  const covered = (b: number) => ranges.some(([o, l]) => o <= b * g && b * g < o + l);
  for (const b of [5, 6, 7, 1000]) assert.ok(covered(b), `block ${b}`);
  assert.equal(ranges[ranges.length - 1], [1000 * g, 10], 'clamped to the size');
  for (let i = 1; i < ranges.length; i++) {
    assert.ok(ranges[i]![0] > ranges[i - 1]![0] + ranges[i - 1]![1], 'ascending and merged (gaps between ranges)');
  }
  bloom.clear();
  assert.equal(list(bloom), []);
  assert.not.ok(bloom.has(0, size));
});

test('heat map names the hot spot hottest, and decay lowers the counts', () => {
  const heat = new HeatMap(64 * MiB);
  assert.is(heat.regions, 0);
  for (let i = 0; i < 50; i++) heat.record(10 * MiB + i * 4096, 4096);   // hot: region 10
  for (let i = 0; i < 20; i++) heat.record(40 * MiB + 100, 512);         // warm: region 40
  for (let r = 0; r < 64; r += 3) heat.record(r * MiB, 4096);            // background: one each
  heat.record(MiB - 10, 20);                                             // straddles regions 0 and 1

  const top = heat.hotRegions(3);
  assert.equal(top.map((r) => r.offset), [10 * MiB, 40 * MiB, 0]);
  assert.equal(top[0], { offset: 10 * MiB, length: MiB, writes: 50 });
  assert.is(top[1]!.writes, 20);
  assert.ok(heat.isHot(10 * MiB + 5, 1, 50));
  assert.ok(heat.isHot(9 * MiB, 2 * MiB, 50), 'a range touching the hot region');
  assert.not.ok(heat.isHot(11 * MiB, 20 * MiB, 5));

  heat.decay();
  assert.is(heat.hotRegions(1)[0]!.writes, 25);
  heat.decay(0.2);
  assert.is(heat.hotRegions(1)[0]!.writes, 5);
  assert.not.ok(heat.isHot(10 * MiB, 1, 10));
  assert.throws(() => heat.decay(2), /factor/);
  heat.clear();
  assert.equal(heat.hotRegions(5), []);
});

test.run();
