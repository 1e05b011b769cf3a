// QmpClient against a scripted monitor on a real unix socket: id matching, any return value,
// events, framing across partial chunks, garbage, timeouts, peer close and reconnect.
// (test/interop/qmp-qemu.test.ts runs the same client against a real QEMU.)
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { createServer, type Server, type Socket } from 'node:net';
import { join } from 'node:path';
import { QmpClient } from '../../src/qemu/qmp.ts';
import { QmpConnectionError, QmpError } from '../../src/qemu/transport.ts';
import { cleanupAll, onCleanup, tempDir } from '../helpers/proc.ts';

const GREETING = '{"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7}, "package": ""}, "capabilities": ["oob"]}}\r\n';

type Cmd = { execute: string; id: string; arguments?: Record<string, unknown> };
type Handler = (cmd: Cmd, conn: Socket) => void;

/** A scripted monitor: greets (unless told otherwise), answers qmp_capabilities, passes the rest to `handler`. */
async function fakeMonitor(handler: Handler, opts: { greeting?: string } = {}): Promise<{ path: string; server: Server; conns: Socket[] }> {
  const path = join(tempDir('vmshift-qmp-'), 'qmp.sock');
  const conns: Socket[] = [];
  const server = createServer((conn) => {
    conns.push(conn);
    conn.on('error', () => { /* the client may hang up first */ });
    conn.write(opts.greeting ?? GREETING);
    let buf = '';
    conn.on('data', (b) => {
      buf += b;
      let nl: number;
      while ((nl = buf.indexOf('\n')) >= 0) {
        const cmd = JSON.parse(buf.slice(0, nl)) as Cmd;
        buf = buf.slice(nl + 1);
        if (cmd.execute === 'qmp_capabilities') conn.write(JSON.stringify({ return: {}, id: cmd.id }) + '\r\n');
        else handler(cmd, conn);
      }
    });
  });
  await new Promise<void>((resolve) => server.listen(path, resolve));
  onCleanup(() => new Promise<void>((resolve) => { for (const c of conns) c.destroy(); server.close(() => resolve()); }));
  return { path, server, conns };
}

const reply = (conn: Socket, id: string, value: unknown) => conn.write(JSON.stringify({ return: value, id }) + '\r\n');

test.after(cleanupAll);

test('replies are matched by id, not by order, and any return value is accepted', async () => {
  const held: Array<[Cmd, Socket]> = [];
  const { path } = await fakeMonitor((cmd, conn) => {
    held.push([cmd, conn]);
    // Answer the three commands in reverse order once all have arrived.
    if (held.length === 3) for (const [c, s] of held.reverse()) reply(s, c.id, c.arguments!.v);
  });
  const qmp = await QmpClient.connect(path);
  const [a, b, c] = await Promise.all([
    qmp.execute('echo', { v: '' }),
    qmp.execute('echo', { v: {} }),
    qmp.execute('echo', { v: [1, 2] }),
  ]);
  assert.is(a, '');
  assert.equal(b, {});
  assert.equal(c, [1, 2]);
  assert.is(qmp.greeting?.version.qemu.major, 7);
  await qmp.close();
});

test('a greeting split across chunks, then events and a UTF-8 reply split at every byte', async () => {
  const path = join(tempDir('vmshift-qmp-'), 'qmp.sock');
  const server = createServer((conn) => {
    conn.on('error', () => {});
    const g = Buffer.from(GREETING);
    conn.write(g.subarray(0, 7));
    setTimeout(() => conn.write(g.subarray(7)), 20);
    let buf = '';
    conn.on('data', (b) => {
      buf += b;
      let nl: number;
      while ((nl = buf.indexOf('\n')) >= 0) {
        const cmd = JSON.parse(buf.slice(0, nl)) as Cmd;
        buf = buf.slice(nl + 1);
        if (cmd.execute === 'qmp_capabilities') { reply(conn, cmd.id, {}); continue; }
        const ev = JSON.stringify({ event: 'X', data: { n: 1 }, timestamp: { seconds: 5, microseconds: 6 } }) + '\r\n';
        const bytes = Buffer.from(ev + JSON.stringify({ return: 'ok \u00e9\u4e2d', id: cmd.id }) + '\r\n');
        for (let i = 0; i < bytes.length; i++) conn.write(bytes.subarray(i, i + 1));
      }
    });
  });
  await new Promise<void>((resolve) => server.listen(path, resolve));
  onCleanup(() => new Promise<void>((resolve) => server.close(() => resolve())));
  const qmp = await QmpClient.connect(path);
  const seen: unknown[] = [];
  qmp.onEvent((ev) => seen.push(ev));
  assert.is(await qmp.execute('split'), 'ok \u00e9\u4e2d');
  assert.equal(seen, [{ event: 'X', data: { n: 1 }, timestamp: { seconds: 5, microseconds: 6 } }]);
  await qmp.close();
});

test('an error reply becomes a QmpError with class, desc and command', async () => {
  const { path } = await fakeMonitor((cmd, conn) => {
    conn.write(JSON.stringify({ error: { class: 'DeviceNotFound', desc: "Device 'x' not found" }, id: cmd.id }) + '\r\n');
  });
  const qmp = await QmpClient.connect(path);
  try {
    await qmp.execute('query-x');
    assert.unreachable('should have thrown');
  } catch (e) {
    assert.instance(e, QmpError);
    const err = e as QmpError;
    assert.is(err.command, 'query-x');
    assert.is(err.errorClass, 'DeviceNotFound');
    assert.is(err.desc, "Device 'x' not found");
    assert.match(err.message, /query-x failed: DeviceNotFound/);
  }
  // The session survives an error reply.
  const again = await qmp.execute('query-y').then(() => null, (e) => e);
  assert.is(again?.command, 'query-y');
  await qmp.close();
});

