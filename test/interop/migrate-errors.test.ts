// Destination checks and the one-job rule: each refusal has a clear message, exits 1, and
// leaves the source (and any file the job did not create) exactly as it was.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { join } from 'node:path';
import { statSync, readdirSync, rmSync, writeFileSync } from 'node:fs';
import { tempDir, cleanupAll, run, startDaemon } from '../helpers/proc.ts';
import { holders } from '../../src/migrate/dest-in-use.ts';
import { MiB, startShim, makeDisk, migrate, abortHeld, vmshift, status, sha256, waitForJob, existsSync, type ShimProc } from './migrate-helpers.ts';

test.after(cleanupAll);

let dir: string, src: string, socket: string, before: string, shim: ShimProc;

test.before(async () => {
  dir = tempDir('vmsF-');
  src = join(dir, 'src.raw');
  await makeDisk(src, 32 * MiB);
  shim = await startShim(src, join(dir, 's'));
  socket = shim.socket;
  before = sha256(src);
});

async function refused(to: string, code: string, message: RegExp, extra: string[] = []) {
  const r = await migrate(socket, to, extra);
  assert.is(r.code, 1, `exit 1 for ${to}`);
  assert.is(r.error?.code, code, JSON.stringify(r.error));
  assert.match(r.error!.message, message);
  assert.is(sha256(src), before, 'source untouched');
  assert.is((await status(socket)).backing, src);
  assert.is((await status(socket)).job, null, 'the disk is free again');
}

test('destination too small: refused, the existing file is left as it was', async () => {
  const small = join(dir, 'small.raw');
  await run('qemu-img', ['create', '-q', '-f', 'raw', small, '16M']);
  await refused(small, 'too-small', /too small: 16777216 bytes, the disk is 33554432 bytes/);
  assert.is(statSync(small).size, 16 * MiB);
});

test('destination in a directory that does not exist: refused as unwritable', async () => {
  await refused(join(dir, 'nodir', 'x.raw'), 'unwritable', /destination directory .*nodir does not exist/);
});

test('unreachable NBD destination: refused, nothing created', async () => {
  await refused(`nbd+unix:///disk?socket=${join(dir, 'nobody')}`, 'unreachable', /destination nbd\+unix:.* is unreachable/);
});

test('the disk itself as destination: refused', async () => {
  await refused(src, 'same-disk', /is the disk's current backing/);
  await refused(`nbd+unix:///disk?socket=${socket}`, 'same-disk', /this shim's own export/);
});

test('an existing destination holding data: refused without --overwrite; one a process has open: refused even with it', async () => {
  const full = join(dir, 'full.raw');
  writeFileSync(full, Buffer.alloc(32 * MiB, 0x5a));
  const sum = sha256(full);
  await refused(full, 'exists', /full\.raw already exists and holds data: pass --overwrite/);
  assert.is(sha256(full), sum, 'the existing file is left as it was');
  // Another guest's disk: some process holds it open.
  const holder = startDaemon('sh', ['-c', `exec 3<>${full}; exec sleep 60`]);
  for (let i = 0; i < 50 && !(await holders(full)).length; i++) await new Promise((r) => setTimeout(r, 100));
  await refused(full, 'in-use', /full\.raw is open in sleep \(pid \d+\): another guest or server uses it/, ['--overwrite']);
  assert.is(sha256(full), sum);
  await holder.stop();
  // Free, and said so: the job runs (aborted here to keep the source the disk).
  const started = await migrate(socket, full, ['--overwrite', '--bandwidth', '1M', '--detach']);
  assert.is(started.code, 0, started.stderr);
  await waitForJob(socket, (j) => j.phase === 'precopy');
  assert.is((await abortHeld(shim)).code, 0);
  assert.ok(existsSync(full), 'a file the job did not create is never removed');
  rmSync(full);
});

test('a second job on the same disk: refused while the first runs; abort frees it', async () => {
  const first = join(dir, 'first.raw');
  const started = await migrate(socket, first, ['--bandwidth', '1M', '--detach']);
  assert.is(started.code, 0, started.stderr);
  const second = await migrate(socket, join(dir, 'second.raw'));
  assert.is(second.code, 1);
  assert.is(second.error?.code, 'busy');
  assert.match(second.error!.message, /a migrate-storage job is already running on this disk/);
  assert.not.ok(existsSync(join(dir, 'second.raw')), 'the refused job created nothing');
  await waitForJob(socket, (j) => j.phase === 'precopy');
  const ab = await abortHeld(shim);
  assert.is(ab.code, 0, ab.stderr);
  assert.is(ab.result.error.code, 'aborted');
  assert.not.ok(existsSync(first), 'the aborted job removed the file it created');
  assert.is(sha256(src), before);
  const none = await vmshift(['abort', '--socket', socket]);
  assert.is(none.code, 1);
  assert.match(none.error!.message, /no migration is running/);
  assert.equal(readdirSync(dir).filter((f) => f.endsWith('.raw')).sort(), ['small.raw', 'src.raw']);
});

test.run();
