// Our client against our server (src/nbd/server.ts) on MemoryDevices: a round trip over a
// unix socket, over an already-open stream, and over TCP with TLS (certificates made by
// openssl for the test, verified by the client).
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { randomBytes } from 'node:crypto';
import { readFileSync, writeFileSync } from 'node:fs';
import { connect, createServer } from 'node:net';
import { join } from 'node:path';
import { BlockError } from '../../src/block/device.ts';
import { MemoryDevice } from '../../src/block/memory.ts';
import { NbdClientDevice } from '../../src/block/nbd-device.ts';
import { NbdClient } from '../../src/nbd/client.ts';
import { NbdServer } from '../../src/nbd/server.ts';
import { cleanupAll, onCleanup, run, tempDir, rejection } from '../helpers/proc.ts';

const MiB = 1024 * 1024;

test.after(cleanupAll);

function serve(exports: Array<{ name: string; device: MemoryDevice; description?: string }>, tls?: { cert: string; key: string }): NbdServer {
  const server = new NbdServer({ exports, tls: tls ? { ...tls, required: true, verifyClient: false } : undefined });
  onCleanup(() => server.close());
  return server;
}

test('round trip over a unix socket: data, zeroes, trim and block status from a MemoryDevice', async () => {
  const mem = new MemoryDevice(16 * MiB);
  const server = serve([{ name: 'disk', device: mem }, { name: 'spare', device: new MemoryDevice(MiB), description: 'a spare' }]);
  const sock = join(tempDir('vmsns-'), 's');
  await server.listenUnix(sock);
  const uri = `nbd+unix:///disk?socket=${sock}`;

  const listing = await NbdClient.list(uri);
  assert.equal(listing.map((e) => e.name).sort(), ['disk', 'spare']);
  assert.is((await NbdClient.info(`nbd+unix:///spare?socket=${sock}`)).size, MiB);

  const dev = await NbdClientDevice.open(uri, { connections: 2 });
  try {
    const data = randomBytes(3 * MiB + 17);
    await dev.write(MiB - 5, data, { fua: true });
    assert.ok((await dev.read(MiB - 5, data.length)).equals(data));
    assert.ok((await mem.read(MiB - 5, data.length)).equals(data), 'bytes reached the device behind the server');

    await dev.writeZeroes(2 * MiB, MiB);
    await dev.trim(8 * MiB, MiB);
    const ext = await dev.blockStatus(0, 16 * MiB);
    const at = (o: number) => ext.find((e) => e.offset <= o && o < e.offset + e.length)!;
    assert.not.ok(at(MiB).zero, 'written data is data');
    assert.ok(at(2 * MiB).zero, 'zeroed range is zero');
    assert.ok(at(12 * MiB).hole && at(12 * MiB).zero, 'never written is a hole');
    assert.ok((await dev.read(2 * MiB, MiB)).equals(Buffer.alloc(MiB)));
    await dev.flush();
  } finally {
    await dev.close();
  }

  const e = await rejection(NbdClient.connect(`nbd+unix:///nope?socket=${sock}`));
  assert.match((e as Error).message, new RegExp(`^nbd\\+unix:///nope\\?socket=${sock}: GO: export "nope" not found \\(NBD_REP_ERR_UNKNOWN\\)`));
});

test('an already-open stream works as a target (as an SSH channel would)', async () => {
  const mem = new MemoryDevice(4 * MiB);
  const server = serve([{ name: 'disk', device: mem }]);
  // A plain listener that hands each connection to the server, standing in for a tunnel.
  const sock = join(tempDir('vmsns-'), 't');
  const relay = createServer((s) => void server.handleConnection(s, 'relay'));
  await new Promise<void>((resolve) => relay.listen(sock, resolve));
  onCleanup(() => new Promise<void>((resolve) => relay.close(() => resolve())));

  const stream = connect(sock);
  await new Promise((resolve) => stream.once('connect', resolve));
  const dev = await NbdClientDevice.open({ transport: 'stream', stream, exportName: 'disk', label: 'relay:disk' }, { connections: 4 });
  try {
    assert.is(dev.name, 'relay:disk');
    assert.is(dev.connections, 1, 'one stream cannot become four connections');
    const data = randomBytes(MiB);
    await dev.write(4096, data);
    assert.ok((await mem.read(4096, MiB)).equals(data));
  } finally {
    await dev.close();
  }
});

