// FileDevice on real temp files (and a loop device when the machine allows one): data round
// trip, sparseness from the native addon (checked against `stat` blocks and qemu-img map),
// FUA/flush, range and permission errors, and the portable path without the addon.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { execFile, execFileSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { closeSync, constants as fsc, fsyncSync, openSync, readFileSync, statSync, statfsSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';
import { BlockError, type Extent } from '../../src/block/device.ts';
import { FileDevice, loadNative } from '../../src/block/file.ts';
import { Copier, CopyError } from '../../src/migrate/copier.ts';
import { cleanupAll, onCleanup, tempDir } from '../helpers/proc.ts';

// execFile rather than the helpers' run(): no stdin pipe, so a command that exits at once
// cannot raise EPIPE.
const exec = promisify(execFile);

const MiB = 1024 * 1024;
const root = fileURLToPath(new URL('../..', import.meta.url));
let dir = '';
let n = 0;

test.before(async () => {
  await exec('bash', [join(root, 'scripts/build-native.sh')]);
  dir = tempDir('vms-file-');
});
test.after(cleanupAll);

/** A fresh sparse file device of `size` bytes, closed at cleanup. */
async function fresh(size = 8 * MiB, opts: { native?: boolean } = {}): Promise<FileDevice> {
  const dev = await FileDevice.open(join(dir, `d${n++}.raw`), { create: { size }, ...opts });
  onCleanup(() => dev.close());
  return dev;
}

function blocksOf(dev: FileDevice): number {
  return statSync(dev.path).blocks;
}

/** Reject unless `p` fails with a BlockError of errno `errno`. */
async function rejects(p: Promise<unknown>, errno: string): Promise<void> {
  try {
    await p;
  } catch (err) {
    assert.instance(err, BlockError);
    assert.is((err as BlockError).errno, errno, (err as Error).message);
    return;
  }
  assert.unreachable(`expected ${errno}`);
}

/** Extents as compact [offset, length, hole] triples, adjacent equal kinds merged. */
function shape(extents: Extent[]): Array<[number, number, boolean]> {
  const out: Array<[number, number, boolean]> = [];
  for (const e of extents) {
    const last = out[out.length - 1];
    if (last && last[2] === e.hole && last[0] + last[1] === e.offset) last[1] += e.length;
    else out.push([e.offset, e.length, e.hole]);
  }
  return out;
}

test('the native addon is built and loaded', () => {
  assert.ok(loadNative(), 'scripts/build-native.sh ran but the addon did not load');
});

test('data written at unaligned offsets reads back, and is what the file holds', async () => {
  const dev = await fresh(4 * MiB);
  assert.is(dev.size, 4 * MiB);
  const writes: Array<[number, Buffer]> = [[0, randomBytes(4096)], [12345, randomBytes(100_000)], [4 * MiB - 777, randomBytes(777)]];
  await Promise.all(writes.map(([off, data]) => dev.write(off, data)));
  for (const [off, data] of writes) assert.ok((await dev.read(off, data.length)).equals(data), `read at ${off}`);
  const onDisk = readFileSync(dev.path);
  for (const [off, data] of writes) assert.ok(onDisk.subarray(off, off + data.length).equals(data), `file at ${off}`);
  assert.ok((await dev.read(200_000, 1000)).equals(Buffer.alloc(1000)), 'unwritten bytes read as zeroes');
});

test('writes up to 256 KiB are made inline (on the event loop), larger ones in the thread pool; both read back', async () => {
  const dev = await fresh(4 * MiB);
  const small = randomBytes(4096), edge = randomBytes(256 * 1024), large = randomBytes(256 * 1024 + 1);
  await dev.write(8192, small);
  await dev.write(MiB, edge);
  assert.equal(dev.inlineCounts.done, 2, 'the 4 KiB and the 256 KiB write (a bulk copier\'s request) were inline');
  await dev.write(2 * MiB, large);
  assert.equal(dev.inlineCounts.done, 2, 'a write over 256 KiB went through the pool');
  const onDisk = readFileSync(dev.path);
  assert.ok(onDisk.subarray(8192, 8192 + 4096).equals(small));
  assert.ok(onDisk.subarray(MiB, MiB + edge.length).equals(edge));
  assert.ok(onDisk.subarray(2 * MiB, 2 * MiB + large.length).equals(large));
  const plain = await fresh(MiB, { native: false });
  await plain.write(0, small);
  assert.equal(plain.inlineCounts.done, 0, 'without the addon every write goes through the pool');
});

