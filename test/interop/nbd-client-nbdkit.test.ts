// NbdClientDevice against nbdkit: the memory and file plugins, several connections, and the
// older protocol paths nbdkit can be told to use (simple replies only, no fixed newstyle).
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { createHash, randomBytes } from 'node:crypto';
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { NbdClientDevice } from '../../src/block/nbd-device.ts';
import { NbdClient } from '../../src/nbd/client.ts';
import { cleanupAll, startDaemon, tempDir, waitForSocket } from '../helpers/proc.ts';

const MiB = 1024 * 1024;

test.after(cleanupAll);

const sha256 = (b: Buffer) => createHash('sha256').update(b).digest('hex');

/** nbdkit on a fresh unix socket; returns the URI of its (only) export. */
async function nbdkit(args: string[]): Promise<string> {
  const dir = tempDir('vmsnk-');
  const sock = join(dir, 's');
  const d = startDaemon('nbdkit', ['-U', sock, '--foreground', '--exit-with-parent', ...args]);
  await waitForSocket(sock, d);
  return `nbd+unix:///disk?socket=${sock}`;
}

/** Write random data at assorted places through `dev`, mirror it in a model, return the model. */
async function scribble(dev: NbdClientDevice, size: number): Promise<Buffer> {
  const model = Buffer.alloc(size);
  const writes = [];
  for (let i = 0; i < Math.min(40, Math.floor(size / MiB)); i++) {
    // Non-overlapping slots of 1 MiB, each written at an odd offset with an odd length.
    const off = i * MiB + ((i * 4099) % 65536);
    const data = randomBytes(1 + ((i * 37987) % (MiB - 65536)));
    data.copy(model, off);
    writes.push(dev.write(off, data));
  }
  await Promise.all(writes);
  return model;
}

test('nbdkit memory 64M: data written in parallel reads back equal over 4 connections', async () => {
  const uri = await nbdkit(['memory', '64M']);
  const dev = await NbdClientDevice.open(uri, { connections: 4 });
  try {
    assert.is(dev.size, 64 * MiB);
    assert.ok(dev.caps.canMultiConn, 'nbdkit memory allows several connections');
    assert.is(dev.connections, 4);
    const model = await scribble(dev, dev.size);
    await dev.flush();
    assert.ok((await dev.read(0, dev.size)).equals(model));
    // A second, independent device sees the same bytes.
    const other = await NbdClientDevice.open(uri);
    try {
      assert.is(sha256(await other.read(0, other.size)), sha256(model));
    } finally {
      await other.close();
    }
  } finally {
    await dev.close();
  }
});

test('nbdkit file plugin: the file holds exactly what was written', async () => {
  const dir = tempDir('vmsnk-');
  const file = join(dir, 'disk.raw');
  writeFileSync(file, Buffer.alloc(48 * MiB));
  const uri = await nbdkit(['file', file]);
  const dev = await NbdClientDevice.open(uri, { connections: 2 });
  try {
    const model = await scribble(dev, dev.size);
    await dev.writeZeroes(45 * MiB, 2 * MiB, { fua: true });
    await dev.flush();
    assert.is(sha256(readFileSync(file)), sha256(model));
  } finally {
    await dev.close();
  }
});

test('without structured replies: simple replies work and block status falls back to "all data"', async () => {
  const uri = await nbdkit(['--no-sr', 'memory', '8M']);
  const c = await NbdClient.connect(uri);
  await c.disconnect();
  assert.not.ok(c.structuredReplies);
  const dev = await NbdClientDevice.open(uri);
  try {
    assert.not.ok(dev.caps.canBlockStatus);
    const model = await scribble(dev, dev.size);
    assert.ok((await dev.read(0, dev.size)).equals(model));
    assert.equal(await dev.blockStatus(4096, 8192), [{ offset: 4096, length: 8192, hole: false, zero: false }]);
  } finally {
    await dev.close();
  }
});

test('a server without fixed newstyle is entered with NBD_OPT_EXPORT_NAME', async () => {
  // --mask-handshake=0: no FIXED_NEWSTYLE and no NO_ZEROES, so GO is not available.
  const uri = await nbdkit(['--mask-handshake=0', 'memory', '8M']);
  const dev = await NbdClientDevice.open(uri);
  try {
    assert.is(dev.size, 8 * MiB);
    const data = randomBytes(100000);
    await dev.write(777, data);
    assert.ok((await dev.read(777, data.length)).equals(data));
  } finally {
    await dev.close();
  }
});

test('reads larger than the maximum block size are split by the device', async () => {
  // nbdkit advertises a 64 KiB maximum and fails anything larger with EINVAL.
  const uri = await nbdkit(['--filter=blocksize-policy', 'memory', '8M', 'blocksize-maximum=65536', 'blocksize-error-policy=error']);
  const info = await NbdClient.info(uri);
  assert.is(info.blockSizes.maximum, 65536);
  const c = await NbdClient.connect(uri);
  try {
    assert.is((await c.read(0, 65536)).length, 65536);
    const e = await c.read(0, 65537).then(() => null, (err: unknown) => err);
    assert.match(String(e), 'exceeds 65536', 'the client itself never sends more than the maximum');
  } finally {
    await c.disconnect();
  }
  const dev = await NbdClientDevice.open(uri);
  try {
    const data = randomBytes(3 * MiB + 5);
    await dev.write(1000, data);
    assert.ok((await dev.read(1000, data.length)).equals(data));
  } finally {
    await dev.close();
  }
});

test.run();
