// NBD over TLS (NBD_OPT_STARTTLS, x509): qemu-img, qemu-io and nbdinfo connect with a CA they
// trust; a plaintext client of a TLS-only server gets ERR_TLS_REQD and nothing else.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { connect as tlsConnect } from 'node:tls';
import { NbdServer } from '../../src/nbd/server.ts';
import { MemoryDevice } from '../../src/block/memory.ts';
import { Opt, Rep, Cmd } from '../../src/nbd/constants.ts';
import { cleanupAll, onCleanup, run, runStatus, tempDir } from '../helpers/proc.ts';
import { RawConn, goData, pattern } from '../fixtures/nbd-raw.ts';
import { connect as netConnect } from 'node:net';

const MiB = 1024 * 1024;

test.after(cleanupAll);

/** A CA and a server certificate for 127.0.0.1/localhost, in the layout QEMU and libnbd read. */
async function makeCerts(): Promise<string> {
  const dir = tempDir('nbdtls-');
  const ssl = (...args: string[]) => run('openssl', args, { cwd: dir });
  const ec = ['-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1', '-nodes'];
  await ssl('req', '-x509', ...ec, '-keyout', 'ca-key.pem', '-out', 'ca-cert.pem', '-days', '2', '-subj', '/CN=vmshift test CA');
  await ssl('req', ...ec, '-keyout', 'server-key.pem', '-out', 'server.csr', '-subj', '/CN=localhost');
  writeFileSync(join(dir, 'ext.cnf'), 'subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\nkeyUsage=digitalSignature,keyEncipherment\n');
  await ssl('x509', '-req', '-in', 'server.csr', '-CA', 'ca-cert.pem', '-CAkey', 'ca-key.pem', '-CAcreateserial', '-out', 'server-cert.pem', '-days', '2', '-extfile', 'ext.cnf');
  return dir;
}

async function tlsServer(required: boolean) {
  const certs = await makeCerts();
  const dev = new MemoryDevice(16 * MiB);
  const server = new NbdServer({
    exports: [{ name: 'sec', device: dev }],
    tls: { cert: readFileSync(join(certs, 'server-cert.pem')), key: readFileSync(join(certs, 'server-key.pem')), required },
  });
  const port = await server.listenTcp('127.0.0.1', 0);
  onCleanup(() => server.close());
  return { server, dev, certs, port };
}

function rawTcp(port: number): Promise<RawConn> {
  return new Promise((resolve, reject) => {
    const s = netConnect(port, '127.0.0.1', () => resolve(new RawConn(s)));
    s.once('error', reject);
    onCleanup(() => { s.destroy(); });
  });
}

test('qemu-io and qemu-img work over TLS', async () => {
  const { certs, port, dev } = await tlsServer(true);
  const object = `tls-creds-x509,id=tls0,dir=${certs},endpoint=client`;
  const opts = `driver=nbd,server.type=inet,server.host=127.0.0.1,server.port=${port},export=sec,tls-creds=tls0`;
  await run('qemu-io', ['--object', object, '--image-opts', opts, '-c', 'write -P 0x5a 1M 64k']);
  assert.ok((await dev.read(MiB, 65536)).equals(Buffer.alloc(65536, 0x5a)));
  const r = await run('qemu-io', ['--object', object, '--image-opts', opts, '-c', 'read -P 0x5a 1M 64k']);
  assert.not.match(r.stdout + r.stderr, /fail/i);
  const info = await run('qemu-img', ['info', '--output=json', '--object', object, '--image-opts', opts]);
  assert.is(JSON.parse(info.stdout)['virtual-size'], 16 * MiB);
});

test('nbdinfo connects over TLS; trusting another CA it is refused', async () => {
  const { certs, port } = await tlsServer(true);
  const info = await run('nbdinfo', [`nbds://127.0.0.1:${port}/sec?tls-certificates=${certs}`]);
  assert.match(info.stdout, /with TLS/);
  assert.match(info.stdout, /export-size: 16777216/);
  const other = await makeCerts(); // a CA that did not sign our server's certificate
  const bad = await runStatus('nbdinfo', [`nbds://127.0.0.1:${port}/sec?tls-certificates=${other}`]);
  assert.ok(bad.code !== 0, 'a client that cannot verify the server must fail');
});

test('a plaintext client of a TLS-only server gets ERR_TLS_REQD for every option but STARTTLS and ABORT', async () => {
  const { port, server } = await tlsServer(true);
  const plain = await runStatus('nbdinfo', [`nbd://127.0.0.1:${port}/sec`]);
  assert.ok(plain.code !== 0);
  assert.match(plain.stderr, /server replied with error to opt_go/); // libnbd does not name ERR_TLS_REQD; the raw check below does

  const c = await rawTcp(port);
  await c.greet();
  for (const [opt, data] of [[Opt.GO, goData('sec')], [Opt.INFO, goData('sec')], [Opt.LIST, Buffer.alloc(0)], [Opt.STRUCTURED_REPLY, Buffer.alloc(0)], [4242, Buffer.alloc(0)]] as const) {
    c.sendOption(opt, data);
    const r = await c.optReply();
    assert.equal([r.opt, r.type], [opt, Rep.ERR_TLS_REQD]);
  }
  c.sendOption(Opt.ABORT);
  assert.is((await c.optReply()).type, Rep.ACK);
  assert.ok(await c.closesWithin());

  const d = await rawTcp(port);
  await d.greet();
  d.sendOption(Opt.EXPORT_NAME, Buffer.from('sec'));
  assert.ok(await d.closesWithin(), 'EXPORT_NAME cannot be refused politely: the session ends');
  assert.is(server.stats().requests, 0);
});

test('raw STARTTLS upgrade, then GO and a read inside TLS; STARTTLS twice is ERR_INVALID', async () => {
  const { port, certs, dev } = await tlsServer(true);
  await dev.write(0, pattern(4096, 8));
  const c = await rawTcp(port);
  await c.greet();
  c.sendOption(Opt.STARTTLS);
  assert.is((await c.optReply()).type, Rep.ACK);
  const secure = await new Promise<RawConn>((resolve, reject) => {
    const t = tlsConnect({ socket: c.sock as never, ca: readFileSync(join(certs, 'ca-cert.pem')), servername: 'localhost' }, () => resolve(new RawConn(t)));
    t.once('error', reject);
    onCleanup(() => { t.destroy(); });
  });
  secure.sendOption(Opt.STARTTLS);
  assert.is((await secure.optReply()).type, Rep.ERR_INVALID);
  secure.sendOption(Opt.GO, goData('sec'));
  const replies = await secure.optReplies();
  assert.is(replies[replies.length - 1]!.type, Rep.ACK);
  secure.request(Cmd.READ, 1n, 0, 4096);
  assert.equal(await secure.reply(), { kind: 'simple', error: 0, cookie: 1n });
  assert.ok((await secure.read(4096)).equals(pattern(4096, 8)));
});

test('with optional TLS, plaintext and TLS clients are both served', async () => {
  const { port, certs } = await tlsServer(false);
  const plain = await run('nbdinfo', [`nbd://127.0.0.1:${port}/sec`]);
  assert.match(plain.stdout, /without TLS/);
  const secure = await run('nbdinfo', [`nbds://127.0.0.1:${port}/sec?tls-certificates=${certs}`]);
  assert.match(secure.stdout, /with TLS/);
});

test.run();
