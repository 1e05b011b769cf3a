// The memory relay over a real link pair (two Link ends over a unix socket, with a carrier
// cut): a "QEMU" on each side (unix sockets, as QEMU's migrate and migrate-incoming use)
// exchanges a forward stream and a return path; both arrive byte for byte, each direction
// ends on its own, a second connection to the source socket is refused. And `--peer` parsing.
import { test } from 'uvu';
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
  assert.equal(relay.counts, { forward: forward.length, back: back.length });
  assert.ok(p.a.stats().reconnects >= 1, JSON.stringify(p.a.stats()));
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