test('a small read of cached data is made inline; uncached data and large reads are read in the pool; the bytes are right', async () => {
  const path = join(dir, 'cold.raw');
  const data = randomBytes(2 * MiB);
  writeFileSync(path, data);
  const fd = openSync(path, fsc.O_RDONLY);
  fsyncSync(fd);
  closeSync(fd);
  // Drop the file's clean pages from the page cache (GNU dd: nocache with count=0 = whole file).
  execFileSync('dd', [`if=${path}`, 'iflag=nocache', 'count=0', 'status=none']);
  const resident = () => Number(execFileSync('fincore', ['--bytes', '--noheadings', '--output', 'RES', path], { encoding: 'utf8' }).trim());
  // tmpfs keeps files only in the page cache: there every read is a cached one.
  const onTmpfs = statfsSync(dir).type === 0x01021994;
  if (!onTmpfs) assert.is(resident(), 0, 'test setup: the file should have left the page cache');
  const dev = await FileDevice.open(path);
  onCleanup(() => dev.close());
  assert.ok((await dev.read(MiB, 4096)).equals(data.subarray(MiB, MiB + 4096)), 'uncached read');
  if (onTmpfs) console.log('  (temp dir on tmpfs: the uncached read is not checked)');
  else assert.is(dev.inlineCounts.done, 0, 'an uncached read went to the pool (RWF_NOWAIT refused it)');
  const before = dev.inlineCounts.done;
  assert.ok((await dev.read(MiB, 4096)).equals(data.subarray(MiB, MiB + 4096)), 'cached read');
  assert.is(dev.inlineCounts.done, before + 1, 'the same block, now cached, was read inline');
  assert.ok((await dev.read(0, 2 * MiB)).equals(data), 'a 2 MiB read');
  assert.is(dev.inlineCounts.done, before + 1, 'a read over 64 KiB went to the pool');
  const into = Buffer.alloc(4096);
  assert.is(await dev.read(4096, 4096, into), into, 'an inline read fills the buffer it was given');
  assert.ok(into.equals(data.subarray(4096, 8192)));
});

test('writeInline reports the time a write slept (an O_DSYNC write waits for the disk) and errors by errno; readInline reads what is cached', () => {
  const native = loadNative()!;
  const path = join(dir, 'inline.raw');
  writeFileSync(path, Buffer.alloc(0));
  // tmpfs has no disk to wait for: the sleeping write needs a real filesystem.
  const onTmpfs = statfsSync(dir).type === 0x01021994;
  const fd = openSync(path, fsc.O_RDWR | (onTmpfs ? 0 : fsc.O_DSYNC));
  onCleanup(() => closeSync(fd));
  const data = randomBytes(64 * 1024);
  const ms = native.writeInline(fd, data, 4096);
  if (onTmpfs) console.log('  (temp dir on tmpfs: the O_DSYNC sleep is not checked)');
  else assert.ok(ms > 0, `an O_DSYNC write to ${dir} did not report sleeping: ${ms}`);
  assert.ok(readFileSync(path).subarray(4096).equals(data), 'all bytes written');
  const ro = openSync(path, fsc.O_RDONLY);
  onCleanup(() => closeSync(ro));
  assert.throws(() => native.writeInline(ro, data, 0), (e: NodeJS.ErrnoException) => e.code === 'EBADF');
  assert.throws(() => native.writeInline(fd, 'not a buffer' as unknown as Buffer, 0), (e: NodeJS.ErrnoException) => e.code === 'EINVAL');
  assert.throws(() => native.writeInline(fd, data, -1), (e: NodeJS.ErrnoException) => e.code === 'EINVAL');
  const back = Buffer.alloc(data.length);
  assert.is(native.readInline(fd, back, 4096), 0, 'just written: cached, read without sleeping');
  assert.ok(back.equals(data));
  assert.is(native.readInline(fd, Buffer.alloc(8192), 4096 + data.length - 4096), -1, 'a range past the end is a short read: -1');
  assert.throws(() => native.readInline(fd, back, -1), (e: NodeJS.ErrnoException) => e.code === 'EINVAL');
  // procfs has no page-cache-only reads (as NFS and FUSE): -2, "stop asking".
  const proc = openSync('/proc/self/status', fsc.O_RDONLY);
  onCleanup(() => closeSync(proc));
  assert.is(native.readInline(proc, Buffer.alloc(16), 0), -2);
});

