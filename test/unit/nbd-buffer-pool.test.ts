// The NBD server's payload buffer pool: the pool's own rules, and that the server never hands
// a buffer out again while the socket (a READ reply waiting to be sent) or a device (a WRITE
// in progress, or one that failed) may still hold it.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { join } from 'node:path';
import { BufferPool } from '../../src/nbd/buffer-pool.ts';
import { NbdServer } from '../../src/nbd/server.ts';
import { MemoryDevice } from '../../src/block/memory.ts';
import { FileDevice } from '../../src/block/file.ts';
import { writeFileSync } from 'node:fs';
import { Layer } from '../../src/block/layer.ts';
import { BlockError, type BlockDevice, type WriteOpts } from '../../src/block/device.ts';
import { Cmd } from '../../src/nbd/constants.ts';
import { cleanupAll, onCleanup, tempDir } from '../helpers/proc.ts';
import { RawConn, pattern } from '../fixtures/nbd-raw.ts';

const KiB = 1024;
const MiB = 1024 * 1024;
const EIO = 5;
test.after(cleanupAll);

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

async function until(what: string, cond: () => boolean, timeoutMs = 10_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!cond()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await sleep(5);
  }
}

// ---- the pool on its own ----------------------------------------------------------------

test('pool: exact lengths from power-of-two classes; a given-back buffer is reused', () => {
  const pool = new BufferPool();
  const a = pool.take(3000 + 4 * KiB); // class 8 KiB
  assert.is(a.length, 3000 + 4 * KiB);
  assert.is(a.buffer.byteLength, 8 * KiB);
  pool.give(a);
  assert.equal(pool.stats(), { lent: 0, idleBytes: 8 * KiB, allocated: 1, reused: 0 });
  const b = pool.take(8 * KiB);
  assert.ok(b.buffer === a.buffer, 'same class: the idle buffer comes back');
  assert.is(b.length, 8 * KiB);
  assert.equal(pool.stats(), { lent: 1, idleBytes: 0, allocated: 1, reused: 1 });
  const c = pool.take(16 * KiB);
  assert.ok(c.buffer !== b.buffer, 'another class: a buffer of its own');
});

test('pool: a lent buffer is never lent again; a second give and foreign buffers are ignored', () => {
  const pool = new BufferPool();
  const lent = Array.from({ length: 8 }, () => pool.take(MiB));
  assert.is(new Set(lent.map((b) => b.buffer)).size, 8, 'eight takes, eight distinct buffers');
  const [first] = lent;
  pool.give(first!);
  pool.give(first!); // a bug in a caller: must not put it in the pool twice
  pool.give(Buffer.allocUnsafeSlow(MiB)); // not the pool's
  assert.is(pool.stats().idleBytes, MiB);
  const x = pool.take(MiB);
  const y = pool.take(MiB);
  assert.ok(x.buffer === first!.buffer);
  assert.ok(y.buffer !== first!.buffer, 'given twice, lent once');
  assert.not.ok(lent.slice(1).some((b) => b.buffer === y.buffer), 'still lent: never handed out');
});

test('pool: forgotten buffers are never reused; sizes outside the classes are not pooled; idle bytes are bounded', async () => {
  const pool = new BufferPool({ minSize: 4 * KiB, maxSize: MiB, maxIdleBytes: 2 * MiB, trimAfterMs: 50 });
  const f = pool.take(MiB);
  pool.forget(f);
  assert.is(pool.stats().lent, 0);
  pool.give(f); // too late: forgotten
  assert.ok(pool.take(MiB).buffer !== f.buffer);

  const small = pool.take(100);
  const big = pool.take(2 * MiB);
  assert.is(small.length, 100);
  assert.is(big.length, 2 * MiB);
  pool.give(small);
  pool.give(big);
  assert.ok(pool.take(100).buffer !== small.buffer);
  assert.ok(pool.take(2 * MiB).buffer !== big.buffer);

  const many = Array.from({ length: 5 }, () => pool.take(MiB));
  for (const b of many) pool.give(b);
  // While busy, every buffer is kept for reuse; after a quiet spell only maxIdleBytes stay.
  assert.is(pool.stats().idleBytes, 5 * MiB, 'all kept while busy');
  const allocated = pool.stats().allocated;
  const again = Array.from({ length: 5 }, () => pool.take(MiB));
  assert.is(pool.stats().allocated, allocated, 'the five reused');
  for (const b of again) pool.give(b);
  await new Promise((r) => setTimeout(r, 120));
  assert.is(pool.stats().idleBytes, 2 * MiB, 'two kept, the rest left to the GC');
});

