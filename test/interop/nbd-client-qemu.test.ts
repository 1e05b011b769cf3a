// NbdClient and NbdClientDevice against QEMU's NBD servers (qemu-nbd, qemu-storage-daemon):
// data lands byte for byte in the backing file, block status reflects zeroes and trims,
// pipelining, several connections, listing, and the error cases a caller must be able to tell
// apart (unknown export, past the end, server killed, connection refused).
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { createHash, randomBytes } from 'node:crypto';
import { readFileSync, writeFileSync, truncateSync } from 'node:fs';
import { createServer } from 'node:net';
import { join } from 'node:path';
import { BlockError } from '../../src/block/device.ts';
import { NbdClientDevice } from '../../src/block/nbd-device.ts';
import { NbdClient, NbdError } from '../../src/nbd/client.ts';
import { TF } from '../../src/nbd/constants.ts';
import { cleanupAll, startDaemon, tempDir, waitForSocket, type Daemon, rejection } from '../helpers/proc.ts';

const MiB = 1024 * 1024;
const SIZE = 32 * MiB;

test.after(cleanupAll);

const sha256 = (b: Buffer) => createHash('sha256').update(b).digest('hex');

/** A sparse raw file served by qemu-nbd; returns its URI, path and the daemon. */
async function qemuNbd(extra: string[] = [], size = SIZE): Promise<{ uri: string; file: string; sock: string; daemon: Daemon }> {
  const dir = tempDir('vmsnc-');
  const file = join(dir, 'disk.raw');
  writeFileSync(file, '');
  truncateSync(file, size);
  const sock = join(dir, 's');
  const daemon = startDaemon('qemu-nbd', ['-t', '-e', '8', '-f', 'raw', '-k', sock, '-x', 'disk', ...extra, file]);
  await waitForSocket(sock, daemon);
  return { uri: `nbd+unix:///disk?socket=${sock}`, file, sock, daemon };
}

/** Fail instead of hanging when a promise never settles (a guard, not a timing assertion). */
function within<T>(p: Promise<T>, what: string, ms = 20000): Promise<T> {
  let t: NodeJS.Timeout;
  return Promise.race([
    p.finally(() => clearTimeout(t)),
    new Promise<T>((_, reject) => { t = setTimeout(() => reject(new Error(`${what}: still pending after ${ms} ms`)), ms); }),
  ]);
}

test('writes at many offsets and sizes read back equal and land in the file byte for byte', async () => {
  const srv = await qemuNbd();
  const dev = await NbdClientDevice.open(srv.uri);
  try {
    assert.is(dev.size, SIZE);
    assert.is(dev.name, srv.uri);
    const model = Buffer.alloc(SIZE);
    // Unaligned, aligned, larger than one socket write, touching the last byte.
    const ranges: Array<[number, number]> = [[0, 4096], [12345, 1], [5 * MiB - 7, MiB + 3], [SIZE - 65536, 65536], [SIZE - 1, 1], [7 * MiB, 3 * MiB]];
    for (const [off, len] of ranges) {
      const data = randomBytes(len);
      await dev.write(off, data, { fua: off === 0 });
      data.copy(model, off);
    }
    for (const [off, len] of ranges) assert.ok((await dev.read(off, len)).equals(model.subarray(off, off + len)), `range ${off}+${len}`);
    assert.ok((await dev.read(0, SIZE)).equals(model), 'whole device');
    await dev.flush();
    assert.is(sha256(readFileSync(srv.file)), sha256(model));
  } finally {
    await dev.close();
  }
});

