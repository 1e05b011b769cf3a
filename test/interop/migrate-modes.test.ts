// Each migration mode moves a disk while fio writes verifiable random data through the
// shim: afterwards the destination equals what the shim serves, fio's verify pass (now
// reading the destination) succeeds, and the shim reports the new backing.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { join } from 'node:path';
import { tempDir, cleanupAll } from '../helpers/proc.ts';
import { MiB, startShim, makeDisk, fioWrite, fioVerify, migrate, status, compareWithShim } from './migrate-helpers.ts';

test.after(cleanupAll);

interface Case {
  name: string;
  flags: string[];
  /** Checks on the job's result beyond correctness. */
  check?: (r: any) => void;
}

const cases: Case[] = [
  { name: 'auto', flags: ['--mode', 'auto'] },
  { name: 'precopy', flags: ['--mode', 'precopy'], check: (r) => assert.not.ok(r.switchedToMirror) },
  { name: 'mirror', flags: ['--mode', 'mirror'], check: (r) => assert.is(r.pass, 1, 'mirror copies in a single pass') },
  {
    name: 'precopy with a Bloom dirty set', flags: ['--mode', 'precopy', '--tracker', 'bloom'],
    check: (r) => assert.ok(r.savings.bloomBytes > 0 && r.savings.bloomBytes < r.savings.bitmapBytes, `bloom memory reported: ${JSON.stringify(r.savings)}`),
  },
  {
    name: 'precopy with incremental tracking', flags: ['--mode', 'precopy', '--tracker', 'incremental'],
    check: (r) => assert.ok(r.savings.incrementalSkippedWrites > 0, `writes ahead of pass 1 were not marked: ${JSON.stringify(r.savings)}`),
  },
  { name: 'precopy with heat deferral', flags: ['--mode', 'precopy', '--heat'] },
];

for (const c of cases) {
  test(`${c.name}: migrates under fio writes; destination identical, fio verify passes, new backing reported`, async () => {
    const dir = tempDir('vmsF-');
    const src = join(dir, 'src.raw'), dst = join(dir, 'dst.raw');
    await makeDisk(src, 32 * MiB);
    const shim = await startShim(src, join(dir, 's'), ['--granularity', '4K']);
    const job = { uri: shim.uri, seed: 1234, ioSize: '8M', rate: '2m' };
    const writer = fioWrite(job);
    await new Promise((r) => setTimeout(r, 700));
    // A limited copy rate keeps the migration running while fio writes.
    const r = await migrate(shim.socket, dst, [...c.flags, '--bandwidth', '12M']);
    assert.is(r.code, 0, `migrate-storage failed: ${JSON.stringify(r.error)} ${r.stderr}`);
    assert.ok(r.result.ok);
    assert.ok(r.events.some((e) => e.event === 'progress'), 'progress events streamed');
    assert.ok(r.result.stallMs >= 0);
    c.check?.(r.result);
    const w = await writer;
    assert.is(w.code, 0, `fio write failed:\n${w.stdout}${w.stderr}`);
    await compareWithShim(dst, shim.socket);
    await fioVerify(job);
    const s = await status(shim.socket);
    assert.is(s.backing, dst);
    assert.is(s.origin, src);
    assert.is(s.job, null);
  });
}

test('auto finishes when the guest writes faster than the copy (--bandwidth 2M)', async () => {
  const dir = tempDir('vmsF-');
  const src = join(dir, 'src.raw'), dst = join(dir, 'dst.raw');
  await makeDisk(src, 16 * MiB);
  const shim = await startShim(src, join(dir, 's'));
  // 64 KiB tracking granularity: 4k random writes at 4 MiB/s dirty blocks far faster than
  // 2 MiB/s can recopy them; pre-copy alone would never converge.
  const job = { uri: shim.uri, seed: 99, ioSize: '40M', size: '16M', rate: '4m' };
  const writer = fioWrite({ ...job, ioSize: '40M' });
  await new Promise((r) => setTimeout(r, 500));
  const r = await migrate(shim.socket, dst, ['--mode', 'auto', '--bandwidth', '2M']);
  assert.is(r.code, 0, `migrate-storage failed: ${JSON.stringify(r.error)} ${r.stderr}`);
  assert.ok(r.result.switchedToMirror, `auto switched to mirroring: ${JSON.stringify(r.result)}`);
  assert.ok(r.result.mirroredBytes > 0, 'guest writes behind the cursor were mirrored');
  await writer;
  await compareWithShim(dst, shim.socket);
  assert.is((await status(shim.socket)).backing, dst);
});

test.run();