test('block status follows writes, trims and write-zeroes, and space is freed', async () => {
  const dev = await fresh(8 * MiB);
  assert.ok(dev.sparse);
  assert.equal(shape(await dev.blockStatus(0, dev.size)), [[0, 8 * MiB, true]], 'fresh file is one hole');

  await dev.write(1 * MiB, randomBytes(256 * 1024));
  await dev.write(5 * MiB, randomBytes(64 * 1024));
  assert.equal(shape(await dev.blockStatus(0, dev.size)), [
    [0, 1 * MiB, true], [1 * MiB, 256 * 1024, false], [1 * MiB + 256 * 1024, 4 * MiB - 256 * 1024, true],
    [5 * MiB, 64 * 1024, false], [5 * MiB + 64 * 1024, 3 * MiB - 64 * 1024, true],
  ]);
  // An answer may start mid-extent and must stop at offset+length.
  assert.equal(shape(await dev.blockStatus(1 * MiB + 4096, 8192)), [[1 * MiB + 4096, 8192, false]]);
  // qemu-img reads the same file through its own SEEK_DATA code: the data ranges must agree.
  const map = JSON.parse((await exec('qemu-img', ['map', '-f', 'raw', '--output=json', dev.path])).stdout) as Array<{ start: number; length: number; data: boolean }>;
  const qemuData = map.filter((e) => e.data).map((e) => [e.start, e.length]);
  assert.equal(qemuData, [[1 * MiB, 256 * 1024], [5 * MiB, 64 * 1024]]);

  const before = blocksOf(dev);
  await dev.trim(1 * MiB, 256 * 1024);
  const afterTrim = blocksOf(dev);
  assert.ok(afterTrim <= before - 256 * 1024 / 512, `trim freed space: ${before} -> ${afterTrim} blocks`);
  assert.ok((await dev.read(1 * MiB, 256 * 1024)).equals(Buffer.alloc(256 * 1024)), 'trimmed range reads as zeroes');

  await dev.writeZeroes(5 * MiB, 64 * 1024);
  assert.equal(shape(await dev.blockStatus(0, dev.size)), [[0, 8 * MiB, true]], 'write-zeroes punched the last data');
  assert.ok(blocksOf(dev) <= afterTrim - 64 * 1024 / 512, 'write-zeroes freed space');
});

test('write-zeroes with noHole allocates, and reads as zeroes', async () => {
  const dev = await fresh(4 * MiB);
  await dev.write(MiB, Buffer.alloc(MiB, 0xab));
  const before = blocksOf(dev);
  await dev.writeZeroes(2 * MiB, MiB, { noHole: true });
  assert.ok(blocksOf(dev) >= before + MiB / 512, `noHole allocated: ${before} -> ${blocksOf(dev)} blocks`);
  await dev.writeZeroes(MiB, MiB, { noHole: true });
  assert.ok((await dev.read(MiB, 2 * MiB)).equals(Buffer.alloc(2 * MiB)), 'data became zeroes');
  assert.ok(blocksOf(dev) >= 2 * MiB / 512, 'still allocated');
  await dev.writeZeroes(0, 4096, { fastZero: true });
});

test('FUA writes and flushes call fdatasync; plain writes do not', async () => {
  const dev = await fresh(MiB);
  const s0 = dev.syncCount;
  await dev.write(0, Buffer.alloc(4096, 1));
  assert.is(dev.syncCount, s0, 'plain write');
  await dev.write(4096, Buffer.alloc(4096, 2), { fua: true });
  assert.is(dev.syncCount, s0 + 1, 'fua write');
  await dev.writeZeroes(0, 4096, { fua: true });
  await dev.trim(8192, 4096, { fua: true });
  assert.is(dev.syncCount, s0 + 3, 'fua write-zeroes and trim');
  await dev.flush();
  assert.is(dev.syncCount, s0 + 4, 'flush');
  assert.ok((await dev.read(4096, 4096)).equals(Buffer.alloc(4096, 2)));
});

