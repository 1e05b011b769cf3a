// The memory relay over a real link pair (two Link ends over a unix socket, with a carrier
// cut): a "QEMU" on each side (unix sockets, as QEMU's migrate and migrate-incoming use)
// exchanges a forward stream and a return path; both arrive byte for byte, each direction
// ends on its own, a second connection to the source socket is refused; with the memory cache
// the stream crosses through its encoder and decoder byte for byte. And `--peer` parsing.
import { test } from 'uvu';
import { crc32 } from 'node:zlib';
import * as assert from 'uvu/assert';
import { createHash, randomBytes } from 'node:crypto';
import { writeFileSync } from 'node:fs';
import { connect, createServer, type Socket } from 'node:net';
import { join } from 'node:path';
import { cleanupAll, onCleanup, rejection } from '../helpers/proc.ts';
import { linkPair } from '../helpers/link-pair.ts';
import { destRelay, sourceRelay, MEMORY_STREAM } from '../../src/relay/memory-relay.ts';
import type { LinkStream } from '../../src/link/stream.ts';
import { parsePeer } from '../../src/cli/migrate-memory.ts';

test.after.each(cleanupAll);

const sha = (b: Buffer) => createHash('sha256').update(b).digest('hex');
function readAll(s: Socket): Promise<Buffer> {
  return new Promise((resolve, reject) => { const parts: Buffer[] = []; s.on('data', (b) => parts.push(b)); s.on('end', () => resolve(Buffer.concat(parts))); s.on('error', reject); });
}

test('forward stream and return path cross the link intact through a cut; each direction ends on its own', async () => {
  const p = linkPair();
  const forward = randomBytes(6 * 1024 * 1024), back = randomBytes(300 * 1024);
  // The destination "QEMU": listens (migrate-incoming), reads the stream to its end, then answers.
  const incoming = join(p.dir, 'dst.mig');
  let gotForward!: Promise<Buffer>;
  const dst = createServer({ allowHalfOpen: true }, (s) => { gotForward = readAll(s); void gotForward.then(() => s.end(back)); });
  await new Promise<void>((r) => dst.listen(incoming, () => r()));
  onCleanup(() => { dst.close(); });
  p.b.on('stream', (s: LinkStream) => { if (s.streamName === MEMORY_STREAM) void destRelay(incoming, s); });
  await new Promise((r) => p.a.once('carrier', r));
  const relay = await sourceRelay(join(p.dir, 'src.mig'), () => p.a.stream(MEMORY_STREAM));
  onCleanup(() => relay.close());
  // The source "QEMU": connects (migrate uri=unix:), sends everything, half-closes, waits for the reply.
  const src = connect({ path: relay.path, allowHalfOpen: true });
  const gotBack = readAll(src);
  src.write(forward.subarray(0, 2 * 1024 * 1024));
  await new Promise((r) => setTimeout(r, 50));
  p.cut();
  src.end(forward.subarray(2 * 1024 * 1024));
  // A second client (anyone else on the host) is refused: one migration, one connection.
  const intruder = connect(relay.path);
  const closed = await new Promise<string>((r) => { intruder.on('error', (e) => r(e.message)); intruder.on('close', () => r('closed')); });
  assert.ok(closed.length > 0);
  assert.is(sha(await gotBack), sha(back));
  assert.is(sha(await gotForward), sha(forward));
  await relay.done;
  assert.equal(relay.counts, { forward: forward.length, back: back.length, link: forward.length, forwardCrc: crc32(forward) }, "without the cache the link carries the stream as it is");
  assert.ok(p.a.stats().reconnects >= 1, JSON.stringify(p.a.stats()));
});