test('devices read into an offered buffer of the right size and return it; others are ignored', async () => {
  const data = pattern(256 * KiB, 3);
  const path = join(tempDir('nbdpool-'), 'f.raw');
  writeFileSync(path, data);
  const file = await FileDevice.open(path);
  onCleanup(() => file.close());
  for (const dev of [file, MemoryDevice.from(data)] as BlockDevice[]) {
    const into = Buffer.alloc(64 * KiB, 0xee);
    const got = await dev.read(64 * KiB, 64 * KiB, into);
    assert.ok(got === into, `${dev.name}: the offered buffer`);
    assert.ok(got.equals(data.subarray(64 * KiB, 128 * KiB)));
    const other = await dev.read(0, 4 * KiB, into);
    assert.ok(other !== into, `${dev.name}: a buffer of another size is not used`);
    assert.ok(other.equals(data.subarray(0, 4 * KiB)));
  }
});

// ---- the server -------------------------------------------------------------------------

interface Fixture { server: NbdServer; pool: BufferPool; sock: string }

async function serve(device: BlockDevice, limits: { maxInFlight?: number; maxPendingOutput?: number } = {}): Promise<Fixture> {
  const sock = join(tempDir('nbdpool-'), 's');
  const pool = new BufferPool();
  // These tests are about buffer lifetimes: a byte budget above what they keep in flight.
  const server = new NbdServer({ exports: [{ name: 'disk', device }], bufferPool: pool, limits: { maxInFlightBytes: 64 * MiB, ...limits } });
  await server.listenUnix(sock);
  onCleanup(() => server.close());
  return { server, pool, sock };
}

async function open(f: Fixture): Promise<RawConn> {
  const c = await RawConn.open(f.sock);
  onCleanup(() => c.destroy());
  await c.negotiate('disk');
  return c;
}

/** Holds writes until released; remembers each payload as the device saw it when called. */
class HeldWrites extends Layer {
  held: Array<{ offset: number; data: Buffer; seen: Buffer; go: () => void }> = [];
  constructor(inner: BlockDevice) { super(inner); }
  override async write(offset: number, data: Buffer, opts?: WriteOpts): Promise<void> {
    const seen = Buffer.from(data);
    await new Promise<void>((go) => this.held.push({ offset, data, seen, go }));
    // At completion the buffer must still hold what was sent: nobody reused it meanwhile.
    if (!data.equals(seen)) throw new Error(`payload at ${offset} changed while the device held it`);
    return super.write(offset, data, opts);
  }
  intact(): boolean {
    return this.held.every((h) => h.data.equals(h.seen));
  }
  release(n: number): void {
    for (const h of this.held.splice(0, n)) h.go();
  }
}

test('server: READ buffers go back only after the socket wrote them (replies queued unsent stay intact)', async () => {
  const N = 40;
  const content = pattern(N * MiB, 11);
  const f = await serve(MemoryDevice.from(content), { maxInFlight: 8, maxPendingOutput: 4 * MiB });
  const c = await open(f);
  c.sock.pause(); // the client reads nothing yet: replies pile up in the server's socket queue
  for (let i = 0; i < N; i++) c.request(Cmd.READ, BigInt(i), i * MiB, MiB);
  await until('the server to stop on its output limit', () => f.pool.stats().lent >= 4);
  await sleep(100);
  assert.ok(f.pool.stats().lent < N, 'backpressure: not every read was taken');
  c.sock.resume();
  for (let i = 0; i < N; i++) {
    const r = await c.reply();
    assert.equal(r, { kind: 'simple', error: 0, cookie: BigInt(i) });
    assert.ok((await c.read(MiB)).equals(content.subarray(i * MiB, (i + 1) * MiB)), `read ${i}: the bytes of its own offset`);
  }
  await until('every buffer back', () => f.pool.stats().lent === 0);
  const st = f.pool.stats();
  assert.ok(st.reused > 0, `buffers were reused (${JSON.stringify(st)})`);
  assert.ok(st.allocated < N, `fewer buffers than reads (${JSON.stringify(st)})`);
});

test('server: WRITE payloads go back only after the device write completed', async () => {
  const mem = new MemoryDevice(64 * MiB);
  const dev = new HeldWrites(mem);
  const f = await serve(dev);
  onCleanup(() => dev.release(dev.held.length)); // before the server closes (cleanups run last first)
  const c = await open(f);
  const payload = (i: number) => pattern(MiB, 100 + i);
  for (let i = 0; i < 12; i++) c.request(Cmd.WRITE, BigInt(i), i * MiB, MiB, { data: payload(i) });
  await until('12 writes at the device', () => dev.held.length === 12);
  assert.ok(f.pool.stats().lent >= 11, `1 MiB payloads span socket chunks: pooled (${JSON.stringify(f.pool.stats())})`);
  dev.release(6);
  for (let i = 0; i < 6; i++) assert.is((await c.reply() as { error: number }).error, 0);
  // Six buffers are back; the next payloads reuse them while six others are still held.
  for (let i = 12; i < 18; i++) c.request(Cmd.WRITE, BigInt(i), i * MiB, MiB, { data: payload(i) });
  await until('6 more writes at the device', () => dev.held.length === 12);
  assert.ok(f.pool.stats().reused >= 1, `payload buffers reused (${JSON.stringify(f.pool.stats())})`);
  assert.ok(dev.intact(), 'no held payload was overwritten');
  dev.release(12);
  for (let i = 0; i < 12; i++) assert.is((await c.reply() as { error: number }).error, 0);
  for (let i = 0; i < 18; i++) assert.ok((await mem.read(i * MiB, MiB)).equals(payload(i)), `write ${i} landed intact`);
  await until('every buffer back', () => f.pool.stats().lent === 0);
});

