// Bad input and failures midway, against a real writing guest with three disks: vd0 (raw,
// -blockdev, the writer's disk), vd1 (a -drive without node names: QEMU names them itself)
// and vd2 (already on an NBD node, served by qemu-nbd). Every refusal is clear and changes
// nothing; a failure midway is undone (the disk back on its file node, no nbd node, no shim,
// no record); and the writer's log on the image is complete at the end.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { createServer } from 'node:net';
import { join } from 'node:path';
import { bootGuest, ensureGuest, type Guest } from '../helpers/guest.ts';
import { cleanupAll, onCleanup, run, runStatus, startDaemon, tempDir, waitForSocket } from '../helpers/proc.ts';
import { attachGuest } from '../../src/attach/attach.ts';
import { openGuest, type GuestTarget } from '../../src/attach/guest-target.ts';
import { AttachRecords } from '../../src/attach/records.ts';
import { QmpError, type QmpTransport } from '../../src/qemu/transport.ts';
import { disk, leftovers, runDir, SLOTS, stopAndVerify, VMSHIFT, writesMore } from './attach-helpers.ts';

test.before(ensureGuest);
test.after(cleanupAll);

const SIZE = 8 * 1024 * 1024;
let guest: Guest;
let qmp: string;
let image: string;
let scratch: string;

test('setup: a writing guest with a file disk, an auto-named -drive and an NBD disk', async () => {
  scratch = tempDir('vmshift-ate-');
  image = join(scratch, 'vd0.raw');
  const img1 = join(scratch, 'vd1.raw');
  const img2 = join(scratch, 'vd2.raw');
  for (const f of [image, img1, img2]) await run('qemu-img', ['create', '-f', 'raw', f, String(SIZE)]);
  const nbdSock = join(scratch, 'nbd');
  const nbd = startDaemon('qemu-nbd', ['-t', '-e', '8', '-f', 'raw', '-k', nbdSock, '-x', 'disk', img2]);
  await waitForSocket(nbdSock, nbd, 30_000);
  qmp = join(scratch, 'qmp');
  guest = bootGuest({
    mode: 'writer', params: { blocks: SLOTS }, qmpSocket: qmp,
    extraArgs: [
      '-blockdev', `driver=file,filename=${image},node-name=f0`, '-blockdev', 'driver=raw,file=f0,node-name=d0',
      '-device', 'virtio-blk-pci,drive=d0,id=vd0',
      '-drive', `if=none,id=drive1,file=${img1},format=raw`, '-device', 'virtio-blk-pci,drive=drive1,id=vd1',
      '-blockdev', `driver=nbd,node-name=n2,server.type=unix,server.path=${nbdSock},export=disk`,
      '-blockdev', 'driver=raw,file=n2,node-name=d2', '-device', 'virtio-blk-pci,drive=d2,id=vd2',
    ],
  });
  await guest.waitFor(/^VMSHIFT-SEQ 10$/, 120_000);
});

async function assertUntouched(dir: string, shims: ReturnType<typeof runDir>['shims']) {
  const d = await disk(qmp, 'vd0');
  assert.is(d.fileNode, 'f0');
  assert.is(d.fileDriver, 'file');
  assert.ok(!d.nodes.some((n) => n.startsWith('vmshift-')), `vmshift nodes left: ${d.nodes.join(', ')}`);
  assert.equal(leftovers(dir, shims), { running: [], records: [] });
}

