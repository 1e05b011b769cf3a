// MemoryDevice, the in-memory sparse device the server tests serve: data, holes, ranges.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { MemoryDevice } from '../../src/block/memory.ts';
import { BlockError } from '../../src/block/device.ts';

const K = 1024;
/** The errno a promise rejects with (uvu has no async `rejects`). */
async function errnoOf(p: Promise<unknown>): Promise<string> {
  try { await p; } catch (e) { return e instanceof BlockError ? e.errno : `not a BlockError: ${e}`; }
  return 'resolved';
}

test('unwritten space reads as zeroes and reports hole+zero; writes allocate whole chunks', async () => {
  const d = new MemoryDevice(1024 * K, { chunkSize: 64 * K });
  assert.equal(await d.blockStatus(0, 1024 * K), [{ offset: 0, length: 1024 * K, hole: true, zero: true }]);
  await d.write(100 * K, Buffer.alloc(8 * K, 0xaa)); // inside chunk 1
  assert.is(d.allocatedBytes, 64 * K);
  const r = await d.read(96 * K, 16 * K);
  assert.ok(r.subarray(0, 4 * K).equals(Buffer.alloc(4 * K)) && r.subarray(4 * K, 12 * K).equals(Buffer.alloc(8 * K, 0xaa)));
  assert.equal(await d.blockStatus(0, 256 * K), [
    { offset: 0, length: 64 * K, hole: true, zero: true },
    { offset: 64 * K, length: 64 * K, hole: false, zero: false },
    { offset: 128 * K, length: 128 * K, hole: true, zero: true },
  ]);
});

test('trim and write-zeroes free whole chunks, zero partial ones, NO_HOLE keeps allocation', async () => {
  const d = MemoryDevice.from(Buffer.alloc(256 * K, 0x11), { chunkSize: 64 * K });
  await d.trim(32 * K, 128 * K); // frees chunk 1, zeroes halves of 0 and 2
  assert.is(d.allocatedBytes, 3 * 64 * K); // 4 chunks, one freed
  const r = await d.read(0, 256 * K);
  assert.ok(r.subarray(32 * K, 160 * K).equals(Buffer.alloc(128 * K)));
  assert.ok(r.subarray(0, 32 * K).equals(Buffer.alloc(32 * K, 0x11)) && r.subarray(160 * K).equals(Buffer.alloc(96 * K, 0x11)));
  await d.writeZeroes(64 * K, 64 * K, { noHole: true });
  assert.is((await d.blockStatus(64 * K, 64 * K))[0]!.hole, false);
  assert.ok((await d.read(64 * K, 64 * K)).equals(Buffer.alloc(64 * K)));
});

test('ranges are checked, read-only refuses writes, closed refuses everything', async () => {
  const d = new MemoryDevice(4096);
  assert.is(await errnoOf(d.read(4000, 200)), 'EINVAL');
  assert.is(await errnoOf(d.write(-1, Buffer.alloc(1))), 'EINVAL');
  const ro = MemoryDevice.from(Buffer.from('data'), { readOnly: true });
  assert.is(ro.caps.readOnly, true);
  assert.is((await ro.read(0, 4)).toString(), 'data');
  assert.is(await errnoOf(ro.write(0, Buffer.from('x'))), 'EPERM');
  assert.is(await errnoOf(ro.trim(0, 1)), 'EPERM');
  await d.close();
  assert.is(await errnoOf(d.read(0, 1)), 'ESHUTDOWN');
});

test.run();