test('requests past the end fail with EINVAL; after close with ESHUTDOWN', async () => {
  const dev = await fresh(MiB);
  await rejects(dev.read(MiB - 100, 101), 'EINVAL');
  await rejects(dev.write(MiB, Buffer.alloc(1)), 'EINVAL');
  await rejects(dev.writeZeroes(-1, 10), 'EINVAL');
  await rejects(dev.blockStatus(0, MiB + 1), 'EINVAL');
  assert.is((await dev.read(MiB - 100, 100)).length, 100, 'the last bytes are readable');
  await dev.close();
  await rejects(dev.read(0, 1), 'ESHUTDOWN');
});

test('a read-only device refuses writes with EPERM and still reads', async () => {
  const path = join(dir, 'ro.raw');
  writeFileSync(path, Buffer.alloc(64 * 1024, 7));
  const dev = await FileDevice.open(path, { readOnly: true });
  onCleanup(() => dev.close());
  assert.ok(dev.caps.readOnly);
  await rejects(dev.write(0, Buffer.alloc(512)), 'EPERM');
  await rejects(dev.writeZeroes(0, 512), 'EPERM');
  await rejects(dev.trim(0, 512), 'EPERM');
  assert.ok((await dev.read(0, 512)).equals(Buffer.alloc(512, 7)));
  assert.equal(readFileSync(path), Buffer.alloc(64 * 1024, 7), 'file unchanged');
});

test('create refuses an existing file of another size; open of a missing file fails', async () => {
  const path = join(dir, 'sized.raw');
  writeFileSync(path, Buffer.alloc(8192));
  try {
    await FileDevice.open(path, { create: { size: 4096 } });
    assert.unreachable('size mismatch accepted');
  } catch (err) {
    assert.instance(err, BlockError);
    assert.match((err as Error).message, /8192/);
  }
  const same = await FileDevice.open(path, { create: { size: 8192 } });
  await same.close();
  await rejects(FileDevice.open(join(dir, 'missing.raw')), 'EIO');
});

test('without the addon: all data, real zeroes, no fast zero, same bytes', async () => {
  const dev = await fresh(4 * MiB, { native: false });
  assert.not.ok(dev.sparse);
  assert.not.ok(dev.caps.canFastZero);
  assert.not.ok(dev.caps.canTrim);
  assert.equal(await dev.blockStatus(0, dev.size), [{ offset: 0, length: 4 * MiB, hole: false, zero: false }]);
  const data = randomBytes(MiB);
  await dev.write(MiB, data);
  assert.ok((await dev.read(MiB, MiB)).equals(data));
  await dev.writeZeroes(MiB, 512 * 1024);
  assert.ok((await dev.read(MiB, MiB)).equals(Buffer.concat([Buffer.alloc(512 * 1024), data.subarray(512 * 1024)])));
  assert.ok(blocksOf(dev) >= MiB / 512, 'zeroes were written, not punched');
  await rejects(dev.writeZeroes(0, 4096, { fastZero: true }), 'ENOTSUP');
  await dev.trim(2 * MiB - 4096, 4096); // advisory: accepted, does nothing
  assert.ok((await dev.read(2 * MiB - 4096, 4096)).equals(data.subarray(MiB - 4096)));
});

/** A source with data, a hole, zero blocks inside data and an unaligned tail: what copies must keep. */
async function mixedSource(size: number): Promise<FileDevice> {
  const src = await fresh(size);
  await src.write(0, randomBytes(3 * MiB + 12345));
  await src.write(MiB + 64 * 1024, Buffer.alloc(192 * 1024)); // zero blocks inside data
  await src.write(5 * MiB + 100, randomBytes(700_000)); // after a hole, not block aligned
  await src.write(size - 777, randomBytes(777)); // the last bytes
  return src;
}

