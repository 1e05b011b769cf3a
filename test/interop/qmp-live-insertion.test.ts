// Live insertion on a real QEMU 7.2: put an NBD node (qemu-nbd serving the SAME file) under a
// running disk's format node with blockdev-reopen, write through QEMU, check the bytes landed
// in the file, then reopen back onto a fresh file node and stop qemu-nbd. The sequence is
// written up in docs/notes-live-insertion.md.
//
// Locks: QEMU and qemu-nbd both take byte-range locks on the image. The guest's original file
// node is opened with locking=off so qemu-nbd may open the file while QEMU has it; the fresh
// file node used to switch back is locking=off too, because qemu-nbd still holds its lock at
// that moment and a device without share-rw needs the exclusive write lock. With vmshift's own
// shim (which takes no QEMU locks) the fresh node can keep locking on.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { QmpClient } from '../../src/qemu/qmp.ts';
import { QmpError } from '../../src/qemu/transport.ts';
import { addFileNode, addNbdNode, BlockGraphError, deleteNode, findDisk, queryNamedNodes, reopenFile } from '../../src/qemu/block-graph.ts';
import { cleanupAll, onCleanup, run, startDaemon, tempDir, waitForSocket } from '../helpers/proc.ts';

test.after(cleanupAll);

const SIZE = 16 * 1024 * 1024;

async function startQemu(dir: string, diskArgs: string[]): Promise<QmpClient> {
  const sock = join(dir, 'qmp');
  const qemu = startDaemon('qemu-system-x86_64', [
    '-accel', 'tcg', '-m', '64', '-nodefaults', '-display', 'none', '-S',
    '-qmp', `unix:${sock},server=on,wait=off`, ...diskArgs,
  ]);
  await waitForSocket(sock, qemu, 30_000);
  const qmp = await QmpClient.connect(sock, { connectTimeoutMs: 30_000 });
  onCleanup(() => qmp.close());
  return qmp;
}

function startQemuNbd(dir: string, image: string) {
  const sock = join(dir, 'nbd');
  const nbd = startDaemon('qemu-nbd', ['-t', '-e', '8', '-f', 'raw', '-k', sock, '-x', 'disk', image]);
  return { sock, nbd, ready: waitForSocket(sock, nbd, 30_000) };
}

/** The guest-visible bytes of an image, read with -U: qemu-nbd may still hold its lock. */
async function guestBytes(dir: string, image: string, format: string, offset: number, length: number): Promise<Buffer> {
  if (format === 'raw') return readFileSync(image).subarray(offset, offset + length);
  const out = join(dir, 'flat.raw');
  await run('qemu-img', ['convert', '-U', '-f', format, '-O', 'raw', image, out]);
  return readFileSync(out).subarray(offset, offset + length);
}

interface Variant { name: string; format: 'raw' | 'qcow2'; args: (image: string) => string[]; hmpDev: string }

const variants: Variant[] = [
  {
    name: 'raw, -blockdev file+raw',
    format: 'raw',
    args: (img) => [
      '-blockdev', `driver=file,filename=${img},node-name=f0,locking=off`,
      '-blockdev', 'driver=raw,file=f0,node-name=d0',
      // share-rw: HMP qemu-io needs it on a -blockdev disk (see ENVIRONMENT.md).
      '-device', 'virtio-blk-pci,drive=d0,id=vd0,share-rw=on',
    ],
    hmpDev: 'd0',
  },
  {
    name: 'raw, -drive if=none with node names',
    format: 'raw',
    args: (img) => [
      '-drive', `if=none,id=drive0,file=${img},format=raw,node-name=d0,file.node-name=f0,file.locking=off`,
      '-device', 'virtio-blk-pci,drive=drive0,id=vd0',
    ],
    hmpDev: 'drive0',
  },
  {
    // Metadata preallocation: the NBD export has a fixed size, so qcow2 cannot grow the
    // file through it; without preallocation the first allocating write fails with EINVAL.
    name: 'qcow2 (preallocation=metadata), -blockdev file+qcow2',
    format: 'qcow2',
    args: (img) => [
      '-blockdev', `driver=file,filename=${img},node-name=f0,locking=off`,
      '-blockdev', 'driver=qcow2,file=f0,node-name=d0',
      '-device', 'virtio-blk-pci,drive=d0,id=vd0,share-rw=on',
    ],
    hmpDev: 'd0',
  },
];

