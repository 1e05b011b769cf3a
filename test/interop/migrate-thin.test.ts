// A large thin disk through a real shim (issue 11 section 2), in auto (pre-copy) and in
// mirror mode: 1 TiB virtual holding 16 MiB
// of data, moved by `vmshift migrate-storage` while fio writes verifiable data through the
// shim. The copy jumps the holes, so the job takes seconds, not the minutes a chunk-by-chunk
// walk of 1 TiB took; afterwards qemu-img compare finds source and destination equal over
// the whole terabyte, the destination holds about the data (not the virtual size), fio's
// verify passes on the destination, and progress reported a data rate and an ETA from the
// data left (an ETA from the virtual size would be days at this copy rate).
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { closeSync, ftruncateSync, openSync, statSync, writeSync } from 'node:fs';
import { randomBytes } from 'node:crypto';
import { join } from 'node:path';
import { tempDir, cleanupAll, run, startDaemon } from '../helpers/proc.ts';
import { controlCall } from '../../src/control/client.ts';
import { MiB, VMSHIFT, startShim, fioWrite, fioVerify, status } from './migrate-helpers.ts';

test.after(cleanupAll);

const TiB = 1024 * 1024 * MiB;
const DATA_EXTENTS = 16, EXTENT = MiB;

for (const mode of ['auto', 'mirror'] as const) test(`${mode}: a 1 TiB thin disk with 16 MiB of data moves under fio writes: equal, thin, data-based rate and ETA`, async () => {
  const dir = tempDir('vmsThin-');
  const src = join(dir, 'src.raw'), dst = join(dir, 'dst.raw');
  const fd = openSync(src, 'w');
  ftruncateSync(fd, TiB);
  for (let i = 0; i < DATA_EXTENTS; i++) writeSync(fd, randomBytes(EXTENT), 0, EXTENT, i * (TiB / DATA_EXTENTS) + (i % 3) * MiB);
  closeSync(fd);
  const shim = await startShim(src, join(dir, 's'));

  // fio writes 2 MiB into the first 32 MiB (data and hole alike) at 1 MiB/s; the copy is
  // limited to 4 MiB/s, so it runs longer than the writer, which it starts after.
  const job = { uri: shim.uri, seed: 4242, ioSize: '2M', size: '32M', rate: '1m' };
  const writer = fioWrite(job);
  for (let i = 0; i < 600; i++) {
    const s = await controlCall<any>(`${shim.socket}.ctl`, 'status', {}, { timeoutMs: 5000 });
    if ((s.tracking?.writes ?? 0) >= 20) break;
    await new Promise((r) => setTimeout(r, 50));
  }
  const cli = startDaemon(VMSHIFT, ['migrate-storage', '--socket', shim.socket, '--to', dst, '--mode', mode, '--bandwidth', '4M', '--json']);
  // The CLI takes a while to start under load: the job must be running before the writer ends.
  for (let i = 0; i < 600 && cli.proc.exitCode === null; i++) {
    const s = await controlCall<any>(`${shim.socket}.ctl`, 'migrate.status', {}, { timeoutMs: 5000 });
    if (s.running) break;
    await new Promise((r) => setTimeout(r, 50));
  }
  const w = await writer;
  assert.is(w.code, 0, `fio write failed:\n${w.stdout}${w.stderr}`);
  const during = await controlCall<any>(`${shim.socket}.ctl`, 'migrate.status', {}, { timeoutMs: 5000 });
  assert.ok(during.running, `the writer must finish while the job runs (so the source holds every write): ${JSON.stringify(during)}`);
  const code = await cli.exited;
  const lines = cli.output().split('\n').filter((l) => l.startsWith('{')).map((l) => JSON.parse(l));
  const result = lines.find((l) => 'result' in l)?.result;
  assert.is(code, 0, `migrate-storage failed: ${cli.output().slice(-2000)}`);
  assert.ok(result?.ok, JSON.stringify(result));
  console.log(`  ${mode}: job ${result.durationMs} ms, pass ${result.pass}, data ${result.dataBytes}, zero ${result.zeroBytes}`);

  // Every byte of the terabyte: the source (every write went there, the job copied them) and the destination.
  await run('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', src, dst]);
  await fioVerify(job);
  assert.is((await status(shim.socket)).backing, dst);
  const allocated = statSync(dst).blocks * 512;
  const data = DATA_EXTENTS * EXTENT;
  assert.ok(allocated >= data && allocated <= data + 8 * MiB, `destination allocates ${allocated} bytes for ${data} bytes of data and 2 MiB of writes`);
  assert.ok(result.skippedBytes > TiB - 64 * MiB, `holes skipped: ${result.skippedBytes}`);

  const progress = lines.filter((l) => l.event === 'progress').map((l) => l.data);
  // The one full pass: pre-copy's first, or the mirror's.
  const pass1 = progress.filter((f) => f.phase === (mode === 'auto' ? 'precopy' : 'mirror') && f.pass === 1);
  const moving = pass1.filter((f) => f.rate > 0 && f.etaSeconds !== null);
  assert.ok(moving.length > 0, `pass 1 reported a rate and an ETA: ${JSON.stringify(pass1.slice(0, 5))}`);
  for (const f of moving) {
    // ~4 MiB/s of data: the ETA is what is left of 16 MiB (seconds), never 1 TiB's (days).
    assert.ok(f.rate < 64 * MiB, `rate ${f.rate} is data per second`);
    assert.ok(f.etaSeconds < 120, `ETA ${f.etaSeconds} s from the data left, not the virtual size`);
    // Pass 1 knows how much data the source holds: the extents and what fio had written by then.
    assert.ok(f.passDataBytes >= data && f.passDataBytes <= data + 6 * MiB, `passDataBytes ${f.passDataBytes}`);
  }
});

test.run();
