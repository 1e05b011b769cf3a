// hooks/proxmox-hookscript as Proxmox VE runs it: `SCRIPT VMID PHASE`, a bare environment,
// the guest's QMP socket at QMP_DIR/VMID.qmp. The guest is started the way qemu-server
// does: `-drive file=...,if=none,id=drive-virtio0,format=raw,cache=none,aio=threads,
// detect-zeroes=on` with `-device virtio-blk-pci,drive=drive-virtio0,id=virtio0`, plus node
// names (which PVE 8 does not give: see docs/proxmox.md) and a scsi0 disk without them,
// which vmshift must refuse without failing the hook.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { fileURLToPath } from 'node:url';
import { join } from 'node:path';
import { readFileSync, writeFileSync } from 'node:fs';
import { bootGuest, ensureGuest } from '../helpers/guest.ts';
import { cleanupAll, run, runStatus, tempDir } from '../helpers/proc.ts';
import { disk, leftovers, runDir, SLOTS, stopAndVerify, VMSHIFT, writesMore } from './attach-helpers.ts';

test.before(ensureGuest);
test.after(cleanupAll);

const HOOK = fileURLToPath(new URL('../../hooks/proxmox-hookscript', import.meta.url));
const SIZE = 8 * 1024 * 1024;

/** The environment qemu-server gives a hookscript, plus vmshift's settings for this test. */
function pveEnv(qmpDir: string, runDirPath: string, extra: Record<string, string> = {}): NodeJS.ProcessEnv {
  return {
    PATH: '/usr/sbin:/usr/bin:/sbin:/bin', LANG: 'C',
    VMSHIFT_PVE_CONF: '/nonexistent/proxmox.conf', VMSHIFT_BIN: VMSHIFT,
    VMSHIFT_PVE_QMP_DIR: qmpDir, VMSHIFT_RUN_DIR: runDirPath, VMSHIFT_SOCKET: join(runDirPath, 'no-vmshiftd.sock'), ...extra,
  };
}

test('garbage arguments: wrong count or VMID exits 2; unknown phases and pre-start exit 0', async () => {
  const env = pveEnv('/nonexistent', '/nonexistent');
  for (const args of [[], ['100'], ['100', 'post-start', 'extra'], ['abc', 'post-start'], ['', 'pre-stop']]) {
    const r = await runStatus(HOOK, args, { env });
    assert.is(r.code, 2, `${JSON.stringify(args)}: ${r.stderr}`);
    assert.match(r.stderr, /vmshift-hookscript: (usage|VMID)/);
  }
  const odd = await runStatus(HOOK, ['100', 'migrate-now'], { env });
  assert.is(odd.code, 0);
  assert.match(odd.stderr, /VM 100: ignoring unknown phase 'migrate-now'/);
  const pre = await runStatus(HOOK, ['100', 'pre-start'], { env });
  assert.equal([pre.code, pre.stderr], [0, '']);
});

test('VMSHIFT_PVE_RECONNECT_DELAY reaches vmshift attach as --reconnect-delay (and only attach)', async () => {
  const dir = tempDir('vpr-');
  const bin = join(dir, 'vmshift');
  writeFileSync(bin, `#!/bin/sh\necho "$*" >> ${join(dir, 'calls')}\n`, { mode: 0o755 });
  const env = { ...pveEnv(dir, dir), VMSHIFT_BIN: bin };
  for (const phase of ['post-start', 'pre-stop']) assert.is((await runStatus(HOOK, ['100', phase], { env: { ...env, VMSHIFT_PVE_RECONNECT_DELAY: '7' } })).code, 0);
  assert.is((await runStatus(HOOK, ['100', 'post-start'], { env })).code, 0);
  assert.equal(readFileSync(join(dir, 'calls'), 'utf8').trim().split('\n'), [
    `attach --reconnect-delay 7 pve-100 --qmp ${dir}/100.qmp`,
    `detach pve-100 --qmp ${dir}/100.qmp`,
    `attach pve-100 --qmp ${dir}/100.qmp`,
  ]);
});