for (const v of variants) {
  test(`live insertion of an NBD node under the format node and back: ${v.name}`, async () => {
    const dir = tempDir('vmshift-li-');
    const image = join(dir, `disk.${v.format}`);
    if (v.format === 'raw') await run('qemu-img', ['create', '-f', 'raw', image, String(SIZE)]);
    else await run('qemu-img', ['create', '-f', 'qcow2', '-o', 'preallocation=metadata', image, String(SIZE)]);
    const qmp = await startQemu(dir, v.args(image));

    const before = await findDisk(qmp, 'vd0');
    assert.is(before.definedAs, v.name.includes('-drive') ? 'drive' : 'blockdev');
    assert.is(before.formatNode, 'd0');
    assert.is(before.formatDriver, v.format);
    assert.is(before.fileNode, 'f0');
    assert.is(before.fileDriver, 'file');
    assert.is(before.filename, image);
    assert.not.ok(before.autoNamed);

    // 1. Insert: qemu-nbd serves the same file; the NBD node becomes the format node's file child.
    const nbd = startQemuNbd(dir, image);
    await nbd.ready;
    await addNbdNode(qmp, nbd.sock, 'disk', 'nbd0');
    await reopenFile(qmp, 'd0', 'nbd0');
    // The old file node must be gone, so that the NBD path is the only way to the file:
    // -drive's implicit child goes away with its last reference, a -blockdev one is deleted.
    if (before.definedAs === 'blockdev') await deleteNode(qmp, 'f0');
    const names = (await queryNamedNodes(qmp)).map((n) => n['node-name']);
    assert.not.ok(names.includes('f0'), `f0 still open: ${names.join(', ')}`);
    const inserted = await findDisk(qmp, 'vd0');
    assert.is(inserted.fileNode, 'nbd0');
    assert.is(inserted.fileDriver, 'nbd');

    assert.is(await qmp.hmp(`qemu-io ${v.hmpDev} "write -P 0x5a 0 64k"`), '');
    assert.ok((await guestBytes(dir, image, v.format, 0, 65536)).equals(Buffer.alloc(65536, 0x5a)), 'write through NBD reached the file');

    // 2. Back: a fresh file node, reopen onto it, drop the NBD node, stop qemu-nbd.
    await addFileNode(qmp, image, 'f1', { locking: false });
    await reopenFile(qmp, 'd0', 'f1');
    await deleteNode(qmp, 'nbd0');
    await nbd.nbd.stop();
    const back = await findDisk(qmp, 'vd0');
    assert.is(back.fileNode, 'f1');
    assert.is(back.fileDriver, 'file');
    assert.is(await qmp.hmp(`qemu-io ${v.hmpDev} "write -P 0x44 128k 64k"`), '');
    await qmp.execute('quit');
    const all = await guestBytes(dir, image, v.format, 0, 192 * 1024);
    assert.ok(all.subarray(0, 65536).equals(Buffer.alloc(65536, 0x5a)), 'the NBD-era write survived the switch back');
    assert.ok(all.subarray(65536, 131072).equals(Buffer.alloc(65536, 0)), 'nothing else was written');
    assert.ok(all.subarray(131072).equals(Buffer.alloc(65536, 0x44)), 'write after switching back reached the file');
    if (v.format === 'qcow2') await run('qemu-img', ['check', image]);
  });
}

test('a -drive without node names is found but cannot be reopened: clear error, guest untouched', async () => {
  const dir = tempDir('vmshift-li-');
  const image = join(dir, 'disk.raw');
  await run('qemu-img', ['create', '-f', 'raw', image, String(SIZE)]);
  const qmp = await startQemu(dir, [
    '-drive', `if=none,id=drive0,file=${image},format=raw`,
    '-device', 'virtio-blk-pci,drive=drive0,id=vd0',
  ]);
  const disk = await findDisk(qmp, 'drive0');
  assert.is(disk.definedAs, 'drive');
  assert.is(disk.deviceId, 'vd0');
  assert.ok(disk.autoNamed);
  assert.match(disk.formatNode, /^#block/);
  await addFileNode(qmp, image, 'spare', { locking: false });
  const err = await reopenFile(qmp, disk.formatNode, 'spare').then(() => null, (e) => e);
  assert.instance(err, BlockGraphError);
  assert.match(err.message, /blockdev-reopen refuses/);
  // What QEMU itself says, which the helper's message quotes.
  const raw = await qmp.execute('blockdev-reopen', { options: [{ driver: 'raw', 'node-name': disk.formatNode, file: 'spare' }] }).then(() => null, (e) => e);
  assert.instance(raw, QmpError);
  assert.match(raw.desc, /Cannot change the option 'node-name'/);
  assert.is((await findDisk(qmp, 'vd0')).fileNode, disk.fileNode);
  const unknown = await findDisk(qmp, 'nope').then(() => null, (e) => e);
  assert.instance(unknown, BlockGraphError);
  assert.match(unknown.message, /no disk 'nope'.*vd0/);
});

test.run();
