// The NBD server against hand-written protocol bytes on unix sockets: handshake options,
// every command, the exact error for each bad request, pipelining, limits and shutdown.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { createHash } from 'node:crypto';
import { join } from 'node:path';
import { lstatSync, statSync } from 'node:fs';
import { NbdServer } from '../../src/nbd/server.ts';
import { MemoryDevice } from '../../src/block/memory.ts';
import { Layer } from '../../src/block/layer.ts';
import type { BlockDevice } from '../../src/block/device.ts';
import {
  Cmd, CmdFlag, FLAG_FIXED_NEWSTYLE, FLAG_NO_ZEROES, Info, MAX_OPTION_LENGTH, Opt, Rep, ReplyFlag,
  ReplyType, StateFlag, TF, BASE_ALLOCATION,
} from '../../src/nbd/constants.ts';
import { cleanupAll, onCleanup, run, tempDir } from '../helpers/proc.ts';
import { RawConn, expectAck, goData, metaData, pattern } from '../fixtures/nbd-raw.ts';

const MiB = 1024 * 1024;
const SIZE = 4 * MiB;
const EINVAL = 22, EPERM = 1, ENOSPC = 28;

/** A layer that holds reads until released and records the most reads ever in flight. */
class HeldReads extends Layer {
  inFlight = 0;
  maxInFlight = 0;
  private waiting: Array<() => void> = [];
  held = true;
  constructor(inner: BlockDevice) { super(inner); }
  override async read(offset: number, length: number): Promise<Buffer> {
    this.inFlight++;
    this.maxInFlight = Math.max(this.maxInFlight, this.inFlight);
    if (this.held) await new Promise<void>((r) => this.waiting.push(r));
    this.inFlight--;
    return super.read(offset, length);
  }
  release(): void {
    this.held = false;
    for (const w of this.waiting.splice(0)) w();
  }
}

interface Fixture { server: NbdServer; sock: string; dev: MemoryDevice; ro: MemoryDevice }

async function serve(extra: { limits?: { maxInFlight?: number }; device?: BlockDevice } = {}): Promise<Fixture> {
  const dir = tempDir('nbds-');
  const sock = join(dir, 's');
  const dev = new MemoryDevice(SIZE);
  const ro = MemoryDevice.from(pattern(MiB, 7), { readOnly: true });
  const server = new NbdServer({
    exports: [
      { name: 'disk', description: 'a test disk', device: extra.device ?? dev },
      { name: 'ro', device: ro },
    ],
    limits: extra.limits,
  });
  await server.listenUnix(sock);
  onCleanup(() => server.close());
  return { server, sock, dev, ro };
}

async function open(f: Fixture): Promise<RawConn> {
  const c = await RawConn.open(f.sock);
  onCleanup(() => c.destroy());
  return c;
}

const sha = (b: Buffer) => createHash('sha256').update(b).digest('hex');

/** After anything a bad client did, a fresh client must still read what it wrote. */
async function stillServes(f: Fixture): Promise<void> {
  const c = await open(f);
  await c.negotiate('disk');
  const data = pattern(4096, 99);
  c.request(Cmd.WRITE, 1n, SIZE - 4096, 4096, { data });
  assert.equal(await c.reply(), { kind: 'simple', error: 0, cookie: 1n });
  c.request(Cmd.READ, 2n, SIZE - 4096, 4096);
  assert.equal(await c.reply(), { kind: 'simple', error: 0, cookie: 2n });
  assert.ok((await c.read(4096)).equals(data));
  c.destroy();
}

test.after(cleanupAll);