test('CLI refusals: unknown disk, a disk already on NBD, an auto-named -drive; nothing changes', async () => {
  const { dir, env, shims } = runDir();
  const cases: Array<[string, RegExp]> = [
    ['nope', /no disk 'nope' in the guest \(disks: .*vd0/],
    ['vd2', /cannot attach disk vd2 .*already on an NBD node \(n2\)/],
    ['vd1', /cannot attach disk vd1 .*QEMU named its nodes itself.*node-name=/],
  ];
  for (const [ref, re] of cases) {
    const r = await runStatus(VMSHIFT, ['attach', '--qmp', qmp, '--disk', ref], { env });
    assert.is(r.code, 1, `${ref}: ${r.stdout}${r.stderr}`);
    assert.match(r.stderr, re);
  }
  await assertUntouched(dir, shims);
  assert.equal(await disk(qmp, 'vd2').then((d) => [d.fileNode, d.fileDriver]), ['n2', 'nbd']);
  await writesMore(guest, 10);
});

test('CLI without --disk attaches what it can, reports the rest, and detach reverses it', async () => {
  const { dir, env, shims } = runDir();
  const r = await runStatus(VMSHIFT, ['attach', '--qmp', qmp, '--json'], { env });
  assert.is(r.code, 0, r.stderr);
  const got = JSON.parse(r.stdout).disks.map((d: { disk: string; status: string }) => `${d.disk}:${d.status}`).sort();
  assert.equal(got, ['vd0:attached', 'vd1:refused', 'vd2:refused']);
  assert.is((await disk(qmp, 'vd0')).fileDriver, 'nbd');
  await writesMore(guest, 10);
  const again = await runStatus(VMSHIFT, ['attach', '--qmp', qmp, '--disk', 'vd0'], { env });
  assert.is(again.code, 1);
  assert.match(again.stderr, /already on an NBD node \(vmshift-nbd-/);
  const d = await runStatus(VMSHIFT, ['detach', '--qmp', qmp], { env });
  assert.is(d.code, 0, d.stderr);
  assert.match(d.stdout, /vd0: detached: back on .*vd0\.raw/);
  await assertUntouched(dir, shims);
  const none = await runStatus(VMSHIFT, ['detach', '--qmp', qmp, '--disk', 'vd0'], { env });
  assert.is(none.code, 1);
  assert.match(none.stderr, /disk vd0 of qmp-[0-9a-f]+ is not attached to vmshift/);
});

/** The real QEMU monitor, except that the first `command` on `node` is refused as QEMU would. */
function failOnce(target: GuestTarget, command: string, node: string): GuestTarget {
  let failed = false;
  const qmp: QmpTransport = {
    execute: (cmd, args, opts) => {
      if (!failed && cmd === command && JSON.stringify(args ?? {}).includes(`"${node}"`)) {
        failed = true;
        return Promise.reject(new QmpError(cmd, 'GenericError', 'injected failure', 'test'));
      }
      return target.qmp.execute(cmd, args, opts);
    },
    close: () => target.qmp.close(),
  };
  return { ...target, qmp };
}

for (const [command, node, when] of [['blockdev-reopen', 'd0', 'switching onto the shim'], ['blockdev-del', 'f0', 'deleting the old file node (the disk is already on the shim)']] as const) {
  test(`a failure while ${when} is undone: disk back on f0, no nbd node, no shim, no record`, async () => {
    const { dir, shims } = runDir();
    const records = new AttachRecords(join(dir, 'attached'));
    const real = await openGuest({ qmp });
    onCleanup(() => real.close());
    const out = await attachGuest(failOnce(real, command, node), { shims, records, disk: 'vd0' });
    await real.close();
    assert.is(out.length, 1);
    assert.is(out[0]!.status, 'failed');
    assert.match((out[0] as { reason: string }).reason, new RegExp(`${command} .*injected failure \\(undone: the disk is on .*vd0\\.raw as before\\)`));
    await assertUntouched(dir, shims);
    await writesMore(guest, 10);
  });
}

test('a --qmp socket that answers nonsense, and one that does not exist: clear errors, nothing started', async () => {
  const { dir, env, shims } = runDir();
  const bogus = join(dir, 'bogus.qmp');
  const server = createServer((c) => c.end('SSH-2.0-OpenSSH_9.2\r\n'));
  await new Promise<void>((r) => server.listen(bogus, r));
  onCleanup(() => new Promise<void>((r) => server.close(() => r())));
  const r = await runStatus(VMSHIFT, ['attach', '--qmp', bogus, '--disk', 'vd0'], { env });
  assert.is(r.code, 1);
  assert.match(r.stderr, new RegExp(`qmp:${bogus}: .*not a QMP monitor`));
  const missing = join(dir, 'missing.qmp');
  const m = await runStatus(VMSHIFT, ['attach', 'g', '--qmp', missing], { env });
  assert.is(m.code, 1);
  assert.match(m.stderr, new RegExp(`qmp:${missing}: cannot connect.*ENOENT`));
  const j = await runStatus(VMSHIFT, ['detach', '--qmp', missing, '--json'], { env });
  assert.is(j.code, 1);
  assert.match(JSON.parse(j.stdout).error.message, /cannot connect/);
  const u = await runStatus(VMSHIFT, ['attach'], { env });
  assert.is(u.code, 2);
  assert.match(u.stderr, /name a guest/);
  assert.equal(leftovers(dir, shims), { running: [], records: [] });
});

test('the writer lost nothing through all of it', async () => {
  await writesMore(guest, 10);
  await stopAndVerify(guest, image, 'raw', scratch);
});

test.run();