test('waitForEvent skips events that do not match the predicate and keeps the data', async () => {
  const { path } = await fakeMonitor((cmd, conn) => {
    conn.write(JSON.stringify({ event: 'JOB_STATUS_CHANGE', data: { id: 'j1', status: 'running' }, timestamp: { seconds: 1, microseconds: 2 } }) + '\r\n');
    conn.write(JSON.stringify({ event: 'JOB_STATUS_CHANGE', data: { id: 'j1', status: 'ready' }, timestamp: { seconds: 3, microseconds: 4 } }) + '\r\n');
    reply(conn, cmd.id, {});
  });
  const qmp = await QmpClient.connect(path);
  const ready = qmp.waitForEvent('JOB_STATUS_CHANGE', (ev) => ev.data.status === 'ready', 20_000);
  await qmp.execute('job-start');
  const ev = await ready;
  assert.equal(ev.data, { id: 'j1', status: 'ready' });
  assert.equal(ev.timestamp, { seconds: 3, microseconds: 4 });
  await qmp.close();
});

test('when the monitor closes, every pending command and event wait rejects with kind closed', async () => {
  const { path } = await fakeMonitor((_cmd, conn) => {
    // Close only once both commands have been sent.
    setTimeout(() => conn.destroy(), 50);
  });
  const qmp = await QmpClient.connect(path);
  const wait = qmp.waitForEvent('NEVER', undefined, 60_000);
  const results = await Promise.allSettled([qmp.execute('a'), qmp.execute('b'), wait]);
  for (const r of results) {
    assert.is(r.status, 'rejected');
    const err = (r as PromiseRejectedResult).reason;
    assert.instance(err, QmpConnectionError);
    assert.is((err as QmpConnectionError).kind, 'closed');
  }
  assert.match(String((results[0] as PromiseRejectedResult).reason.message), /a aborted/);
  // Commands after the close fail at once instead of hanging.
  await qmp.execute('c').then(() => assert.unreachable('ran on a closed monitor'), (e) => assert.is(e.kind, 'closed'));
  await qmp.close();
});

test('a socket that answers nonsense fails the connect with a protocol error, not a timeout', async () => {
  const { path } = await fakeMonitor(() => {}, { greeting: 'NBDMAGIC\u0000\u0000IHAVEOPT' });
  try {
    await QmpClient.connect(path, { connectTimeoutMs: 60_000 });
    assert.unreachable('connected to a non-QMP socket');
  } catch (e) {
    assert.instance(e, QmpConnectionError);
    assert.is((e as QmpConnectionError).kind, 'protocol');
    assert.match((e as Error).message, /not a QMP monitor: received "NBDMAGIC/);
  }
});

test('garbage after the handshake rejects the pending command with a protocol error', async () => {
  const { path } = await fakeMonitor((_cmd, conn) => { conn.write('{"return": {}, "id": \r\n'); });
  const qmp = await QmpClient.connect(path);
  const err = await qmp.execute('x', undefined, { timeoutMs: 60_000 }).then(() => null, (e) => e);
  assert.instance(err, QmpConnectionError);
  assert.is(err.kind, 'protocol');
  assert.match(err.message, /unparseable message/);
  await qmp.close();
});

test('a reply with an id nobody sent is a protocol error', async () => {
  const { path } = await fakeMonitor((_cmd, conn) => { reply(conn, 'someone-else', {}); });
  const qmp = await QmpClient.connect(path);
  const err = await qmp.execute('x', undefined, { timeoutMs: 60_000 }).then(() => null, (e) => e);
  assert.is(err?.kind, 'protocol');
  assert.match(err.message, /unknown id "someone-else"/);
  await qmp.close();
});

test('a command that times out rejects; its late reply is dropped and the next command works', async () => {
  let slowId = '';
  const { path } = await fakeMonitor((cmd, conn) => {
    if (cmd.execute === 'slow') { slowId = cmd.id; return; }
    // Answer the slow one late, just before the fast one.
    reply(conn, slowId, 'late');
    reply(conn, cmd.id, 'fast');
  });
  const qmp = await QmpClient.connect(path);
  const err = await qmp.execute('slow', undefined, { timeoutMs: 100 }).then(() => null, (e) => e);
  assert.is(err?.kind, 'timeout');
  assert.match(err.message, /slow got no reply within 100 ms/);
  assert.is(await qmp.execute('fast'), 'fast');
  await qmp.close();
});

test('reconnect opens a fresh session after the monitor dropped the first one', async () => {
  const { path, conns } = await fakeMonitor((cmd, conn) => reply(conn, cmd.id, conns.indexOf(conn)));
  const qmp = await QmpClient.connect(path);
  assert.is(await qmp.execute('which'), 0);
  const closed = new Promise((r) => conns[0]!.once('close', r));
  conns[0]!.destroy();
  await closed;
  await qmp.execute('which').then(() => assert.unreachable('ran on a dropped session'), (e) => assert.instance(e, QmpConnectionError));
  await qmp.reconnect();
  assert.is(conns.length, 2);
  assert.is(await qmp.execute('which'), 1);
  assert.ok(qmp.connected);
  await qmp.close();
  assert.not.ok(qmp.connected);
});

test('connecting to a socket nobody listens on fails with kind connect', async () => {
  const path = join(tempDir('vmshift-qmp-'), 'none.sock');
  const err = await QmpClient.connect(path).then(() => null, (e) => e);
  assert.instance(err, QmpConnectionError);
  assert.is(err.kind, 'connect');
  assert.match(err.message, /none\.sock/);
});

test.run();