test('writeZeroes and trim on a sparse file show up as zero extents in block status', async () => {
  const srv = await qemuNbd(['--discard=unmap']);
  const dev = await NbdClientDevice.open(srv.uri);
  try {
    assert.ok(dev.caps.canBlockStatus && dev.caps.canZero && dev.caps.canTrim);
    const all = await dev.blockStatus(0, 4 * MiB);
    assert.equal(all, [{ offset: 0, length: 4 * MiB, hole: true, zero: true }], 'a fresh sparse file is one hole');

    await dev.write(0, randomBytes(2 * MiB));
    await dev.writeZeroes(0, 512 * 1024);
    await dev.trim(MiB, MiB);
    const ext = await dev.blockStatus(0, 4 * MiB);
    const at = (o: number) => ext.find((e) => e.offset <= o && o < e.offset + e.length)!;
    // Extents tile the request from its start without gaps.
    let pos = 0;
    for (const e of ext) { assert.is(e.offset, pos); pos += e.length; }
    assert.ok(pos <= 4 * MiB);
    assert.ok(at(0).zero, 'zeroed range reads as zero');
    assert.not.ok(at(768 * 1024).zero, 'untouched data stays data');
    assert.ok(at(MiB).zero && at(MiB).hole, 'trimmed range is a hole');
    assert.ok(at(3 * MiB).hole, 'never written stays a hole');
    assert.ok((await dev.read(0, 512 * 1024)).equals(Buffer.alloc(512 * 1024)));
    assert.ok((await dev.read(MiB, MiB)).equals(Buffer.alloc(MiB)));
    // Small reads of holes too: their buffers come from Node's pool, full of old bytes.
    for (let i = 0; i < 16; i++) assert.ok((await dev.read(MiB + i * 1000, 1000)).equals(Buffer.alloc(1000)), `small hole read ${i}`);

    // NO_HOLE zeroes read as zeroes too (whether the server allocates is its business).
    await dev.write(2 * MiB, randomBytes(MiB));
    await dev.writeZeroes(2 * MiB, MiB, { noHole: true, fua: true });
    assert.ok((await dev.read(2 * MiB, MiB)).equals(Buffer.alloc(MiB)));
  } finally {
    await dev.close();
  }
});

test('200 pipelined requests are all on the wire at once and complete correctly', async () => {
  const srv = await qemuNbd();
  const c = await NbdClient.connect(srv.uri, { maxInFlight: 256 });
  try {
    const blocks = Array.from({ length: 200 }, (_, i) => ({ off: i * 8192 + (i % 7) * 512, data: randomBytes(4096 + (i % 5) * 100) }));
    const writes = blocks.map((b) => c.write(b.off, b.data));
    assert.is(c.pending, 200, 'all writes were issued without waiting for replies');
    await within(Promise.all(writes), 'pipelined writes');
    const reads = blocks.map((b) => c.read(b.off, b.data.length));
    assert.is(c.pending, 200);
    const got = await within(Promise.all(reads), 'pipelined reads');
    got.forEach((g, i) => assert.ok(g.equals(blocks[i].data), `block ${i}`));
  } finally {
    await c.disconnect();
  }
});

test('a multi-connection device spreads requests over 4 connections of qemu-nbd', async () => {
  const srv = await qemuNbd();
  const dev = await NbdClientDevice.open(srv.uri, { connections: 4 });
  try {
    assert.ok(dev.caps.canMultiConn, 'qemu-nbd -e 8 advertises CAN_MULTI_CONN');
    assert.is(dev.connections, 4);
    const model = Buffer.alloc(8 * MiB);
    const writes = [];
    for (let i = 0; i < 128; i++) {
      const data = randomBytes(65536);
      data.copy(model, i * 65536);
      writes.push(dev.write(i * 65536, data));
    }
    await within(Promise.all(writes), 'multi-connection writes');
    await dev.flush();
    assert.ok((await dev.read(0, 8 * MiB)).equals(model));
    assert.is(sha256(readFileSync(srv.file).subarray(0, 8 * MiB)), sha256(model));
  } finally {
    await dev.close();
  }
});

test('a device over a server without CAN_MULTI_CONN uses one connection', async () => {
  // With -e 1 qemu-nbd does not promise consistency across connections.
  const dir = tempDir('vmsnc-');
  const file = join(dir, 'd.raw');
  writeFileSync(file, Buffer.alloc(MiB));
  const sock = join(dir, 's');
  const d = startDaemon('qemu-nbd', ['-t', '-e', '1', '-f', 'raw', '-k', sock, '-x', 'disk', file]);
  await waitForSocket(sock, d);
  const dev = await NbdClientDevice.open(`nbd+unix:///disk?socket=${sock}`, { connections: 4 });
  try {
    assert.not.ok(dev.caps.canMultiConn);
    assert.is(dev.connections, 1);
  } finally {
    await dev.close();
  }
});