test('copyTo copies file to file in a worker thread: same bytes, holes and zero blocks stay holes', async () => {
  const size = 8 * MiB + 4096;
  const src = await mixedSource(size);
  const dst = await fresh(size);
  assert.ok(src.canCopyTo(dst));
  const total = { dataBytes: 0, zeroBytes: 0, skippedBytes: 0 };
  // Chunks that do not line up with the data, the hole or the end.
  for (let off = 0; off < size; off += 3 * MiB - 4096) {
    const got = await src.copyTo(dst, [{ offset: off, length: Math.min(3 * MiB - 4096, size - off) }], { writeback: true });
    for (const k of Object.keys(total) as Array<keyof typeof total>) total[k] += got[k];
  }
  assert.ok(readFileSync(dst.path).equals(readFileSync(src.path)), 'destination equals source');
  assert.is(total.dataBytes + total.zeroBytes + total.skippedBytes, size, 'every byte accounted for');
  assert.ok(total.zeroBytes >= 192 * 1024 + 2 * MiB - 100_000, `holes and zero blocks zeroed: ${total.zeroBytes}`);
  assert.ok(blocksOf(dst) <= blocksOf(src) - (192 * 1024) / 512, `destination thinner than the source: ${blocksOf(dst)} vs ${blocksOf(src)} blocks`);
  // destIsZero: zero regions are not touched at all.
  const dst2 = await fresh(size);
  const got = await src.copyTo(dst2, [{ offset: 0, length: size }], { destIsZero: true });
  assert.is(got.zeroBytes, 0);
  assert.is(got.skippedBytes, size - got.dataBytes);
  assert.ok(readFileSync(dst2.path).equals(readFileSync(src.path)), 'destIsZero copy equals source');
});

test('copyTo drop-behind: an earlier span is written back and leaves the page cache; the bytes are the same', async () => {
  const size = 8 * MiB;
  const src = await fresh(size);
  const data = randomBytes(size);
  await src.write(0, data);
  const dst = await fresh(size);
  // fincore: how many of the destination's bytes are in the page cache.
  const resident = () => Number(execFileSync('fincore', ['--bytes', '--noheadings', '--output', 'RES', dst.path], { encoding: 'utf8' }).trim());
  let drop: { offset: number; length: number } | undefined;
  for (let off = 0; off < size; off += MiB) {
    await src.copyTo(dst, [{ offset: off, length: MiB }], { writeback: true, dropBehind: drop });
    drop = { offset: off, length: MiB };
    // Each call dropped the chunk before it: only the one just written is cached.
    assert.ok(resident() <= MiB, `after the chunk at ${off}: ${resident()} bytes cached`);
  }
  assert.ok(readFileSync(dst.path).equals(data), 'destination equals source');
  // The span of an earlier call may be the whole file (the reads above cached it again).
  await src.copyTo(dst, [{ offset: 0, length: 4096 }], { dropBehind: { offset: 0, length: size } });
  assert.ok(resident() <= 4096, `destination pages left in the page cache: ${resident()} bytes`);
  assert.ok(readFileSync(dst.path).equals(data), 'still equal after the drop');
  await rejects(src.copyTo(dst, [{ offset: 0, length: 4096 }], { dropBehind: { offset: size - 4096, length: 8192 } }), 'EINVAL');
});

test('copyTo copies a batch of scattered ranges in one call, and only those', async () => {
  const size = 8 * MiB + 4096;
  const src = await mixedSource(size);
  const dst = await fresh(size);
  await dst.write(0, Buffer.alloc(size, 0xee)); // so that what is not copied shows
  const ranges = Array.from({ length: 300 }, (_, i) => ({ offset: i * 27 * 1024 + (i % 7) * 512, length: 4096 + (i % 3) * 1000 }));
  ranges.push({ offset: size - 777, length: 777 });
  const got = await src.copyTo(dst, ranges, {});
  const want = ranges.reduce((n, r) => n + r.length, 0);
  assert.is(got.dataBytes + got.zeroBytes + got.skippedBytes, want);
  const s = readFileSync(src.path), d = readFileSync(dst.path);
  const copied = new Uint8Array(size);
  for (const r of ranges) {
    copied.fill(1, r.offset, r.offset + r.length);
    assert.ok(d.subarray(r.offset, r.offset + r.length).equals(s.subarray(r.offset, r.offset + r.length)), `range ${r.offset}+${r.length}`);
  }
  for (let i = 0; i < size; i += 4099) if (!copied[i]) assert.is(d[i], 0xee, `byte ${i} outside the ranges untouched`);
  await rejects(src.copyTo(dst, [{ offset: 0, length: 4096 }, { offset: size - 100, length: 101 }]), 'EINVAL');
});

