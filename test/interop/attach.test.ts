// `vmshift attach` / `detach` under a real guest that writes a numbered record sequence the
// whole time: attach a shim under its running disk, move the disk to another file with
// migrate-storage, detach onto the new file, and check on the final image that every record
// the guest saw acknowledged is there, in every phase. For -blockdev raw, -drive raw (named
// nodes, cache=none) and -blockdev qcow2 (preallocation=metadata: qcow2 cannot grow through
// the shim's fixed-size export).
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { existsSync } from 'node:fs';
import { join } from 'node:path';
import { bootGuest, ensureGuest } from '../helpers/guest.ts';
import { cleanupAll, run, runStatus, tempDir } from '../helpers/proc.ts';
import { disk, leftovers, runDir, SLOTS, stopAndVerify, VMSHIFT, writesMore } from './attach-helpers.ts';

test.before(ensureGuest);
test.after(cleanupAll);

const SIZE = 8 * 1024 * 1024;

interface Variant {
  name: string;
  format: 'raw' | 'qcow2';
  args: (img: string) => string[];
  cacheDirect: boolean;
}

const variants: Variant[] = [
  {
    name: 'raw, -blockdev',
    format: 'raw',
    args: (img) => ['-blockdev', `driver=file,filename=${img},node-name=f0`, '-blockdev', 'driver=raw,file=f0,node-name=d0', '-device', 'virtio-blk-pci,drive=d0,id=vd0'],
    cacheDirect: false,
  },
  {
    name: 'raw, -drive if=none with node names and cache=none',
    format: 'raw',
    args: (img) => ['-drive', `if=none,id=drive0,file=${img},format=raw,cache=none,node-name=d0,file.node-name=f0`, '-device', 'virtio-blk-pci,drive=drive0,id=vd0'],
    cacheDirect: true,
  },
  {
    name: 'qcow2 (preallocation=metadata), -blockdev',
    format: 'qcow2',
    args: (img) => ['-blockdev', `driver=file,filename=${img},node-name=f0`, '-blockdev', 'driver=qcow2,file=f0,node-name=d0', '-device', 'virtio-blk-pci,drive=d0,id=vd0'],
    cacheDirect: false,
  },
];

for (const v of variants) {
  test(`attach, migrate-storage, detach under a writing guest; every record survives: ${v.name}`, async () => {
    const scratch = tempDir('vmshift-att-');
    const { dir, env, shims } = runDir();
    const image = join(scratch, `disk.${v.format}`);
    const moved = join(scratch, `moved.${v.format}`);
    await run('qemu-img', ['create', '-f', v.format, ...(v.format === 'qcow2' ? ['-o', 'preallocation=metadata'] : []), image, String(SIZE)]);
    const qmp = join(scratch, 'qmp');
    const guest = bootGuest({ mode: 'writer', params: { blocks: SLOTS }, qmpSocket: qmp, extraArgs: v.args(image) });
    await guest.waitFor(/^VMSHIFT-SEQ 10$/, 120_000);

    // Attach.
    const att = await runStatus(VMSHIFT, ['attach', 'g1', '--qmp', qmp, '--disk', 'vd0', '--json'], { env });
    assert.is(att.code, 0, att.stderr);
    const out = JSON.parse(att.stdout);
    assert.is(out.disks.length, 1);
    assert.is(out.disks[0].status, 'attached');
    const socket: string = out.disks[0].shim.socket;
    const on = await disk(qmp, 'vd0');
    assert.is(on.formatNode, 'd0');
    assert.is(on.fileDriver, 'nbd');
    assert.not.ok(on.nodes.includes('f0'), 'the original file node is gone: the shim is the only path to the image');
    assert.is(leftovers(dir, shims).running.length, 1);
    const seqAttached = await writesMore(guest, 30);

    // Move the disk while the guest writes; the shim now backs onto `moved`.
    const mig = await runStatus(VMSHIFT, ['migrate-storage', '--socket', socket, '--to', moved, '--json'], { env });
    assert.is(mig.code, 0, `${mig.stdout}\n${mig.stderr}`);
    assert.is(await shims.backing(out.disks[0].shim.name), moved);
    const seqMoved = await writesMore(guest, 30);

    // Detach: QEMU goes back onto a file node, on the file the shim backs now.
    const det = await runStatus(VMSHIFT, ['detach', 'g1', '--qmp', qmp, '--json'], { env });
    assert.is(det.code, 0, det.stderr);
    const dout = JSON.parse(det.stdout);
    assert.equal(dout.disks.map((d: { status: string; filename: string }) => [d.status, d.filename]), [['detached', moved]]);
    const off = await disk(qmp, 'vd0');
    assert.is(off.fileDriver, 'file');
    assert.is(off.fileNode, 'f0', 'the file node gets its original name back');
    assert.is(off.filename, moved);
    assert.is(off.fileCacheDirect, v.cacheDirect, 'the file node keeps its cache mode');
    assert.equal(leftovers(dir, shims), { running: [], records: [] });
    assert.not.ok(existsSync(socket), 'the shim is gone');
    const seqDetached = await writesMore(guest, 30);

    const last = await stopAndVerify(guest, moved, v.format, scratch);
    assert.ok(last >= seqDetached && seqDetached > seqMoved && seqMoved > seqAttached, `phases: ${seqAttached} ${seqMoved} ${seqDetached} ${last}`);
  });
}

test.run();