test('greeting advertises fixed newstyle and NO_ZEROES; unknown client flags end the session', async () => {
  const f = await serve();
  const c = await open(f);
  const { handshakeFlags } = await c.greet(0x10 | 1);
  assert.is(handshakeFlags, FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
  assert.ok(await c.closesWithin(), 'server must close on unknown client flags');
  await stillServes(f);
});

test('LIST names every export with its description; unknown option gets ERR_UNSUP and haggling goes on', async () => {
  const f = await serve();
  const c = await open(f);
  await c.greet();
  c.sendOption(Opt.LIST);
  const r = await c.optReplies();
  expectAck(r);
  const servers = r.filter((x) => x.type === Rep.SERVER).map((x) => {
    const n = x.data.readUInt32BE(0);
    return [x.data.toString('utf8', 4, 4 + n), x.data.toString('utf8', 4 + n)];
  });
  assert.equal(servers, [['disk', 'a test disk'], ['ro', '']]);
  c.sendOption(Opt.LIST, Buffer.from('x'));
  assert.is((await c.optReply()).type, Rep.ERR_INVALID);
  c.sendOption(4242, Buffer.from('junk'));
  const u = await c.optReply();
  assert.is(u.opt, 4242);
  assert.is(u.type, Rep.ERR_UNSUP);
  c.sendOption(Opt.GO, goData('disk'));
  expectAck(await c.optReplies());
});

test('INFO and GO report size, flags, name, description and block sizes; unknown export is ERR_UNKNOWN', async () => {
  const f = await serve();
  const c = await open(f);
  await c.greet();
  c.sendOption(Opt.INFO, goData('nope'));
  assert.is((await c.optReply()).type, Rep.ERR_UNKNOWN);
  c.sendOption(Opt.INFO, goData('disk').subarray(0, 5));
  assert.is((await c.optReply()).type, Rep.ERR_INVALID);
  c.sendOption(Opt.INFO, goData('ro', [Info.NAME, Info.DESCRIPTION, Info.BLOCK_SIZE]));
  const r = await c.optReplies();
  expectAck(r);
  const byType = new Map(r.filter((x) => x.type === Rep.INFO).map((x) => [x.data.readUInt16BE(0), x.data]));
  const exp = byType.get(Info.EXPORT)!;
  assert.is(exp.readBigUInt64BE(2), BigInt(MiB));
  const flags = exp.readUInt16BE(10);
  assert.ok(flags & TF.HAS_FLAGS && flags & TF.READ_ONLY && flags & TF.CAN_MULTI_CONN);
  assert.not.ok(flags & TF.SEND_TRIM, 'no TRIM on a read-only export');
  assert.is(byType.get(Info.NAME)!.toString('utf8', 2), 'ro');
  assert.not.ok(byType.has(Info.DESCRIPTION), 'ro has no description');
  const bs = byType.get(Info.BLOCK_SIZE)!;
  assert.equal([bs.readUInt32BE(2), bs.readUInt32BE(6), bs.readUInt32BE(10)], [1, 4096, 32 * MiB]);
  // INFO does not end haggling: GO on the other export still works.
  c.sendOption(Opt.GO, goData('disk', [Info.DESCRIPTION]));
  const g = await c.optReplies();
  expectAck(g);
  assert.ok(g.some((x) => x.type === Rep.INFO && x.data.readUInt16BE(0) === Info.DESCRIPTION && x.data.toString('utf8', 2) === 'a test disk'));
});

test('EXPORT_NAME sends size, flags and 124 zeroes unless NO_ZEROES; an unknown name ends the session', async () => {
  const f = await serve();
  const a = await open(f);
  await a.greet(1);
  a.sendOption(Opt.EXPORT_NAME, Buffer.from('disk'));
  const r = await a.read(10 + 124);
  assert.is(r.readBigUInt64BE(0), BigInt(SIZE));
  assert.ok(r.subarray(10).equals(Buffer.alloc(124)));
  a.request(Cmd.READ, 5n, 0, 512);
  assert.equal(await a.reply(), { kind: 'simple', error: 0, cookie: 5n });
  assert.ok((await a.read(512)).equals(Buffer.alloc(512)));

  const b = await open(f);
  await b.greet(3);
  b.sendOption(Opt.EXPORT_NAME, Buffer.from('disk'));
  await b.read(10);
  b.request(Cmd.FLUSH, 6n, 0, 0);
  // With NO_ZEROES the next bytes are the flush reply, not padding.
  assert.equal(await b.reply(), { kind: 'simple', error: 0, cookie: 6n });

  const c = await open(f);
  await c.greet();
  c.sendOption(Opt.EXPORT_NAME, Buffer.from('missing'));
  assert.ok(await c.closesWithin());
  assert.is((await c.read(0)).length, 0);
});

test('malformed handshakes: bad option magic, oversized option, client leaving mid-option', async () => {
  const f = await serve();
  const a = await open(f);
  await a.greet();
  a.write(Buffer.from('NOTMAGIC\0\0\0\x07\0\0\0\0'));
  assert.ok(await a.closesWithin(), 'bad option magic must close');

  const b = await open(f);
  await b.greet();
  b.sendOption(Opt.GO, Buffer.alloc(0), MAX_OPTION_LENGTH + 1);
  const r = await b.optReply();
  assert.is(r.type, Rep.ERR_TOO_BIG);
  assert.ok(await b.closesWithin(), 'oversized option must close');

  const c = await open(f);
  await c.greet();
  c.sendOption(Opt.GO, Buffer.alloc(3), 100); // promises 100 bytes, sends 3, leaves
  c.destroy();

  const d = await open(f);
  d.write(Buffer.from([1, 2])); // half of the client flags, then gone
  d.destroy();
  await stillServes(f);
});

test('meta contexts: need structured replies, LIST shows base:allocation, SET selects it for GO', async () => {
  const f = await serve();
  const c = await open(f);
  await c.greet();
  c.sendOption(Opt.LIST_META_CONTEXT, metaData('disk', []));
  assert.is((await c.optReply()).type, Rep.ERR_INVALID);
  c.sendOption(Opt.STRUCTURED_REPLY);
  expectAck(await c.optReplies());
  c.sendOption(Opt.LIST_META_CONTEXT, metaData('disk', ['base:']));
  const l = await c.optReplies();
  expectAck(l);
  assert.equal(l.filter((x) => x.type === Rep.META_CONTEXT).map((x) => x.data.toString('utf8', 4)), [BASE_ALLOCATION]);
  c.sendOption(Opt.SET_META_CONTEXT, metaData('nope', [BASE_ALLOCATION]));
  assert.is((await c.optReply()).type, Rep.ERR_UNKNOWN);
  c.sendOption(Opt.SET_META_CONTEXT, metaData('disk', ['x-other:thing']));
  assert.equal((await c.optReplies()).map((x) => x.type), [Rep.ACK]);
  c.sendOption(Opt.SET_META_CONTEXT, Buffer.from([0, 0, 0, 9]));
  assert.is((await c.optReply()).type, Rep.ERR_INVALID);
  c.sendOption(Opt.SET_META_CONTEXT, metaData('disk', [BASE_ALLOCATION]));
  const s = await c.optReplies();
  assert.equal(s.map((x) => x.type), [Rep.META_CONTEXT, Rep.ACK]);
  const id = s[0]!.data.readUInt32BE(0);
  assert.ok(id !== 0);
  c.sendOption(Opt.GO, goData('disk'));
  expectAck(await c.optReplies());

  await f.dev.write(MiB, pattern(64 * 1024, 1));
  c.request(Cmd.BLOCK_STATUS, 9n, 0, 2 * MiB);
  const r = await c.reply();
  assert.ok(r.kind === 'chunk' && r.type === ReplyType.BLOCK_STATUS && r.flags & ReplyFlag.DONE);
  const p = (r as { payload: Buffer }).payload;
  assert.is(p.readUInt32BE(0), id);
  const ext = [];
  for (let i = 4; i < p.length; i += 8) ext.push([p.readUInt32BE(i), p.readUInt32BE(i + 4)]);
  assert.equal(ext, [[MiB, StateFlag.HOLE | StateFlag.ZERO], [64 * 1024, 0], [MiB - 64 * 1024, StateFlag.HOLE | StateFlag.ZERO]]);

  c.request(Cmd.BLOCK_STATUS, 10n, 0, 2 * MiB, { flags: CmdFlag.REQ_ONE });
  const one = (await c.reply()) as { payload: Buffer };
  assert.is(one.payload.length, 12);
  assert.is(one.payload.readUInt32BE(4), MiB);

  c.request(Cmd.BLOCK_STATUS, 11n, SIZE - 512, 1024);
  const bad = (await c.reply()) as { type: number; payload: Buffer };
  assert.is(bad.type, ReplyType.ERROR);
  assert.is(bad.payload.readUInt32BE(0), EINVAL);
});

test('BLOCK_STATUS without a negotiated context is EINVAL', async () => {
  const f = await serve();
  const c = await open(f);
  await c.negotiate('disk', { structured: true });
  c.request(Cmd.BLOCK_STATUS, 1n, 0, 4096);
  const r = (await c.reply()) as { type: number; payload: Buffer };
  assert.is(r.type, ReplyType.ERROR);
  assert.is(r.payload.readUInt32BE(0), EINVAL);
});

test('structured reads: OFFSET_DATA for data, OFFSET_HOLE for zeroes, DF honoured', async () => {
  const f = await serve();
  const data = pattern(8192, 3);
  await f.dev.write(8192, data);
  const c = await open(f);
  const { flags } = await c.negotiate('disk', { structured: true });
  assert.ok(flags & TF.SEND_DF);
  c.request(Cmd.READ, 1n, 8192, 8192);
  const d = (await c.reply()) as { type: number; flags: number; payload: Buffer };
  assert.is(d.type, ReplyType.OFFSET_DATA);
  assert.ok(d.flags & ReplyFlag.DONE);
  assert.is(d.payload.readBigUInt64BE(0), 8192n);
  assert.ok(d.payload.subarray(8).equals(data));
  c.request(Cmd.READ, 2n, 3 * MiB, 65536);
  const h = (await c.reply()) as { type: number; payload: Buffer };
  assert.is(h.type, ReplyType.OFFSET_HOLE);
  assert.equal([h.payload.readBigUInt64BE(0), h.payload.readUInt32BE(8)], [BigInt(3 * MiB), 65536]);
  c.request(Cmd.READ, 3n, 3 * MiB, 4096, { flags: CmdFlag.DF });
  const df = (await c.reply()) as { type: number; payload: Buffer };
  assert.is(df.type, ReplyType.OFFSET_DATA);
  assert.ok(df.payload.subarray(8).equals(Buffer.alloc(4096)));
  c.request(Cmd.READ, 4n, SIZE, 1);
  const e = (await c.reply()) as { type: number; payload: Buffer };
  assert.is(e.type, ReplyType.ERROR, 'a failed READ still gets a structured reply');
  assert.is(e.payload.readUInt32BE(0), EINVAL);
});

test('bad requests get the exact error and the session goes on; nothing outside the range changes', async () => {
  const f = await serve();
  await f.dev.write(0, pattern(SIZE, 5));
  const before = sha(await f.dev.read(0, SIZE));
  const c = await open(f);
  await c.negotiate('disk');
  const cases: Array<[string, () => void, number]> = [
    ['unknown command', () => c.request(99, 1n, 0, 0), EINVAL],
    ['unknown flag', () => c.request(Cmd.READ, 2n, 0, 512, { flags: 1 << 9 }), EINVAL],
    ['flag of another command', () => c.request(Cmd.WRITE, 3n, 0, 0, { flags: CmdFlag.REQ_ONE }), EINVAL],
    ['read over 32 MiB', () => c.request(Cmd.READ, 4n, 0, 32 * MiB + 1), EINVAL],
    ['read past the end', () => c.request(Cmd.READ, 5n, SIZE - 100, 200), EINVAL],
    ['read at 2^53', () => c.request(Cmd.READ, 6n, 2n ** 53n, 1), EINVAL],
    ['read at 2^64-1', () => c.request(Cmd.READ, 7n, 2n ** 64n - 1n, 1), EINVAL],
    ['write past the end', () => c.request(Cmd.WRITE, 8n, SIZE - 2, 4, { data: Buffer.from('XXXX') }), ENOSPC],
    ['write at 2^63', () => c.request(Cmd.WRITE, 9n, 2n ** 63n, 4, { data: Buffer.from('YYYY') }), ENOSPC],
    ['zeroes past the end', () => c.request(Cmd.WRITE_ZEROES, 10n, SIZE, 4096), ENOSPC],
    ['trim past the end', () => c.request(Cmd.TRIM, 11n, SIZE - 4096, 8192), EINVAL],
    ['cache past the end', () => c.request(Cmd.CACHE, 12n, SIZE, 1), EINVAL],
    ['block status without structured replies', () => c.request(Cmd.BLOCK_STATUS, 13n, 0, 512), EINVAL],
  ];
  for (const [what, send, errno] of cases) {
    send();
    const r = await c.reply();
    assert.is(r.kind, 'simple', what);
    assert.is((r as { error: number }).error, errno, what);
  }
  assert.is(sha(await f.dev.read(0, SIZE)), before, 'no byte changed');
  const ro = await open(f);
  await ro.negotiate('ro');
  ro.request(Cmd.WRITE, 1n, 0, 4, { data: Buffer.from('ZZZZ') });
  assert.is((await ro.reply() as { error: number }).error, EPERM);
  ro.request(Cmd.TRIM, 2n, 0, 4096);
  assert.is((await ro.reply() as { error: number }).error, EPERM);
  ro.request(Cmd.READ, 3n, 0, 4);
  assert.is((await ro.reply() as { error: number }).error, 0);
  assert.ok((await ro.read(4)).equals(pattern(4, 7)));
  assert.is(f.server.stats().errors, cases.length + 2);
});

test('fatal requests: an oversized WRITE is refused then the session ends; bad magic disconnects', async () => {
  const f = await serve();
  const a = await open(f);
  await a.negotiate('disk');
  a.request(Cmd.WRITE, 1n, 0, 32 * MiB + 1, { data: Buffer.alloc(4096, 0xee) });
  assert.equal(await a.reply(), { kind: 'simple', error: EINVAL, cookie: 1n });
  assert.ok(await a.closesWithin());

  const b = await open(f);
  await b.negotiate('disk');
  b.request(Cmd.READ, 1n, 0, 512, { magic: 0x12345678 });
  assert.ok(await b.closesWithin());

  const c = await open(f);
  await c.negotiate('disk');
  c.request(Cmd.WRITE, 1n, 0, 65536, { data: Buffer.alloc(1000, 0xdd) }); // truncated payload
  c.destroy();
  await stillServes(f);
  assert.ok((await f.dev.read(0, SIZE - 4096)).equals(Buffer.alloc(SIZE - 4096)), 'refused or truncated writes left no trace');
});

test('pipelined requests are all answered by cookie, out of order when the device is', async () => {
  const held = new HeldReads(new MemoryDevice(SIZE));
  const f = await serve({ device: held });
  const c = await open(f);
  await c.negotiate('disk');
  c.request(Cmd.READ, 100n, 0, 4096); // held by the device
  const N = 40;
  for (let i = 0; i < N; i++) c.request(Cmd.WRITE, BigInt(i), (i + 1) * 4096, 4096, { data: pattern(4096, i) });
  const seen = new Set<bigint>();
  for (let i = 0; i < N; i++) {
    const r = await c.reply();
    assert.is((r as { error: number }).error, 0);
    seen.add(r.cookie);
  }
  assert.is(seen.size, N, 'every write answered while the read was still held');
  held.release();
  assert.equal(await c.reply(), { kind: 'simple', error: 0, cookie: 100n });
  await c.read(4096);
  for (let i = 0; i < N; i++) assert.ok((await held.read((i + 1) * 4096, 4096)).equals(pattern(4096, i)));
});

test('requests in flight per connection are bounded; the rest wait in the socket', async () => {
  const held = new HeldReads(new MemoryDevice(SIZE));
  const f = await serve({ device: held, limits: { maxInFlight: 4 } });
  const c = await open(f);
  await c.negotiate('disk');
  for (let i = 0; i < 20; i++) c.request(Cmd.READ, BigInt(i), i * 512, 512);
  // Wait until the server has taken what it will take (4), then let them go.
  for (let i = 0; i < 200 && held.inFlight < 4; i++) await new Promise((r) => setTimeout(r, 10));
  await new Promise((r) => setTimeout(r, 100));
  assert.is(held.maxInFlight, 4);
  held.release();
  const got = new Set<bigint>();
  for (let i = 0; i < 20; i++) {
    const r = await c.reply();
    await c.read(512);
    got.add(r.cookie);
  }
  assert.is(got.size, 20);
  assert.is(held.maxInFlight, 4);
});

test('DISC and close() answer requests in flight first, then end the session', async () => {
  const held = new HeldReads(new MemoryDevice(SIZE));
  const f = await serve({ device: held });
  const a = await open(f);
  await a.negotiate('disk');
  a.request(Cmd.READ, 1n, 0, 512);
  a.request(Cmd.DISC, 2n, 0, 0);
  a.request(Cmd.READ, 3n, 0, 512); // after DISC: never served
  const b = await open(f);
  await b.negotiate('disk');
  b.request(Cmd.READ, 4n, 512, 512);
  for (let i = 0; i < 200 && held.inFlight < 2; i++) await new Promise((r) => setTimeout(r, 10));
  const closing = f.server.close();
  held.release();
  assert.equal(await a.reply(), { kind: 'simple', error: 0, cookie: 1n });
  await a.read(512);
  assert.equal(await b.reply(), { kind: 'simple', error: 0, cookie: 4n });
  await b.read(512);
  assert.ok(await a.closesWithin());
  assert.ok(await b.closesWithin());
  await closing;
  assert.is(f.server.stats().clients, 0);
  assert.is(f.server.stats().requests, 2);
});

// Clients in another process, as in real life: in one process, connects outrun accepts.
const CHURN = `
const net = require('node:net');
const [path, total] = [process.argv[1], Number(process.argv[2])];
let started = 0, done = 0, retries = 0;
function one() {
  if (started >= total) return;
  const i = started++;
  const s = net.connect(path, () => {
    if (i % 3 === 1) s.write(Buffer.from([0, 0, 0, 3]));
    if (i % 3 === 2) s.write(Buffer.alloc(40, 0xff));
    s.destroy(); done++; one();
  });
  s.on('error', (e) => {
    if (e.code !== 'EAGAIN' || ++retries > 100000) throw e;
    started--; setTimeout(one, 2);
  });
}
for (let k = 0; k < 25; k++) one();
process.on('exit', () => process.stdout.write(String(done)));
`;

test('2000 connections opened and dropped quickly leave the server serving', async () => {
  const f = await serve();
  const r = await run(process.execPath, ['-e', CHURN, f.sock, '2000'], { timeout: 120_000 });
  assert.is(r.stdout.trim(), '2000');
  // Connections beyond maxConnections (16) are closed on arrival, and counted as refused.
  const seen = () => f.server.stats().connectionsTotal + f.server.stats().refused;
  for (let i = 0; i < 1000 && (seen() < 2000 || f.server.stats().clients > 0); i++) await new Promise((r) => setTimeout(r, 10));
  assert.is(seen(), 2000);
  assert.is(f.server.stats().clients, 0, 'no connection left behind');
  await stillServes(f);
});

test('stats count requests and bytes; write/read/trim/zero round trip on the device', async () => {
  const f = await serve();
  const c = await open(f);
  await c.negotiate('disk');
  const data = pattern(MiB, 11);
  c.request(Cmd.WRITE, 1n, 0, MiB, { data, flags: CmdFlag.FUA });
  c.request(Cmd.WRITE_ZEROES, 2n, 0, 65536, { flags: CmdFlag.NO_HOLE });
  c.request(Cmd.TRIM, 3n, 65536, 65536);
  c.request(Cmd.WRITE_ZEROES, 4n, 131072, 4096, { flags: CmdFlag.FAST_ZERO });
  c.request(Cmd.FLUSH, 5n, 0, 0);
  c.request(Cmd.CACHE, 6n, 0, 4096);
  for (let i = 0; i < 6; i++) assert.is((await c.reply() as { error: number }).error, 0);
  const expect = Buffer.from(data);
  expect.fill(0, 0, 131072 + 4096);
  assert.ok((await f.dev.read(0, MiB)).equals(expect));
  assert.is((await f.dev.blockStatus(65536, 65536))[0]!.hole, true, 'trim freed the chunk');
  assert.is((await f.dev.blockStatus(0, 65536))[0]!.hole, false, 'NO_HOLE kept it allocated');
  c.request(Cmd.READ, 7n, 0, MiB);
  await c.reply();
  assert.ok((await c.read(MiB)).equals(expect));
  const s = f.server.stats();
  assert.equal({ clients: s.clients, requests: s.requests, bytesRead: s.bytesRead, bytesWritten: s.bytesWritten, errors: s.errors },
    { clients: 1, requests: 7, bytesRead: MiB, bytesWritten: MiB, errors: 0 });
});

test('listenUnix replaces a stale socket, refuses a live one and applies the mode', async () => {
  const f = await serve();
  assert.is(statSync(f.sock).mode & 0o777, 0o600);
  const other = new NbdServer({ exports: [{ name: 'x', device: new MemoryDevice(4096) }] });
  onCleanup(() => other.close());
  try {
    await other.listenUnix(f.sock);
    assert.unreachable('a live socket must not be taken over');
  } catch (e) {
    assert.match(String(e), /another server is listening/);
  }
  await f.server.close();
  // A process that bound the socket and died leaves a stale socket file behind.
  await run('python3', ['-c', 'import socket,sys; socket.socket(socket.AF_UNIX).bind(sys.argv[1])', f.sock]);
  assert.ok(lstatSync(f.sock).isSocket());
  await other.listenUnix(f.sock, 0o660);
  assert.is(statSync(f.sock).mode & 0o777, 0o660);
});

test.run();
