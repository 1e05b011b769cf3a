// Fuzzing the server with mutated client sessions: a recorded valid session (handshake and
// requests) is mutated with a seeded PRNG (bit flips, truncation, duplication, hostile length
// fields) and fed to fresh connections. The server must never crash, must keep serving a
// healthy client, and must never write outside the export: the export is a window onto a
// larger device whose guard regions around the window are checksummed.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { createHash } from 'node:crypto';
import { join } from 'node:path';
import { PassThrough } from 'node:stream';
import { connect } from 'node:net';
import { NbdServer } from '../../src/nbd/server.ts';
import { MemoryDevice } from '../../src/block/memory.ts';
import { Layer } from '../../src/block/layer.ts';
import type { BlockDevice, Extent, WriteOpts, ZeroOpts } from '../../src/block/device.ts';
import { BASE_ALLOCATION, Cmd, CmdFlag, Info, Opt } from '../../src/nbd/constants.ts';
import { cleanupAll, onCleanup, tempDir } from '../helpers/proc.ts';
import { RawConn, goData, metaData, pattern, prng } from '../fixtures/nbd-raw.ts';

const MiB = 1024 * 1024;
const GUARD = 2 * MiB;
const WINDOW = 2 * MiB;
const ROUNDS = 300;
const SEED = 20261125;

/**
 * [base, base+size) of another device. It does no range checking of its own on purpose: the
 * server's checks are all that keep requests inside, so a miss lands in the guard regions.
 */
class Window extends Layer {
  constructor(inner: BlockDevice, private base: number, private length: number) { super(inner); }
  override get size(): number { return this.length; }
  override read(o: number, l: number): Promise<Buffer> { return this.inner.read(this.base + o, l); }
  override write(o: number, d: Buffer, opts?: WriteOpts): Promise<void> { return this.inner.write(this.base + o, d, opts); }
  override writeZeroes(o: number, l: number, opts?: ZeroOpts): Promise<void> { return this.inner.writeZeroes(this.base + o, l, opts); }
  override trim(o: number, l: number, opts?: WriteOpts): Promise<void> { return this.inner.trim(this.base + o, l, opts); }
  override cache(o: number, l: number): Promise<void> { return this.inner.cache(this.base + o, l); }
  override async blockStatus(o: number, l: number): Promise<Extent[]> {
    return (await this.inner.blockStatus(this.base + o, l)).map((e) => ({ ...e, offset: e.offset - this.base }));
  }
}

interface Session { bytes: Buffer; requests: number[] }

/** The client bytes of one valid session, and where each request header starts in them. */
function recordSession(): Session {
  const capture = new PassThrough();
  const chunks: Buffer[] = [];
  const w = new RawConn(capture);
  capture.on('data', (b: Buffer) => chunks.push(b));
  const flags = Buffer.alloc(4);
  flags.writeUInt32BE(3);
  w.write(flags);
  w.sendOption(Opt.STRUCTURED_REPLY);
  w.sendOption(Opt.SET_META_CONTEXT, metaData('disk', [BASE_ALLOCATION]));
  w.sendOption(Opt.GO, goData('disk', [Info.NAME, Info.BLOCK_SIZE]));
  capture.end();
  const parts: Buffer[] = [Buffer.concat(chunks)];
  const requests: number[] = [];
  let at = parts[0]!.length;
  const req = (type: number, offset: number, length: number, opts: { flags?: number; data?: Buffer } = {}) => {
    const h = Buffer.alloc(28);
    h.writeUInt32BE(0x25609513, 0);
    h.writeUInt16BE(opts.flags ?? 0, 4);
    h.writeUInt16BE(type, 6);
    h.writeBigUInt64BE(BigInt(requests.length + 1), 8);
    h.writeBigUInt64BE(BigInt(offset), 16);
    h.writeUInt32BE(length, 24);
    requests.push(at);
    parts.push(h);
    if (opts.data) parts.push(opts.data);
    at += 28 + (opts.data?.length ?? 0);
  };
  req(Cmd.WRITE, 0, 4096, { data: pattern(4096, 1) });
  req(Cmd.WRITE, WINDOW - 8192, 8192, { data: pattern(8192, 2), flags: CmdFlag.FUA });
  req(Cmd.READ, 0, 4096);
  req(Cmd.BLOCK_STATUS, 0, WINDOW);
  req(Cmd.TRIM, 65536, 65536);
  req(Cmd.WRITE_ZEROES, 8192, 4096, { flags: CmdFlag.NO_HOLE });
  req(Cmd.FLUSH, 0, 0);
  req(Cmd.WRITE, 12288, 4096, { data: pattern(4096, 3) });
  req(Cmd.CACHE, 0, 4096);
  req(Cmd.READ, WINDOW - 512, 512, { flags: CmdFlag.DF });
  req(Cmd.WRITE_ZEROES, WINDOW - 65536, 65536);
  req(Cmd.DISC, 0, 0);
  return { bytes: Buffer.concat(parts), requests };
}