test('TLS over TCP: verified against the CA, refused with the wrong CA, name or no TLS', async () => {
  const dir = tempDir('vmsns-');
  const p = (f: string) => join(dir, f);
  const ec = ['-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:P-256', '-nodes'];
  await run('openssl', ['req', '-x509', ...ec, '-keyout', p('ca.key'), '-out', p('ca.pem'), '-subj', '/CN=vmshift test CA', '-days', '2',
    '-addext', 'basicConstraints=critical,CA:TRUE', '-addext', 'keyUsage=critical,keyCertSign']);
  await run('openssl', ['req', ...ec, '-keyout', p('srv.key'), '-out', p('srv.csr'), '-subj', '/CN=localhost']);
  writeFileSync(p('ext'), 'subjectAltName=DNS:localhost,IP:127.0.0.1\n');
  await run('openssl', ['x509', '-req', '-in', p('srv.csr'), '-CA', p('ca.pem'), '-CAkey', p('ca.key'), '-CAcreateserial',
    '-out', p('srv.pem'), '-days', '2', '-extfile', p('ext')]);
  // A second CA that did not sign the server's certificate.
  await run('openssl', ['req', '-x509', ...ec, '-keyout', p('other.key'), '-out', p('other.pem'), '-subj', '/CN=other CA', '-days', '2']);
  const ca = readFileSync(p('ca.pem'));

  const mem = new MemoryDevice(2 * MiB);
  const server = serve([{ name: 'disk', device: mem }], { cert: readFileSync(p('srv.pem'), 'utf8'), key: readFileSync(p('srv.key'), 'utf8') });
  const port = await server.listenTcp('127.0.0.1', 0);
  const uri = `nbds://127.0.0.1:${port}/disk`;

  // By IP (checked against the IP SAN) and by name.
  for (const tls of [{ ca }, { ca, servername: 'localhost' }]) {
    const dev = await NbdClientDevice.open(uri, { tls });
    try {
      const data = randomBytes(300000);
      await dev.write(100, data);
      assert.ok((await dev.read(100, data.length)).equals(data));
    } finally {
      await dev.close();
    }
  }
  assert.equal((await NbdClient.list(uri, { tls: { ca } })).map((e) => e.name), ['disk']);

  const wrongCa = await rejection(NbdClient.connect(uri, { tls: { ca: readFileSync(p('other.pem')) } }));
  assert.match((wrongCa as Error).message, `${uri}: STARTTLS: TLS handshake failed`);
  const wrongName = await rejection(NbdClient.connect(uri, { tls: { ca, servername: 'elsewhere.example' } }));
  assert.match((wrongName as Error).message, `${uri}: STARTTLS: TLS handshake failed`);
  const noCa = await rejection(NbdClient.connect(uri, { tls: { servername: 'localhost' } }));
  assert.match((noCa as Error).message, `${uri}: STARTTLS: TLS needs the CA that signed the server certificate`);
  const noOptions = await rejection(NbdClient.connect(uri));
  assert.match((noOptions as Error).message, 'TLS target but no TLS options');
  const plain = await rejection(NbdClient.connect(`nbd://127.0.0.1:${port}/disk`));
  assert.match((plain as Error).message, `nbd://127.0.0.1:${port}/disk: STRUCTURED_REPLY: server requires TLS (use nbds://) (NBD_REP_ERR_TLS_REQD)`);
});

test('when the server closes, the client gets ESHUTDOWN or EIO and later requests fail at once', async () => {
  const mem = new MemoryDevice(MiB);
  const server = new NbdServer({ exports: [{ name: 'disk', device: mem }] });
  const sock = join(tempDir('vmsns-'), 's');
  await server.listenUnix(sock);
  const c = await NbdClient.connect(`nbd+unix:///disk?socket=${sock}`);
  await c.write(0, Buffer.alloc(4096, 1));
  await server.close();
  const e = await rejection(c.read(0, 4096));
  assert.ok(e instanceof BlockError && (e.errno === 'ESHUTDOWN' || e.errno === 'EIO'), String(e));
  await c.disconnect();
});

test.run();