test('copyTo refuses ranges past the end and read-only destinations, and names the side that failed', async () => {
  const src = await mixedSource(8 * MiB + 4096);
  const dst = await fresh(8 * MiB + 4096);
  await rejects(src.copyTo(dst, [{ offset: 8 * MiB, length: MiB }]), 'EINVAL');
  const roPath = join(dir, 'ro-dst.raw');
  writeFileSync(roPath, Buffer.alloc(src.size));
  const ro = await FileDevice.open(roPath, { readOnly: true });
  onCleanup(() => ro.close());
  assert.not.ok(src.canCopyTo(ro));
  await rejects(src.copyTo(ro, [{ offset: 0, length: MiB }]), 'ENOTSUP');
  assert.equal(readFileSync(roPath), Buffer.alloc(src.size), 'read-only destination untouched');
  // A closed destination is refused before any worker runs. (ENOSPC mid-copy, reported as
  // the destination's, is tested in test/interop/migrate-faults.test.ts on a full tmpfs.)
  const closed = await fresh(8 * MiB + 4096);
  await closed.close();
  await rejects(src.copyTo(closed, [{ offset: 0, length: MiB }]), 'ESHUTDOWN');
});

test('the copier gives the same destination through copyTo and through reads and writes', async () => {
  const size = 8 * MiB + 4096;
  const src = await mixedSource(size);
  const outs: Buffer[] = [];
  const before = readFileSync(src.path).subarray(3 * MiB, 3 * MiB + 64 * 1024);
  const after = randomBytes(64 * 1024);
  for (const native of [true, false]) {
    await src.write(3 * MiB, before);
    const dst = await fresh(size);
    const copier = new Copier(src, dst, { chunkSize: 2 * MiB, concurrency: 3, native });
    assert.is(copier.native, native);
    await copier.copy([{ offset: 0, length: size }], { destIsZero: true });
    assert.is(copier.stats.processedBytes, size);
    assert.is(copier.stats.dataBytes + copier.stats.skippedBytes, size);
    // Scattered small ranges (a dirty pass: batched on the native path) over a changed source.
    await src.write(3 * MiB, after);
    const dirty = Array.from({ length: 16 }, (_, i) => ({ offset: 3 * MiB + i * 4096, length: 4096 }));
    await copier.copy(dirty, { destIsZero: false });
    outs.push(readFileSync(dst.path));
  }
  assert.ok(outs[0]!.equals(readFileSync(src.path)), 'native copy (full pass, then the dirty ranges) equals the source');
  assert.ok(outs[1]!.equals(outs[0]!), 'both paths give the same destination');
  // A destination failure surfaces as a CopyError on the destination side.
  const dst = await fresh(size);
  const copier = new Copier(src, dst, {});
  await dst.close();
  try {
    await copier.copy([{ offset: 0, length: size }]);
    assert.unreachable('copy to a closed destination succeeded');
  } catch (err) {
    assert.instance(err, CopyError);
    assert.is((err as CopyError).side, 'destination');
  }
});

test('a block device reports its size, with and without the addon', async () => {
  const backing = join(dir, 'loop.raw');
  await exec('truncate', ['-s', String(6 * MiB), backing]);
  let loop: string;
  try {
    loop = (await exec('losetup', ['-f', '--show', backing])).stdout.trim();
  } catch (err) {
    console.log(`  (skipped: no loop device here: ${String((err as { stderr?: string }).stderr ?? err).trim()})`);
    return;
  }
  onCleanup(() => exec('losetup', ['-d', loop]).then(() => {}, () => {}));
  for (const native of [true, false]) {
    const dev = await FileDevice.open(loop, { native });
    try {
      assert.ok(dev.isBlockDevice);
      assert.is(dev.size, 6 * MiB, `size with native=${native}`);
      const data = randomBytes(64 * 1024);
      await dev.write(MiB, data, { fua: true });
      assert.ok((await dev.read(MiB, data.length)).equals(data));
      assert.equal(await dev.blockStatus(0, MiB), [{ offset: 0, length: MiB, hole: false, zero: false }]);
      await dev.writeZeroes(MiB, 64 * 1024);
      assert.ok((await dev.read(MiB, 64 * 1024)).equals(Buffer.alloc(64 * 1024)));
    } finally {
      await dev.close();
    }
  }
});

test.run();
