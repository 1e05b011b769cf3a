// `vmshift serve` and `vmshift status` as an operator runs them: a real shim process, QEMU's
// own NBD client writing through it, status reporting what was written, clean SIGTERM.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { join } from 'node:path';
import { readFileSync, writeFileSync, existsSync } from 'node:fs';
import { tempDir, startDaemon, waitForSocket, run, runStatus, cleanupAll } from '../helpers/proc.ts';

const vmshift = new URL('../../bin/vmshift', import.meta.url).pathname;
const MiB = 1024 * 1024;
test.after(cleanupAll);

function nbdOpts(sock: string) {
  return `driver=nbd,server.type=unix,server.path=${sock},export=disk`;
}

test('serve: QEMU writes through the shim, status shows exact dirty bytes, SIGTERM flushes and exits 0', async () => {
  const dir = tempDir();
  const file = join(dir, 'disk.raw');
  writeFileSync(file, Buffer.alloc(16 * MiB));
  const sock = join(dir, 'd.sock');
  const shim = startDaemon(vmshift, ['serve', file, '--socket', sock, '--granularity', '64K']);
  await waitForSocket(sock, shim);
  await waitForSocket(`${sock}.ctl`, shim);

  await run('qemu-io', ['--image-opts', nbdOpts(sock), '-c', `write -P 0xab ${1 * MiB} 128k`, '-c', `write -P 0xcd ${8 * MiB + 100} 10`]);
  const st = JSON.parse((await run(vmshift, ['status', '--socket', sock, '--json'])).stdout);
  assert.is(st.backing, file);
  assert.is(st.size, 16 * MiB);
  // 128 KiB aligned at 1 MiB = two 64 KiB blocks; 10 bytes at 8 MiB+100 = one block.
  assert.is(st.tracking.dirtyBytes, 3 * 64 * 1024);
  assert.ok(st.nbd.bytesWritten >= 128 * 1024 + 10);

  const human = (await run(vmshift, ['status', '--socket', sock])).stdout;
  assert.match(human, /dirty:\s+192 KiB/);

  await shim.stop('SIGTERM');
  assert.is(shim.proc.exitCode, 0, shim.output());
  const data = readFileSync(file);
  assert.ok(data.subarray(MiB, MiB + 128 * 1024).every((b) => b === 0xab));
  assert.ok(data.subarray(8 * MiB + 100, 8 * MiB + 110).every((b) => b === 0xcd));
  assert.is(data[8 * MiB + 99], 0);
  assert.not.ok(existsSync(sock), 'socket removed on exit');
});

test('serve: sockets are created mode 0600 by default', async () => {
  const dir = tempDir();
  const file = join(dir, 'disk.raw');
  writeFileSync(file, Buffer.alloc(MiB));
  const sock = join(dir, 'm.sock');
  const shim = startDaemon(vmshift, ['serve', file, '--socket', sock]);
  await waitForSocket(`${sock}.ctl`, shim);
  const { statSync } = await import('node:fs');
  assert.is(statSync(sock).mode & 0o777, 0o600);
  assert.is(statSync(`${sock}.ctl`).mode & 0o777, 0o600);
  await shim.stop();
});

test('CLI: bad usage exits 2 with a clear message; --json errors are JSON', async () => {
  const dir = tempDir();
  const noSocket = await runStatus(vmshift, ['serve', join(dir, 'x.raw')]);
  assert.is(noSocket.code, 2);
  assert.match(noSocket.stderr, /socket/);

  writeFileSync(join(dir, 'x.raw'), Buffer.alloc(MiB));
  const badGran = await runStatus(vmshift, ['serve', join(dir, 'x.raw'), '--socket', join(dir, 's'), '--granularity', '1000']);
  assert.is(badGran.code, 2);
  assert.match(badGran.stderr, /granularity must be a power of two/);

  const tcpNoTls = await runStatus(vmshift, ['serve', join(dir, 'x.raw'), '--socket', join(dir, 's'), '--tcp', '127.0.0.1:10809']);
  assert.is(tcpNoTls.code, 2);
  assert.match(tcpNoTls.stderr, /needs --tls-cert/);

  const missing = await runStatus(vmshift, ['serve', join(dir, 'nope.raw'), '--socket', join(dir, 's2')]);
  assert.is(missing.code, 1);
  assert.match(missing.stderr, /nope\.raw/);

  const down = await runStatus(vmshift, ['status', '--socket', join(dir, 'none.sock'), '--json']);
  assert.is(down.code, 1);
  const err = JSON.parse(down.stdout).error;
  assert.is(err.code, 'unreachable');
  assert.match(err.message, /nothing is listening/);
});

test('serve: a state file of another disk is refused, nothing served', async () => {
  const dir = tempDir();
  const a = join(dir, 'a.raw');
  const b = join(dir, 'b.raw');
  writeFileSync(a, Buffer.alloc(MiB));
  writeFileSync(b, Buffer.alloc(MiB));
  const sock = join(dir, 's.sock');
  const first = startDaemon(vmshift, ['serve', a, '--socket', sock]);
  await waitForSocket(`${sock}.ctl`, first);
  await first.stop();
  const second = await runStatus(vmshift, ['serve', b, '--socket', sock]);
  assert.is(second.code, 1);
  assert.match(second.stderr, /belongs to a shim of .*a\.raw/);
});

test('serve: an upstream NBD export (qemu-nbd) in place of a file, by nbd+unix URI', async () => {
  const dir = tempDir();
  const file = join(dir, 'up.raw');
  writeFileSync(file, Buffer.alloc(4 * MiB));
  const upSock = join(dir, 'up.sock');
  const up = startDaemon('qemu-nbd', ['-t', '-e', '8', '-f', 'raw', '-k', upSock, '-x', 'up', file]);
  await waitForSocket(upSock, up);
  const sock = join(dir, 'shim.sock');
  const uri = `nbd+unix:///up?socket=${upSock}`;
  const shim = startDaemon(vmshift, ['serve', uri, '--socket', sock]);
  await waitForSocket(`${sock}.ctl`, shim);
  await run('qemu-io', ['--image-opts', nbdOpts(sock), '-c', `write -P 0x5e ${MiB} 64k`]);
  const st = JSON.parse((await run(vmshift, ['status', '--socket', sock, '--json'])).stdout);
  assert.is(st.backing, uri);
  assert.is(st.size, 4 * MiB);
  assert.is(st.tracking.dirtyBytes, 64 * 1024);
  await shim.stop();
  assert.is(shim.proc.exitCode, 0, shim.output());
  // The bytes went through our client into qemu-nbd's file.
  const data = readFileSync(file);
  assert.ok(data.subarray(MiB, MiB + 64 * 1024).every((b) => b === 0x5e));
  assert.is(data[MiB + 64 * 1024], 0);
});

test.run();
