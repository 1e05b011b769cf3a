// Each migration mode moves a disk while fio writes verifiable random data through the
// shim: afterwards the destination equals what the shim serves, fio's verify pass (now
// reading the destination) succeeds, and the shim reports the new backing.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { join } from 'node:path';
import { tempDir, cleanupAll } from '../helpers/proc.ts';
import { controlCall } from '../../src/control/client.ts';
import { MiB, startShim, makeDisk, fioWrite, fioVerify, migrate, status, compareWithShim, whileHeld } from './migrate-helpers.ts';

test.after(cleanupAll);

/** Wait until fio is really writing through the shim (it takes a while to start under load). */
async function writesSeen(socket: string, n: number): Promise<void> {
  for (let i = 0; i < 600; i++) {
    const s = await controlCall<any>(`${socket}.ctl`, 'status', {}, { timeoutMs: 5000 });
    if ((s.tracking?.writes ?? 0) >= n) return;
    await new Promise((r) => setTimeout(r, 50));
  }
  throw new Error(`fio did not start writing through ${socket}`);
}

interface Case {
  name: string;
  flags: string[];
  /** Checks on the job's result beyond correctness. */
  check?: (r: any) => void;
  fioRate?: string;
  ioSize?: string;
}

const cases: Case[] = [
  {
    name: 'auto', flags: ['--mode', 'auto'],
    // auto's first pass is always incremental.
    check: (r) => assert.ok(r.savings.incrementalSkippedWrites > 0, `writes ahead of pass 1 were not marked: ${JSON.stringify(r.savings)}`),
  },
  { name: 'precopy', flags: ['--mode', 'precopy'], check: (r) => assert.not.ok(r.switchedToMirror) },
  { name: 'mirror', flags: ['--mode', 'mirror'], check: (r) => assert.is(r.pass, 1, 'mirror copies in a single pass') },
  {
    name: 'precopy with a Bloom dirty set', flags: ['--mode', 'precopy', '--tracker', 'bloom'],
    // A Bloom set pays off on huge disks; here it only has to be used and reported.
    check: (r) => assert.ok(r.savings.bloomBytes > 0 && r.savings.bitmapBytes > 0 && r.savings.bloomFalsePositiveRate !== null, `bloom reported: ${JSON.stringify(r.savings)}`),
  },
  {
    name: 'precopy with incremental tracking', flags: ['--mode', 'precopy', '--tracker', 'incremental'],
    check: (r) => assert.ok(r.savings.incrementalSkippedWrites > 0, `writes ahead of pass 1 were not marked: ${JSON.stringify(r.savings)}`),
  },
  {
    // A larger downtime budget leaves room to defer a few 1 MiB regions; fio writes faster
    // so that an intermediate pass happens.
    name: 'precopy with heat deferral', flags: ['--mode', 'precopy', '--heat', '--max-downtime', '200ms'], fioRate: '6m', ioSize: '32M',
    check: (r) => assert.ok(r.savings.heatDeferredBytes > 0, `hot regions were deferred: ${JSON.stringify(r.savings)}`),
  },
];

for (const c of cases) {
  test(`${c.name}: migrates under fio writes; destination identical, fio verify passes, new backing reported`, async () => {
    const dir = tempDir('vmsF-');
    const src = join(dir, 'src.raw'), dst = join(dir, 'dst.raw');
    await makeDisk(src, 32 * MiB);
    const shim = await startShim(src, join(dir, 's'), ['--granularity', '4K']);
    const job = { uri: shim.uri, seed: 1234, ioSize: c.ioSize ?? '16M', rate: c.fioRate ?? '2m' };
    const writer = fioWrite(job);
    await writesSeen(shim.socket, 200);
    // A limited copy rate keeps the migration running while fio writes; the shim is held
    // while the CLI starts, so that fio has not finished before the job begins.
    const r = await (await whileHeld(shim, ['migrate-storage', '--socket', shim.socket, '--to', dst, ...c.flags, '--bandwidth', '12M'])).result;
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
  await writesSeen(shim.socket, 200);
  const r = await migrate(shim.socket, dst, ['--mode', 'auto', '--bandwidth', '2M']);
  assert.is(r.code, 0, `migrate-storage failed: ${JSON.stringify(r.error)} ${r.stderr}`);
  assert.ok(r.result.switchedToMirror, `auto switched to mirroring: ${JSON.stringify(r.result)}`);
  await writer;
  await compareWithShim(dst, shim.socket);
  assert.is((await status(shim.socket)).backing, dst);
});

test.run();