/** A small QEMU 7.2 stream: header, a ram START with MEM_SIZE, two passes over `pages` pages (the second changed a little), EOF. */
function qemuStream(pages: number): Buffer {
  const be32 = (n: number) => { const b = Buffer.alloc(4); b.writeUInt32BE(n); return b; };
  const be64 = (n: number) => { const b = Buffer.alloc(8); b.writeBigUInt64BE(BigInt(n)); return b; };
  const id = Buffer.from('pc.ram');
  const parts = [be32(0x5145564d), be32(3), Buffer.from([0x01]), be32(2), Buffer.from([3]), Buffer.from('ram'), be32(0), be32(4),
    be64(pages * 4096 + 0x04), Buffer.from([id.length]), id, be64(pages * 4096), be64(0x10), Buffer.from([0x7e]), be32(2)];
  const page = randomBytes(4096);
  for (const pass of [0, 1]) {
    parts.push(Buffer.from([0x02]), be32(2));
    for (let i = 0; i < pages; i++) {
      parts.push(be64(i * 4096 + 0x08 + (i ? 0x20 : 0)));
      if (!i) parts.push(Buffer.from([id.length]), id);
      const p = Buffer.from(page);
      p.writeUInt32BE(i * 7 + pass, 100);
      parts.push(p);
    }
    parts.push(be64(0x10), Buffer.from([0x7e]), be32(2));
  }
  parts.push(Buffer.from([0x00]), Buffer.from('device state and vmdesc, passed through'));
  return Buffer.concat(parts);
}

test('with the cache: the stream crosses the real link through the encoder and decoder byte for byte, smaller', async () => {
  const p = linkPair();
  const forward = qemuStream(512), back = randomBytes(1000);
  const incoming = join(p.dir, 'dst.mig');
  let gotForward!: Promise<Buffer>;
  const dst = createServer({ allowHalfOpen: true }, (s) => { gotForward = readAll(s); void gotForward.then(() => s.end(back)); });
  await new Promise<void>((r) => dst.listen(incoming, () => r()));
  onCleanup(() => { dst.close(); });
  p.b.on('stream', (s: LinkStream) => { if (s.streamName === MEMORY_STREAM) void destRelay(incoming, s, true); });
  await new Promise((r) => p.a.once('carrier', r));
  const relay = await sourceRelay(join(p.dir, 'src.mig'), () => p.a.stream(MEMORY_STREAM), { budget: 4 << 20, turnDown: false });
  onCleanup(() => relay.close());
  const src = connect({ path: relay.path, allowHalfOpen: true });
  const gotBack = readAll(src);
  src.end(forward);
  assert.is(sha(await gotBack), sha(back), 'the return path, unparsed');
  assert.is(sha(await gotForward), sha(forward));
  await relay.done;
  const st = relay.cache!.stats();
  assert.is(st.passThrough, null);
  assert.is(st.pages, 1024);
  assert.is(st.hits, 512, 'every page of the second pass was a delta against its kept copy');
  assert.ok(relay.counts.link < forward.length * 0.7, `${forward.length} -> ${relay.counts.link} on the link`);
});

test('the source socket is never put over an existing path', async () => {
  const p = linkPair();
  const path = join(p.dir, 'taken');
  writeFileSync(path, 'x');
  const e = await rejection(sourceRelay(path, () => p.a.stream(MEMORY_STREAM))) as Error;
  assert.match(e.message, /already exists; refusing/);
});

test('--peer: ssh://[USER@]HOST[:PORT] or tls://HOST:PORT, nothing else', () => {
  assert.equal(parsePeer('ssh://root@10.0.0.2:2222'), { scheme: 'ssh', user: 'root', host: '10.0.0.2', port: 2222 });
  assert.equal(parsePeer('ssh://hostb'), { scheme: 'ssh', user: 'root', host: 'hostb', port: 22 });
  assert.equal(parsePeer('ssh://admin@[fd00::2]:22'), { scheme: 'ssh', user: 'admin', host: 'fd00::2', port: 22 });
  assert.equal(parsePeer('tls://hostb:7000'), { scheme: 'tls', host: 'hostb', port: 7000 });
  for (const bad of ['hostb', 'ssh://root@host;rm -rf /', 'ssh://host:99999', 'tcp://host:22', 'ssh://-oProxyCommand=x', 'tls://hostb', 'tls://root@hostb:7000']) {
    assert.throws(() => parsePeer(bad), /--peer/, bad);
  }
});

test.run();