function mutate(session: Session, rnd: () => number): Buffer {
  const b = Buffer.from(session.bytes);
  const pos = () => Math.floor(rnd() * b.length);
  switch (Math.floor(rnd() * 6)) {
    case 5: { // aim a request at the end of the export: offsets and lengths around the boundary
      const n = 1 + Math.floor(rnd() * 3);
      for (let i = 0; i < n; i++) {
        const at = session.requests[Math.floor(rnd() * session.requests.length)]!;
        const near = [WINDOW - 4096, WINDOW - 1, WINDOW, WINDOW + 4096, GUARD, 2 ** 53 - 4096, 2 ** 63];
        if (rnd() < 0.7) b.writeBigUInt64BE(BigInt(near[Math.floor(rnd() * near.length)]!), at + 16);
        else b.writeUInt32BE([8192, 65536, WINDOW, 0xffffffff][Math.floor(rnd() * 4)]!, at + 24);
      }
      return b;
    }
    case 0: { // bit flips
      const n = 1 + Math.floor(rnd() * 8);
      for (let i = 0; i < n; i++) { const p = pos(); b[p]! ^= 1 << Math.floor(rnd() * 8); }
      return b;
    }
    case 1: // truncation
      return b.subarray(0, pos());
    case 2: { // duplicate a slice in place
      const a = pos(), len = Math.floor(rnd() * 200);
      return Buffer.concat([b.subarray(0, a), b.subarray(a, a + len), b.subarray(a)]);
    }
    case 3: { // hostile 32-bit fields: lengths, offsets, counts
      const values = [0, 1, 0xffffffff, 0x7fffffff, 0x02000001, 0x10000, 0x10001, WINDOW, WINDOW + 1, Math.floor(rnd() * 0x100000000)];
      const n = 1 + Math.floor(rnd() * 3);
      for (let i = 0; i < n; i++) {
        const p = Math.min(pos(), b.length - 4);
        if (p >= 0) b.writeUInt32BE(values[Math.floor(rnd() * values.length)]!, p);
      }
      return b;
    }
    default: { // delete a slice
      const a = pos(), len = Math.floor(rnd() * 64);
      return Buffer.concat([b.subarray(0, a), b.subarray(a + len)]);
    }
  }
}

const sha = (b: Buffer) => createHash('sha256').update(b).digest('hex');

test.after(cleanupAll);

test(`server survives ${ROUNDS} mutated sessions and never writes outside the export`, async () => {
  const backing = MemoryDevice.from(pattern(GUARD + WINDOW + GUARD, 42));
  const guards = async () => sha(Buffer.concat([await backing.read(0, GUARD), await backing.read(GUARD + WINDOW, GUARD)]));
  const before = await guards();
  const server = new NbdServer({ exports: [{ name: 'disk', device: new Window(backing, GUARD, WINDOW) }], handshakeTimeoutMs: 5000 });
  const sock = join(tempDir('nbdfz-'), 's');
  await server.listenUnix(sock);
  onCleanup(() => server.close());

  const session = recordSession();
  const feed = (bytes: Buffer, rnd: () => number) => new Promise<void>((resolve) => {
    const s = connect(sock, () => {
      // Send in random pieces; half the time end politely, otherwise vanish mid-stream.
      let p = 0;
      while (p < bytes.length) { const n = 1 + Math.floor(rnd() * 512); s.write(bytes.subarray(p, p + n)); p += n; }
      if (rnd() < 0.5) s.end(); else setTimeout(() => s.destroy(), Math.floor(rnd() * 20));
    });
    s.on('data', () => {});
    s.on('error', () => {});
    s.on('close', () => resolve());
    setTimeout(() => s.destroy(), 3000).unref(); // a session the server keeps waiting on
  });
  const healthy = async (tag: string) => {
    const c = await RawConn.open(sock);
    try {
      await c.negotiate('disk');
      const data = pattern(4096, 1000 + tag.length);
      c.request(Cmd.WRITE, 1n, 4096, 4096, { data });
      assert.equal(await c.reply(), { kind: 'simple', error: 0, cookie: 1n }, tag);
      c.request(Cmd.READ, 2n, 4096, 4096);
      assert.equal(await c.reply(), { kind: 'simple', error: 0, cookie: 2n }, tag);
      assert.ok((await c.read(4096)).equals(data), tag);
    } finally {
      c.destroy();
    }
  };

  // The unmutated session is valid: its writes arrive (so mutations start from something real).
  await feed(session.bytes, prng(1));
  const landed = async () => (await backing.read(GUARD + 12288, 4096)).equals(pattern(4096, 3)) && (await backing.read(GUARD + WINDOW - 4096, 4096)).equals(Buffer.alloc(4096));
  for (let i = 0; i < 100 && !(await landed()); i++) await new Promise((r) => setTimeout(r, 20));
  assert.ok(await landed(), 'the recorded session\'s requests reach the device');

  const rnd = prng(SEED);
  const deadline = Date.now() + 120_000;
  let rounds = 0;
  for (; rounds < ROUNDS && Date.now() < deadline; rounds++) {
    await feed(mutate(session, rnd), rnd);
    if (rounds % 50 === 49) await healthy(`after round ${rounds + 1}`);
  }
  assert.is(rounds, ROUNDS, 'all rounds ran within the time bound');
  await healthy('at the end');
  for (let i = 0; i < 500 && server.stats().clients > 0; i++) await new Promise((r) => setTimeout(r, 10));
  assert.is(server.stats().clients, 0, 'every fuzzed connection was closed');
  assert.is(await guards(), before, 'no byte outside the export changed');
});

test.run();
