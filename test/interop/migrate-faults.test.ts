// Faults during a migration: the destination fills up, the destination's NBD server dies,
// the operator aborts in each phase, the shim is SIGKILLed and restarted. In every case the
// job reports a clear error, files it created are gone, the guest's data is intact on the
// source (fio's verify pass, or a checksum), and the shim serves the source.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { join } from 'node:path';
import { mkdirSync, writeFileSync } from 'node:fs';
import { tempDir, cleanupAll, onCleanup, run, runStatus, startDaemon, waitForSocket } from '../helpers/proc.ts';
import { MiB, startShim, makeDisk, migrate, abortHeld, status, sha256, waitForJob, fioWrite, fioVerify, compareWithShim, existsSync } from './migrate-helpers.ts';

test.after(cleanupAll);

async function disk(size = 32 * MiB) {
  const dir = tempDir('vmsF-');
  const src = join(dir, 'src.raw');
  await makeDisk(src, size);
  return { dir, src };
}

test('destination full (8 MiB tmpfs): out-of-space error, partial file removed, source intact', async () => {
  const { dir, src } = await disk();
  const mnt = join(dir, 'small');
  mkdirSync(mnt);
  await run('mount', ['-t', 'tmpfs', '-o', 'size=8m', 'tmpfs', mnt]);
  onCleanup(() => runStatus('umount', [mnt]).then(() => {}));
  const shim = await startShim(src, join(dir, 's'));
  const before = sha256(src);
  const dst = join(mnt, 'dst.raw');
  const r = await migrate(shim.socket, dst);
  assert.is(r.code, 1);
  assert.is(r.error?.code, 'destination-full', JSON.stringify(r.error));
  assert.match(r.error!.message, /out of space.*the disk stays on/);
  assert.not.ok(existsSync(dst), 'partial destination removed');
  assert.is(sha256(src), before);
  assert.is((await status(shim.socket)).backing, src);
  await compareWithShim(src, shim.socket);
});

test('destination NBD server killed mid-copy: clear error, source intact, its file left alone', async () => {
  const { dir, src } = await disk();
  const target = join(dir, 'target.raw');
  await run('qemu-img', ['create', '-q', '-f', 'raw', target, '32M']);
  const nbdSock = join(dir, 'q');
  const qnbd = startDaemon('qemu-nbd', ['-t', '-e', '8', '-f', 'raw', '-x', 'disk', '-k', nbdSock, target]);
  await waitForSocket(nbdSock, qnbd);
  const shim = await startShim(src, join(dir, 's'));
  const job = { uri: shim.uri, seed: 7, ioSize: '6M', rate: '2m' };
  const writer = fioWrite(job);
  const pending = migrate(shim.socket, `nbd+unix:///disk?socket=${nbdSock}`, ['--bandwidth', '4M']);
  await waitForJob(shim.socket, (j) => j.phase === 'precopy' && j.passDone >= 4 * MiB);
  await qnbd.stop('SIGKILL');
  const r = await pending;
  assert.is(r.code, 1);
  assert.is(r.error?.code, 'destination-failed', JSON.stringify(r.error));
  assert.match(r.error!.message, /destination nbd\+unix:.* failed during pre-copy pass 1/);
  assert.ok(existsSync(target), 'a destination the job did not create is never removed');
  assert.is((await writer).code, 0);
  await fioVerify(job);
  assert.is((await status(shim.socket)).backing, src);
});

const phases = [
  { name: 'during pass 1', flags: ['--mode', 'precopy'], at: (j: any) => j.phase === 'precopy' && j.pass === 1 && j.passDone > 2 * MiB, phase: /pre-copy pass 1/ },
  // The writer starts once pass 1 runs, so that it dirties blocks behind the cursor however
  // late the job started (a writer done before the job leaves pass 1 nothing to redo).
  { name: 'during a later pass', flags: ['--mode', 'precopy', '--max-passes', '50'], writeOnce: (j: any) => j.phase === 'precopy' && j.pass === 1, at: (j: any) => j.phase === 'precopy' && j.pass >= 2, phase: /pre-copy pass \d/ },
  { name: 'during mirroring', flags: ['--mode', 'mirror'], at: (j: any) => j.phase === 'mirror' && j.passDone > 2 * MiB, phase: /the mirror pass/ },
];

for (const p of phases) {
  test(`abort ${p.name}: the guest stays on the source with every write, the new file is removed`, async () => {
    const { dir, src } = await disk();
    const shim = await startShim(src, join(dir, 's'));
    const job = { uri: shim.uri, seed: 11, ioSize: '24M', rate: '4m' };
    const dst = join(dir, 'dst.raw');
    let writer = p.writeOnce ? null : fioWrite(job);
    const pending = migrate(shim.socket, dst, [...p.flags, '--bandwidth', '4M']);
    if (p.writeOnce) {
      await waitForJob(shim.socket, p.writeOnce);
      writer = fioWrite(job);
    }
    await waitForJob(shim.socket, p.at);
    // Held where it was seen (abortHeld): passes at any copy speed, however slow the CLI starts.
    const ab = await abortHeld(shim);
    assert.is(ab.code, 0, ab.stderr);
    const r = await pending;
    assert.is(r.code, 1);
    assert.is(r.error?.code, 'aborted');
    assert.match(r.error!.message, p.phase);
    assert.not.ok(existsSync(dst), 'destination removed');
    assert.is((await writer!).code, 0);
    await fioVerify(job);
    assert.is((await status(shim.socket)).backing, src);
    await compareWithShim(src, shim.socket);
  });
}

test('shim SIGKILLed mid-job and restarted: serves the source, the partial destination is removed', async () => {
  const { dir, src } = await disk();
  const sock = join(dir, 's');
  const shim = await startShim(src, sock);
  const job = { uri: shim.uri, seed: 21, ioSize: '4M', rate: '4m' };
  assert.is((await fioWrite(job)).code, 0);
  const dst = join(dir, 'dst.raw');
  const pending = migrate(sock, dst, ['--bandwidth', '4M']);
  await waitForJob(sock, (j) => j.phase === 'precopy' && j.passDone > 2 * MiB);
  await shim.daemon.stop('SIGKILL');
  const r = await pending;
  assert.is(r.code, 1, 'the CLI reports the lost shim');
  assert.ok(existsSync(dst), 'the partial file is still there until the shim restarts');
  const again = await startShim(src, sock);
  assert.not.ok(existsSync(dst), 'the restarted shim removed the file of the interrupted job');
  assert.match(again.daemon.output(), /removed .*dst\.raw, created by a migration that did not complete/);
  assert.is((await status(sock)).backing, src);
  await fioVerify({ ...job, uri: again.uri });
});

test('shim restarted after a committed migration serves the destination', async () => {
  const { dir, src } = await disk(8 * MiB);
  const sock = join(dir, 's');
  const shim = await startShim(src, sock);
  const dst = join(dir, 'dst.raw');
  const r = await migrate(sock, dst);
  assert.is(r.code, 0, JSON.stringify(r.error));
  await shim.daemon.stop('SIGKILL');
  // Whatever the source holds now, the restarted shim must not serve it.
  writeFileSync(src, Buffer.alloc(8 * MiB, 0xee));
  const again = await startShim(src, sock);
  assert.is((await status(sock)).backing, dst);
  await compareWithShim(dst, again.socket);
  assert.ok(existsSync(dst));
});

test.run();
