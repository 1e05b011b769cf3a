// QmpClient against a real QEMU 7.2 (TCG, no kernel, CPUs stopped): handshake, return values
// of every shape, QEMU's error classes, events with data and timestamps, reconnect, the end of
// the session when QEMU quits, and a real non-QMP peer (qemu-nbd) failing fast.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { join } from 'node:path';
import { QmpClient } from '../../src/qemu/qmp.ts';
import { QmpConnectionError, QmpError } from '../../src/qemu/transport.ts';
import { cleanupAll, onCleanup, run, startDaemon, tempDir, waitForSocket, type Daemon } from '../helpers/proc.ts';

test.after(cleanupAll);

async function startQemu(): Promise<{ sock: string; qemu: Daemon; qmp: QmpClient }> {
  const sock = join(tempDir('vmshift-qmpq-'), 'qmp');
  const qemu = startDaemon('qemu-system-x86_64', [
    '-accel', 'tcg', '-m', '64', '-nodefaults', '-display', 'none', '-S', '-qmp', `unix:${sock},server=on,wait=off`,
  ]);
  await waitForSocket(sock, qemu, 30_000);
  const qmp = await QmpClient.connect(sock, { connectTimeoutMs: 30_000 });
  onCleanup(() => qmp.close());
  return { sock, qemu, qmp };
}

test('handshake, structured and empty-string returns, HMP text, and QEMU error classes', async () => {
  const { qmp } = await startQemu();
  assert.is(qmp.greeting?.version.qemu.major, 7);
  assert.equal(await qmp.execute('query-status'), { status: 'prelaunch', singlestep: false, running: false });
  assert.equal(await qmp.execute('query-block'), []);
  assert.match(await qmp.hmp('info status'), /VM status: paused \(prelaunch\)/);
  assert.is(await qmp.hmp('stop'), '');
  const err = await qmp.execute('no-such-command').then(() => null, (e) => e);
  assert.instance(err, QmpError);
  assert.is(err.errorClass, 'CommandNotFound');
  assert.is(err.command, 'no-such-command');
  const bad = await qmp.execute('blockdev-del', { 'node-name': 'ghost' }).then(() => null, (e) => e);
  assert.instance(bad, QmpError);
  assert.is(bad.errorClass, 'GenericError');
  assert.match(bad.desc, /ghost/);
  // Several commands in flight at once, each reply to its own caller.
  const many = await Promise.all(Array.from({ length: 20 }, (_, i) => (i % 2 ? qmp.execute('query-status') : qmp.hmp('info status'))));
  many.forEach((r, i) => (i % 2 ? assert.is((r as { status: string }).status, 'prelaunch') : assert.match(r as string, /VM status/)));
});

test('events arrive with data and timestamp; waitForEvent picks the right one', async () => {
  const { qmp } = await startQemu();
  const seen: string[] = [];
  qmp.onEvent((ev) => seen.push(ev.event));
  const resumed = qmp.waitForEvent('RESUME', undefined, 60_000);
  await qmp.execute('cont');
  const ev = await resumed;
  assert.ok(ev.timestamp.seconds > 1_600_000_000, `timestamp ${JSON.stringify(ev.timestamp)}`);
  assert.equal(ev.data, {});
  const stopped = qmp.waitForEvent('STOP', undefined, 60_000);
  await qmp.execute('stop');
  await stopped;
  const shutdown = qmp.waitForEvent('SHUTDOWN', (e) => e.data.reason === 'host-qmp-quit', 60_000);
  await qmp.execute('quit');
  const sd = await shutdown;
  assert.is(sd.data.guest, false);
  assert.equal(seen.slice(0, 2), ['RESUME', 'STOP']);
});

test('reconnect gets a new session; a QEMU that quits rejects what is pending and what follows', async () => {
  const { qemu, qmp } = await startQemu();
  await qmp.reconnect();
  assert.is((await qmp.execute<{ status: string }>('query-status')).status, 'prelaunch');
  const waiting = qmp.waitForEvent('NEVER_HAPPENS', undefined, 120_000);
  await qmp.execute('quit');
  const err = await waiting.then(() => null, (e) => e);
  assert.instance(err, QmpConnectionError);
  assert.is(err.kind, 'closed');
  await qemu.exited;
  const after = await qmp.execute('query-status').then(() => null, (e) => e);
  assert.is(after?.kind, 'closed');
  const again = await qmp.reconnect().then(() => null, (e) => e);
  assert.is(again?.kind, 'connect');
});

test('a real NBD server is not mistaken for a monitor: protocol error, no timeout', async () => {
  const dir = tempDir('vmshift-qmpq-');
  const img = join(dir, 'x.raw');
  await run('qemu-img', ['create', '-f', 'raw', img, '1M']);
  const sock = join(dir, 'nbd');
  const nbd = startDaemon('qemu-nbd', ['-t', '-e', '8', '-f', 'raw', '-k', sock, img]);
  await waitForSocket(sock, nbd, 30_000);
  const err = await QmpClient.connect(sock, { connectTimeoutMs: 120_000 }).then(() => null, (e) => e);
  assert.instance(err, QmpConnectionError);
  assert.is(err.kind, 'protocol');
  assert.match(err.message, /not a QMP monitor: received "NBDMAGIC/);
});

test.run();