test('list() names both exports of qemu-storage-daemon; info() gives size and flags', async () => {
  const dir = tempDir('vmsnc-');
  const a = join(dir, 'a.raw'), b = join(dir, 'b.raw');
  writeFileSync(a, ''); truncateSync(a, 4 * MiB);
  writeFileSync(b, ''); truncateSync(b, 2 * MiB);
  const sock = join(dir, 's');
  const d = startDaemon('qemu-storage-daemon', [
    '--blockdev', `driver=file,filename=${a},node-name=fa`,
    '--blockdev', `driver=file,filename=${b},node-name=fb`,
    '--nbd-server', `addr.type=unix,addr.path=${sock}`,
    '--export', 'type=nbd,id=ea,node-name=fa,name=alpha,writable=on,description=first disk',
    '--export', 'type=nbd,id=eb,node-name=fb,name=beta',
  ]);
  await waitForSocket(sock, d);
  const uri = (name: string) => `nbd+unix:///${name}?socket=${sock}`;
  const list = await NbdClient.list(uri(''));
  assert.equal(list.sort((x, y) => x.name.localeCompare(y.name)), [
    { name: 'alpha', description: 'first disk' },
    { name: 'beta', description: '' },
  ]);
  const ia = await NbdClient.info(uri('alpha'));
  assert.is(ia.size, 4 * MiB);
  assert.is(ia.flags & TF.READ_ONLY, 0);
  assert.ok(ia.baseAllocation);
  const ib = await NbdClient.info(uri('beta'));
  assert.is(ib.size, 2 * MiB);
  assert.is(ib.flags & TF.READ_ONLY, TF.READ_ONLY, 'beta is exported read-only');
  const dev = await NbdClientDevice.open(uri('beta'));
  try {
    assert.ok(dev.caps.readOnly);
    const e = await rejection(dev.write(0, Buffer.alloc(512)));
    assert.ok(e instanceof BlockError && e.errno === 'EPERM', String(e));
  } finally {
    await dev.close();
  }
});

test('an unknown export is refused with a message naming peer, state and reply', async () => {
  const srv = await qemuNbd();
  const uri = `nbd+unix:///nope?socket=${srv.sock}`;
  const e = await rejection(NbdClient.connect(uri));
  assert.instance(e, NbdError);
  assert.is((e as Error).message, `${uri}: GO: export "nope" not found (NBD_REP_ERR_UNKNOWN); server said: "export 'nope' not present"`);
  const e2 = await rejection(NbdClient.info(uri));
  assert.match((e2 as Error).message, `${uri}: INFO: export "nope" not found (NBD_REP_ERR_UNKNOWN)`);
});

test('a read past the end is refused locally with EINVAL and the connection stays usable', async () => {
  const srv = await qemuNbd([], MiB);
  const c = await NbdClient.connect(srv.uri);
  const dev = await NbdClientDevice.open(srv.uri);
  try {
    for (const p of [c.read(MiB - 512, 4096), dev.read(MiB - 512, 4096), c.write(MiB, Buffer.alloc(1)), dev.blockStatus(MiB, 1)]) {
      const e = await rejection(p);
      assert.ok(e instanceof BlockError && e.errno === 'EINVAL', String(e));
      assert.match((e as Error).message, 'past the end');
    }
    assert.is(c.pending, 0, 'nothing was sent');
    await c.write(MiB - 512, Buffer.alloc(512, 9));
    assert.ok((await dev.read(MiB - 512, 512)).equals(Buffer.alloc(512, 9)));
  } finally {
    await c.disconnect();
    await dev.close();
  }
});

test('when the server dies mid-request every pending request rejects with EIO naming the peer', async () => {
  const srv = await qemuNbd();
  const c = await NbdClient.connect(srv.uri);
  // Freeze the server so the requests are surely still pending when it dies.
  process.kill(srv.daemon.pid, 'SIGSTOP');
  const pending = Array.from({ length: 20 }, (_, i) => rejection(c.read(i * 65536, 65536)));
  pending.push(rejection(c.write(0, randomBytes(MiB))));
  assert.is(c.pending, 21);
  process.kill(srv.daemon.pid, 'SIGKILL');
  const errors = await within(Promise.all(pending), 'requests after the server was killed');
  for (const e of errors) {
    assert.ok(e instanceof BlockError && e.errno === 'EIO', String(e));
    assert.match((e as Error).message, `${srv.uri}: connection lost`);
  }
  const later = await rejection(c.read(0, 512));
  assert.ok(later instanceof BlockError && later.errno === 'EIO', 'requests after the loss fail at once');
  await c.disconnect();
});

test('connection refused and a missing socket give clear errors', async () => {
  const port = await new Promise<number>((resolve) => {
    const s = createServer();
    s.listen(0, '127.0.0.1', () => {
      const p = (s.address() as { port: number }).port;
      s.close(() => resolve(p));
    });
  });
  const e = await rejection(NbdClient.connect(`nbd://127.0.0.1:${port}/disk`));
  assert.is((e as Error).message, `nbd://127.0.0.1:${port}/disk: CONNECT: connection refused (ECONNREFUSED)`);
  const dir = tempDir('vmsnc-');
  const e2 = await rejection(NbdClientDevice.open(`nbd+unix:///disk?socket=${dir}/none`));
  assert.is((e2 as Error).message, `nbd+unix:///disk?socket=${dir}/none: CONNECT: no such socket (ENOENT)`);
});

test.run();
