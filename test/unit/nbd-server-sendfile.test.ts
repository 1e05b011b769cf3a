// READ replies sent by sendfile from a file's page cache (src/nbd/server-sendfile.ts): the
// bytes are the file's, no reply is ever split by another (writes, block status and hole
// replies pipelined with them), a socket that fills up gets the rest of a reply in order, a
// paused Gate holds them (a swap serves the new file), and a layer that changes reads is
// never bypassed. Real files, real unix sockets, hand-written protocol bytes.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { join } from 'node:path';
import { closeSync, openSync, readFileSync, truncateSync, writeFileSync, writeSync } from 'node:fs';
import { NbdServer } from '../../src/nbd/server.ts';
import { FileDevice, loadNative, type NativeFileOps } from '../../src/block/file.ts';
import { SendfileReplies } from '../../src/nbd/server-sendfile.ts';
import { BufferPool } from '../../src/nbd/buffer-pool.ts';
import { connect, createServer, type Socket } from 'node:net';
import { Gate } from '../../src/block/gate.ts';
import { Layer } from '../../src/block/layer.ts';
import type { BlockDevice } from '../../src/block/device.ts';
import { Cmd, ReplyType } from '../../src/nbd/constants.ts';
import { cleanupAll, onCleanup, tempDir } from '../helpers/proc.ts';
import { RawConn, pattern } from '../fixtures/nbd-raw.ts';

const MiB = 1024 * 1024;
const SIZE = 16 * MiB;
const KiB256 = 256 * 1024;

// On by default; VMSHIFT_SENDFILE=0 turns it off (read per connection).
delete process.env.VMSHIFT_SENDFILE;
test.after(cleanupAll);

/** The server's stats once `done` holds of them (a reply can reach the client before the server sees its send complete), or the last seen. */
async function statsWhen(server: NbdServer, done: (s: ReturnType<NbdServer['stats']>) => boolean): Promise<ReturnType<NbdServer['stats']>> {
  let s = server.stats();
  for (let i = 0; i < 40 && !done(s); i++) {
    await new Promise((r) => setTimeout(r, 50));
    s = server.stats();
  }
  return s;
}

/** A file of SIZE bytes: pattern data, except a hole at [8 MiB, 9 MiB). Read once, so it is cached. */
async function file(seed: number): Promise<{ path: string; data: Buffer }> {
  const path = join(tempDir('nbdsf-'), 'disk.raw');
  const data = pattern(SIZE, seed);
  data.fill(0, 8 * MiB, 9 * MiB);
  writeFileSync(path, data.subarray(0, 8 * MiB));
  truncateSync(path, SIZE);
  const fd = openSync(path, 'r+');
  writeSync(fd, data, 9 * MiB, SIZE - 9 * MiB, 9 * MiB);
  closeSync(fd);
  assert.ok(readFileSync(path).equals(data));
  return { path, data };
}

async function serve(device: BlockDevice): Promise<{ server: NbdServer; sock: string }> {
  const sock = join(tempDir('nbdsf-'), 's');
  const server = new NbdServer({ exports: [{ name: 'disk', device }] });
  await server.listenUnix(sock);
  onCleanup(() => server.close());
  return { server, sock };
}

async function open(sock: string, structured: boolean): Promise<RawConn> {
  const c = await RawConn.open(sock);
  onCleanup(() => c.destroy());
  await c.negotiate('disk', { structured });
  return c;
}

/** One whole reply: its cookie, error, and for a READ its data (holes as zeroes). */
async function replyOf(c: RawConn, readLengths: Map<bigint, number>): Promise<{ cookie: bigint; error: number; data?: Buffer }> {
  const r = await c.reply();
  if (r.kind === 'simple') {
    const n = readLengths.get(r.cookie);
    return { cookie: r.cookie, error: r.error, data: n && !r.error ? Buffer.from(await c.read(n)) : undefined };
  }
  if (r.type === ReplyType.OFFSET_DATA) return { cookie: r.cookie, error: 0, data: Buffer.from(r.payload.subarray(8)) };
  if (r.type === ReplyType.OFFSET_HOLE) return { cookie: r.cookie, error: 0, data: Buffer.alloc(r.payload.readUInt32BE(8)) };
  return { cookie: r.cookie, error: r.type === ReplyType.ERROR ? r.payload.readUInt32BE(0) : 0 };
}

