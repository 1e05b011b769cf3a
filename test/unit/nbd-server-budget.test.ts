// The NBD server's reading and memory bounds, against hand-written protocol bytes on unix
// sockets: payloads read straight into their buffers land byte-exact however the stream is
// cut; what clients that never read their replies can make the server hold is bounded per
// connection and overall, and the others are still served.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { join } from 'node:path';
import { NbdServer } from '../../src/nbd/server.ts';
import { MemoryDevice } from '../../src/block/memory.ts';
import { Cmd } from '../../src/nbd/constants.ts';
import { RESERVE_BYTES } from '../../src/nbd/server-budget.ts';
import { cleanupAll, onCleanup, tempDir } from '../helpers/proc.ts';
import { RawConn, pattern, prng } from '../fixtures/nbd-raw.ts';

const MiB = 1024 * 1024;
test.after(cleanupAll);

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

async function serve(dev: MemoryDevice, opts: { maxBytes?: number; maxInFlightBytes?: number; maxInFlight?: number } = {}): Promise<{ server: NbdServer; sock: string }> {
  const sock = join(tempDir('nbdb-'), 's');
  const limits = { ...(opts.maxInFlightBytes && { maxInFlightBytes: opts.maxInFlightBytes }), ...(opts.maxInFlight && { maxInFlight: opts.maxInFlight }) };
  const server = new NbdServer({ exports: [{ name: 'disk', device: dev }], maxBytes: opts.maxBytes, limits });
  await server.listenUnix(sock);
  onCleanup(() => server.close());
  return { server, sock };
}

async function client(sock: string): Promise<RawConn> {
  const c = await RawConn.open(sock);
  onCleanup(() => c.destroy());
  await c.negotiate('disk');
  return c;
}

function header(type: number, cookie: number, offset: number, length: number): Buffer {
  const h = Buffer.alloc(28);
  h.writeUInt32BE(0x25609513, 0);
  h.writeUInt16BE(type, 6);
  h.writeBigUInt64BE(BigInt(cookie), 8);
  h.writeBigUInt64BE(BigInt(offset), 16);
  h.writeUInt32BE(length, 24);
  return h;
}

test('WRITEs of every size, sent cut at random places (mid-header, mid-payload), land byte-exact', async () => {
  const size = 16 * MiB;
  const dev = new MemoryDevice(size);
  const { sock } = await serve(dev);
  const c = await client(sock);
  const expected = Buffer.alloc(size);
  // Small ones batch in one read, large ones go straight into their buffers (over 16 KiB
  // left to come), sizes just around those edges, and one 4 MiB (a pool class's top).
  const sizes = [1, 27, 28, 100, 4096, 16383, 16384, 16385, 65535, 65536, 65537, 262144, MiB + 3, 4 * MiB, 7, 4096];
  const parts: Buffer[] = [];
  let offset = 0;
  sizes.forEach((len, i) => {
    const data = pattern(len, 40 + i);
    data.copy(expected, offset);
    parts.push(header(Cmd.WRITE, i, offset, len), data);
    offset += len + 512;
  });
  const stream = Buffer.concat(parts);
  const rnd = prng(7);
  for (let p = 0; p < stream.length; ) {
    const n = Math.min(stream.length - p, 1 + Math.floor(rnd() * (rnd() < 0.5 ? 64 : 300_000)));
    c.write(stream.subarray(p, p + n));
    p += n;
    if (rnd() < 0.3) await sleep(1); // let the server read what came so far: cuts land mid-request
  }
  const cookies = new Set<bigint>();
  for (let i = 0; i < sizes.length; i++) {
    const r = await c.reply();
    assert.equal(r.kind === 'simple' && r.error, 0, `write ${i} succeeded`);
    cookies.add((r as { cookie: bigint }).cookie);
  }
  assert.is(cookies.size, sizes.length);
  const got = await dev.read(0, size);
  assert.ok(got.equals(expected), 'the device holds exactly what was written');
});

test('a WRITE taken up after the connection paused (its header already read) lands byte-exact', async () => {
  // One request at a time and a first write the device holds: the server reads the first
  // WRITE, the second's header and the start of its payload in one socket read, pauses, and
  // takes the second up only when the first completes, outside any socket read. The bytes of
  // the next read must still land in the second's buffer (they once went to the buffer chosen
  // for that read before the pause, and the payload kept stale bytes there).
  let release!: () => void;
  const hold = new Promise<void>((r) => (release = r));
  let writes = 0;
  class HeldDevice extends MemoryDevice {
    override async write(offset: number, data: Buffer): Promise<void> {
      if (writes++ === 0) await hold;
      return super.write(offset, data);
    }
  }
  const dev = new HeldDevice(4 * MiB);
  const { sock } = await serve(dev, { maxInFlight: 1 });
  const c = await client(sock);
  const small = pattern(4096, 1);
  const big = pattern(MiB, 2);
  c.write(Buffer.concat([header(Cmd.WRITE, 1, 0, small.length), small, header(Cmd.WRITE, 2, MiB, big.length), big]));
  for (let i = 0; i < 500 && writes === 0; i++) await sleep(10);
  assert.is(writes, 1, 'the first write reached the device; the second waits');
  release();
  for (const cookie of [1n, 2n]) assert.equal(await c.reply(), { kind: 'simple', error: 0, cookie });
  assert.ok((await dev.read(0, small.length)).equals(small), 'the first write landed');
  assert.ok((await dev.read(MiB, big.length)).equals(big), 'the second write landed byte-exact');
});

test('clients that never read replies hold at most their own and the server\'s byte budget; another client is served', async () => {
  const dev = MemoryDevice.from(pattern(64 * MiB, 3));
  const { server, sock } = await serve(dev, { maxBytes: 12 * MiB, maxInFlightBytes: 8 * MiB });
  const held = () => server.stats().heldBytes;
  const hoard = async () => {
    const c = await client(sock);
    c.sock.pause();
    c.write(Buffer.concat(Array.from({ length: 48 }, (_, i) => header(Cmd.READ, i, i * MiB, MiB))));
    return c;
  };
  const a = await hoard();
  for (let i = 0; i < 100 && held() < 8 * MiB; i++) await sleep(20);
  await sleep(100);
  assert.is(held(), 8 * MiB, 'one client: its own 8 MiB');
  const b = await hoard();
  for (let i = 0; i < 100 && held() < 12 * MiB; i++) await sleep(20);
  await sleep(100);
  assert.is(held(), 12 * MiB, 'two clients: the server\'s 12 MiB (b got the 4 MiB left)');

  // A third client gets its requests through, one at a time (the reserve), with the right bytes.
  const c = await client(sock);
  for (let i = 0; i < 3; i++) {
    c.request(Cmd.READ, BigInt(100 + i), (10 + i) * MiB, RESERVE_BYTES);
    const r = await c.reply();
    assert.equal(r, { kind: 'simple', error: 0, cookie: BigInt(100 + i) });
    assert.ok((await c.read(RESERVE_BYTES)).equals((await dev.read((10 + i) * MiB, RESERVE_BYTES))), `read ${i}: the right bytes`);
  }
  a.destroy();
  b.destroy();
  for (let i = 0; i < 100 && held() > 0; i++) await sleep(20);
  assert.is(held(), 0, 'everything back once they left');
});

test.run();