test('post-start attaches, pre-stop detaches, under a writing guest; an unattachable disk never fails the start', async () => {
  const scratch = tempDir('vmshift-pve-');
  const { dir, shims } = runDir();
  const image = join(scratch, 'vm-100-disk-0.raw');
  const other = join(scratch, 'vm-100-disk-1.raw');
  for (const f of [image, other]) await run('qemu-img', ['create', '-f', 'raw', f, String(SIZE)]);
  const qmp = join(scratch, '100.qmp');
  const guest = bootGuest({
    mode: 'writer', params: { blocks: SLOTS }, qmpSocket: qmp,
    extraArgs: [
      '-drive', `file=${image},if=none,id=drive-virtio0,format=raw,cache=none,aio=threads,detect-zeroes=on,node-name=fmt-virtio0,file.node-name=file-virtio0`,
      '-device', 'virtio-blk-pci,drive=drive-virtio0,id=virtio0,bootindex=100',
      '-device', 'virtio-scsi-pci,id=scsihw0',
      '-drive', `file=${other},if=none,id=drive-scsi0,format=raw,cache=none,aio=threads,detect-zeroes=on`,
      '-device', 'scsi-hd,bus=scsihw0.0,channel=0,scsi-id=0,lun=0,drive=drive-scsi0,id=scsi0',
    ],
  });
  await guest.waitFor(/^VMSHIFT-SEQ 10$/, 120_000);
  const env = pveEnv(scratch, dir);

  // Strict, and only the disk vmshift cannot attach: the hook fails, nothing changes.
  const strict = await runStatus(HOOK, ['100', 'post-start'], { env: { ...env, VMSHIFT_PVE_STRICT: '1', VMSHIFT_PVE_DISKS: 'scsi0' } });
  assert.is(strict.code, 1, strict.stderr);
  assert.match(strict.stderr, /cannot attach disk scsi0 of pve-100: QEMU named its nodes itself/);
  assert.is((await disk(qmp, 'scsi0')).fileDriver, 'file');
  assert.equal(leftovers(dir, shims), { running: [], records: [] });

  // As configured by default: all disks; scsi0 is reported, virtio0 attached, exit 0.
  const start = await runStatus(HOOK, ['100', 'post-start'], { env });
  assert.is(start.code, 0, start.stderr);
  assert.match(start.stdout, /virtio0: attached: .*vm-100-disk-0\.raw served by shim pve-100-virtio0/);
  assert.match(start.stderr, /cannot attach disk scsi0 of pve-100/);
  const on = await disk(qmp, 'drive-virtio0');
  assert.is(on.fileDriver, 'nbd');
  assert.is(on.deviceId, 'virtio0');
  assert.equal(leftovers(dir, shims).running, ['pve-100-virtio0']);
  await writesMore(guest, 30);

  const stop = await runStatus(HOOK, ['100', 'pre-stop'], { env });
  assert.is(stop.code, 0, stop.stderr);
  assert.match(stop.stdout, /virtio0: detached: back on .*vm-100-disk-0\.raw/);
  const off = await disk(qmp, 'virtio0');
  assert.equal([off.fileNode, off.fileDriver, off.fileCacheDirect], ['file-virtio0', 'file', true]);
  assert.equal(leftovers(dir, shims), { running: [], records: [] });
  await writesMore(guest, 30);
  await stopAndVerify(guest, image, 'raw', scratch);

  // post-stop after a guest that is gone: nothing attached, nothing to do, exit 0.
  const post = await runStatus(HOOK, ['100', 'post-stop'], { env });
  assert.is(post.code, 0, post.stderr);
});

test('post-stop after the guest powered itself off (no pre-stop ran) stops its leftover shims', async () => {
  const scratch = tempDir('vmshift-pve-');
  const { dir, shims } = runDir();
  const image = join(scratch, 'vm-101-disk-0.raw');
  await run('qemu-img', ['create', '-f', 'raw', image, String(SIZE)]);
  const qmp = join(scratch, '101.qmp');
  const guest = bootGuest({
    mode: 'writer', params: { blocks: SLOTS, count: 400 }, qmpSocket: qmp,
    extraArgs: [
      '-drive', `file=${image},if=none,id=drive-virtio0,format=raw,node-name=fmt-virtio0,file.node-name=file-virtio0`,
      '-device', 'virtio-blk-pci,drive=drive-virtio0,id=virtio0',
    ],
  });
  await guest.waitFor(/^VMSHIFT-SEQ 10$/, 120_000);
  const env = pveEnv(scratch, dir);
  const start = await runStatus(HOOK, ['101', 'post-start'], { env });
  assert.is(start.code, 0, start.stderr);
  assert.equal(leftovers(dir, shims).running, ['pve-101-virtio0']);
  // The writer stops after 400 records and powers the guest off: QEMU exits on its own.
  await guest.waitExit(180_000);
  const post = await runStatus(HOOK, ['101', 'post-stop'], { env });
  assert.is(post.code, 0, post.stderr);
  assert.match(post.stdout, /virtio0: guest pve-101 is stopped: shim pve-101-virtio0 stopped/);
  assert.equal(leftovers(dir, shims), { running: [], records: [] });
  await stopAndVerify(guest, image, 'raw', scratch);
  assert.is(guest.lastSeq(), 400);
});

test.run();