for (const structured of [true, false]) {
  test(`${structured ? 'structured' : 'simple'} replies: pipelined READs by sendfile carry the file's bytes, never split by the writes and hole replies between them`, async () => {
    const { path, data } = await file(1);
    const dev = await FileDevice.open(path);
    onCleanup(() => dev.close());
    const { server, sock } = await serve(new Gate(dev));
    const c = await open(sock, structured);
    const lengths = new Map<bigint, number>();
    const want = new Map<bigint, Buffer>();
    let cookie = 0n;
    // 3 rounds over the first 8 MiB, a write after every 4 reads (to the second half, which
    // they do not read), and a read of the hole: all in flight at once.
    for (let round = 0; round < 3; round++) {
      for (let i = 0; i < 32; i++) {
        const off = ((i * 7 + round) % 32) * KiB256;
        lengths.set(++cookie, KiB256);
        want.set(cookie, data.subarray(off, off + KiB256));
        c.request(Cmd.READ, cookie, off, KiB256);
        if (i % 4 === 3) {
          const w = pattern(4096, Number(cookie));
          c.request(Cmd.WRITE, ++cookie, 12 * MiB + Number(cookie) * 4096, 4096, { data: w });
          want.set(cookie, Buffer.alloc(0));
        }
      }
      lengths.set(++cookie, MiB);
      want.set(cookie, Buffer.alloc(MiB));
      c.request(Cmd.READ, cookie, 8 * MiB, MiB);
    }
    for (let n = 0; n < want.size; n++) {
      const r = await replyOf(c, lengths);
      assert.is(r.error, 0, `reply to ${r.cookie}`);
      const w = want.get(r.cookie);
      assert.ok(w, `a reply to a request we made (${r.cookie})`);
      if (w!.length) assert.ok(r.data?.equals(w!), `READ ${r.cookie}: the file's bytes`);
      want.set(r.cookie, Buffer.alloc(0));
    }
    const s = await statsWhen(server, (x) => x.sendfileBytes >= 96 * KiB256);
    assert.is(s.sendfileBytes, 96 * KiB256, 'every data READ went by sendfile, the hole did not');
  });
}

test('a client that reads nothing for a while fills the socket: the rest of the cut reply comes next, in order', async () => {
  const { path, data } = await file(2);
  const dev = await FileDevice.open(path);
  onCleanup(() => dev.close());
  const { server, sock } = await serve(dev);
  const c = await open(sock, true);
  c.sock.pause();
  const lengths = new Map<bigint, number>();
  // 32 MiB of 1 MiB READs: more than the socket holds (SEND_BUFFER: 8 MiB with the kernel's doubling).
  for (let i = 0; i < 32; i++) {
    lengths.set(BigInt(i), MiB);
    c.request(Cmd.READ, BigInt(i), (i % 8) * MiB, MiB);
  }
  await new Promise((r) => setTimeout(r, 500));
  c.sock.resume();
  for (let n = 0; n < 32; n++) {
    const r = await replyOf(c, lengths);
    const off = Number(r.cookie % 8n) * MiB;
    assert.ok(r.data?.equals(data.subarray(off, off + MiB)), `READ ${r.cookie}: the file's bytes`);
  }
  const s = await statsWhen(server, (x) => x.sendfileBytes >= 32 * MiB);
  assert.ok(s.sendfileRest > 0, `a reply was cut by the full socket and finished through the stream (${s.sendfileRest})`);
  assert.is(s.sendfileBytes, 32 * MiB);
});

test('with VMSHIFT_SENDFILE=0: the same READs the usual way (what sendfileBytes counts is sendfile)', async () => {
  const { path, data } = await file(3);
  const dev = await FileDevice.open(path);
  onCleanup(() => dev.close());
  const { server, sock } = await serve(dev);
  process.env.VMSHIFT_SENDFILE = '0';
  let c: RawConn;
  try {
    c = await open(sock, true);
  } finally {
    delete process.env.VMSHIFT_SENDFILE;
  }
  c.request(Cmd.READ, 1n, MiB, KiB256);
  const r = await replyOf(c, new Map([[1n, KiB256]]));
  assert.ok(r.data?.equals(data.subarray(MiB, MiB + KiB256)));
  assert.is(server.stats().sendfileBytes, 0);
});