test('server: after a device error the buffer is never reused (the device may still hold it)', async () => {
  const mem = new MemoryDevice(16 * MiB);
  let keptWrite: { data: Buffer; seen: Buffer } | null = null;
  let keptRead: Buffer | null = null;
  const intos: ArrayBufferLike[] = [];
  class Failing extends Layer {
    constructor() { super(mem); }
    override async write(offset: number, data: Buffer, opts?: WriteOpts): Promise<void> {
      if (offset === 0) {
        keptWrite = { data, seen: Buffer.from(data) };
        throw new BlockError('EIO', 'write failed, buffer kept');
      }
      return super.write(offset, data, opts);
    }
    override async read(offset: number, length: number, into?: Buffer): Promise<Buffer> {
      if (into) intos.push(into.buffer);
      if (offset === 0) {
        keptRead = into ?? null;
        throw new BlockError('EIO', 'read failed, buffer kept');
      }
      return super.read(offset, length, into);
    }
  }
  const f = await serve(new Failing());
  const c = await open(f);
  c.request(Cmd.WRITE, 1n, 0, MiB, { data: pattern(MiB, 1) });
  assert.equal(await c.reply(), { kind: 'simple', error: EIO, cookie: 1n });
  c.request(Cmd.READ, 2n, 0, MiB);
  assert.equal(await c.reply(), { kind: 'simple', error: EIO, cookie: 2n });
  assert.is(f.pool.stats().lent, 0, 'forgotten, not counted as lent');
  for (let i = 1; i <= 8; i++) {
    c.request(Cmd.WRITE, BigInt(10 + i), i * MiB, MiB, { data: pattern(MiB, 50 + i) });
    assert.is((await c.reply() as { error: number }).error, 0);
    c.request(Cmd.READ, BigInt(20 + i), i * MiB, MiB);
    assert.is((await c.reply() as { error: number }).error, 0);
    assert.ok((await c.read(MiB)).equals(pattern(MiB, 50 + i)));
  }
  assert.ok(keptWrite!.data.equals(keptWrite!.seen), 'the failed write\'s buffer was not reused for later payloads');
  assert.ok(keptRead !== null);
  const after = intos.slice(1);
  assert.is(after.length, 8);
  assert.not.ok(after.some((b) => b === keptRead!.buffer), 'the failed read\'s buffer was not offered to later reads');
  assert.ok(new Set(after).size < after.length, 'later reads did reuse buffers among themselves');
});

/** Holds reads until released. */
class HeldReads extends Layer {
  held: Array<() => void> = [];
  constructor(inner: BlockDevice) { super(inner); }
  override async read(offset: number, length: number, into?: Buffer): Promise<Buffer> {
    await new Promise<void>((go) => this.held.push(go));
    return super.read(offset, length, into);
  }
  release(n: number): void {
    for (const go of this.held.splice(0, n)) go();
  }
}

test('server: a client leaving with replies unsent or reads at the device leaves no buffer lent', async () => {
  const content = pattern(32 * MiB, 5);
  const dev = new HeldReads(MemoryDevice.from(content));
  const f = await serve(dev, { maxInFlight: 8, maxPendingOutput: 4 * MiB });
  onCleanup(() => dev.release(dev.held.length));
  const c = await open(f);
  c.sock.pause();
  for (let i = 0; i < 32; i++) c.request(Cmd.READ, BigInt(i), i * MiB, MiB);
  await until('8 reads at the device', () => dev.held.length === 8);
  dev.release(2); // their replies wait in the socket queue
  await until('2 more reads at the device', () => dev.held.length === 8);
  dev.release(2);
  await sleep(50);
  c.destroy();
  await sleep(200); // the server sees the close with reads still at the device
  dev.release(dev.held.length);
  await until('the connection gone', () => f.server.stats().clients === 0);
  await until('every buffer back', () => f.pool.stats().lent === 0);
  // And the server still serves.
  dev.held = [];
  const d = await open(f);
  d.request(Cmd.READ, 1n, 3 * MiB, MiB);
  await until('the read at the device', () => dev.held.length === 1);
  dev.release(1);
  assert.is((await d.reply() as { error: number }).error, 0);
  assert.ok((await d.read(MiB)).equals(content.subarray(3 * MiB, 4 * MiB)));
});

test.run();