test('a paused Gate holds sendfile READs; after a swap they serve the new file', async () => {
  const a = await file(4);
  const b = await file(5);
  const devA = await FileDevice.open(a.path);
  const devB = await FileDevice.open(b.path);
  onCleanup(() => devB.close());
  const gate = new Gate(devA);
  const { server, sock } = await serve(gate);
  const c = await open(sock, true);
  await gate.pause();
  c.request(Cmd.READ, 1n, 0, KiB256);
  await new Promise((r) => setTimeout(r, 300));
  assert.is(gate.held, 1, 'the READ waits at the gate');
  assert.is(server.stats().bytesRead, 0, 'no reply while the gate is paused');
  await devA.close();
  gate.swap(devB);
  gate.resume();
  const r = await replyOf(c, new Map());
  assert.ok(r.data?.equals(b.data.subarray(0, KiB256)), "the new file's bytes");
  c.request(Cmd.READ, 2n, KiB256, KiB256);
  const r2 = await replyOf(c, new Map());
  assert.ok(r2.data?.equals(b.data.subarray(KiB256, 2 * KiB256)));
  assert.ok((await statsWhen(server, (x) => x.sendfileBytes > 0)).sendfileBytes > 0, 'sendfile again once resumed');
});

/** A layer that changes what reads return. */
class Inverted extends Layer {
  override async read(offset: number, length: number): Promise<Buffer> {
    const b = await super.read(offset, length);
    for (let i = 0; i < b.length; i++) b[i] = ~b[i]! & 0xff;
    return b;
  }
}

test('a layer that overrides read() is never bypassed by sendfile', async () => {
  const { path, data } = await file(6);
  const dev = await FileDevice.open(path);
  onCleanup(() => dev.close());
  const { server, sock } = await serve(new Gate(new Inverted(dev)));
  const c = await open(sock, true);
  c.request(Cmd.READ, 1n, 0, KiB256);
  const r = await replyOf(c, new Map());
  assert.ok(r.data?.equals(Buffer.from(data.subarray(0, KiB256).map((x) => ~x & 0xff))), 'the layer\'s bytes');
  assert.is(server.stats().sendfileBytes, 0);
});

test('a range with a hole is turned down on the event loop: no worker job, and a batch behind it goes at once', async () => {
  const { path, data } = await file(7);
  const native = loadNative()!;
  let jobs = 0;
  const counting: NativeFileOps = { ...native, sendFileBatch: (...a) => (jobs++, native.sendFileBatch!(...a)) };
  const sockPath = join(tempDir('nbdsf-'), 'p');
  const accepted = new Promise<Socket>((res) => {
    const srv = createServer(res).listen(sockPath);
    onCleanup(() => void srv.close());
  });
  const client = connect(sockPath);
  onCleanup(() => void client.destroy());
  const peer = await accepted;
  onCleanup(() => void peer.destroy());
  const fd = (peer as unknown as { _handle: { fd: number } })._handle.fd;
  const zc = new SendfileReplies(peer, fd, counting, new BufferPool(), () => {});
  onCleanup(() => zc.close());
  const fh = openSync(path, 'r');
  onCleanup(() => closeSync(fh));
  const got: Buffer[] = [];
  client.on('data', (b: Buffer) => got.push(b));
  const hdr = Buffer.from('HDR!');
  // [8 MiB, 9 MiB) is a hole: not sent, and asked without a job. The data range after it goes in one job.
  const [hole, ok] = await Promise.all([zc.send(fh, 8 * MiB - KiB256 / 2, KiB256, () => hdr), zc.send(fh, 0, KiB256, () => hdr)]);
  assert.is(hole, 'not-sent');
  assert.is(ok, 'sent');
  assert.is(jobs, 1, 'one worker job: the hole never reached one');
  for (let i = 0; i < 100 && Buffer.concat(got).length < 4 + KiB256; i++) await new Promise((r) => setTimeout(r, 20));
  assert.ok(Buffer.concat(got).equals(Buffer.concat([hdr, data.subarray(0, KiB256)])), 'the data reply, whole');
});

test.run();
