// Put a shim under a disk of a running guest, without stopping it (docs/notes-live-insertion.md):
//
//   1. find the disk; refuse unless it is raw or qcow2 over a local `file`/`host_device` node
//      with node names QEMU did not make up (blockdev-reopen cannot address those)
//   2. start a shim on the image file (for qcow2: the container bytes; QEMU keeps the qcow2 work)
//   3. blockdev-add an nbd node on the shim's unix socket, with a reconnect delay: QEMU holds
//      the guest's requests while the shim restarts instead of failing them
//   4. blockdev-reopen the format node with file = the nbd node (QEMU drains the node first)
//   5. delete the old file node if it is still there (-blockdev nodes belong to the monitor)
//
// A failure undoes the steps done so far, newest first, and stops undoing at the first undo
// that fails: a shim is never stopped while the guest's disk may still go through it.
import { randomBytes } from 'node:crypto';
import { isAbsolute } from 'node:path';
import { addNbdNode, BlockGraphError, deleteNode, findDisk, queryDisks, queryNamedNodes, reopenFile, type DiskPicture } from '../qemu/block-graph.ts';
import type { GuestTarget } from './guest-target.ts';
import type { AttachRecord, AttachRecords } from './records.ts';
import { safeName, type ShimStarter } from './shim-starter.ts';

export interface AttachOptions {
  shims: ShimStarter;
  records: AttachRecords;
  /** Only this disk; without it every disk that can be attached is. */
  disk?: string;
  /** Recorded so that detach asks the same owner; default 'direct'. */
  starterKind?: AttachRecord['starter'];
  /** Seconds QEMU holds the guest's I/O while the shim restarts (src/qemu/nbd-reconnect.ts). */
  reconnectDelayS?: number;
}

export type AttachOutcome =
  | { disk: string; status: 'attached'; filename: string; shim: AttachRecord['shim']; record: AttachRecord }
  /** The disk is not one vmshift can sit under (nothing was changed). */
  | { disk: string; status: 'refused'; reason: string }
  /** Attaching went wrong midway; `reason` says what, and whether the undo completed. */
  | { disk: string; status: 'failed'; reason: string };

export class AttachError extends Error {
  override name = 'AttachError';
}

type NodeList = Awaited<ReturnType<typeof queryNamedNodes>>;
interface ImageInfo { image?: { 'virtual-size'?: number }; backing_file_depth?: number }

/**
 * How the operator calls the disk: its device id, else its drive id, else its node name.
 * QEMU reports `qdev` as a QOM path for virtio-blk (the id is on its PCI proxy) but as the
 * bare id for devices that own their drive (scsi-hd: `scsi0`).
 */
export function diskLabel(d: DiskPicture): string {
  const bareId = d.qdev && !d.qdev.startsWith('/') ? d.qdev : undefined;
  return d.deviceId ?? bareId ?? (d.device || d.formatNode);
}

/** Why vmshift cannot sit under this disk, or null when it can. */
export function refusal(d: DiskPicture, nodes: NodeList): string | null {
  if (d.fileDriver === 'nbd') return `it is already on an NBD node (${d.fileNode}): attached already, or not a local image`;
  if (d.formatDriver !== 'raw' && d.formatDriver !== 'qcow2') return `its top node ${d.formatNode} is ${d.formatDriver}; vmshift attaches under raw and qcow2 format nodes only`;
  if (!d.fileNode) return `its format node ${d.formatNode} has no file child`;
  if (d.fileDriver !== 'file' && d.fileDriver !== 'host_device') return `its image is reached through a ${d.fileDriver} node, not a local file or block device`;
  if (d.readOnly) return 'it is read-only';
  if (d.autoNamed) return `QEMU named its nodes itself (${d.formatNode}, ${d.fileNode}) and blockdev-reopen cannot change such nodes; give the disk with -blockdev, or -drive ...,node-name=N,file.node-name=F`;
  if (!isAbsolute(d.filename)) return `its image path "${d.filename}" is not absolute`;
  if (d.formatDriver === 'qcow2') {
    const fmt = nodes.find((n) => n['node-name'] === d.formatNode) as ImageInfo | undefined;
    const file = nodes.find((n) => n['node-name'] === d.fileNode) as ImageInfo | undefined;
    if ((fmt?.backing_file_depth ?? 0) > 0) return 'it is a qcow2 image with a backing file; vmshift would only see the top image';
    const virtual = fmt?.image?.['virtual-size'] ?? 0;
    const length = file?.image?.['virtual-size'] ?? 0;
    // The shim exports a fixed size; qcow2 cannot grow its file through it (EINVAL on the
    // first allocating write). A preallocated image is already as long as it will get.
    if (length < virtual) return `its qcow2 file (${length} bytes) is shorter than the disk (${virtual} bytes) and cannot grow through the shim; use an image created with preallocation=metadata (or falloc/full)`;
  }
  return null;
}

export async function attachGuest(target: GuestTarget, opts: AttachOptions): Promise<AttachOutcome[]> {
  const qmp = target.qmp;
  let disks: DiskPicture[];
  if (opts.disk) {
    try {
      disks = [await findDisk(qmp, target.diskRef(opts.disk))];
    } catch (e) {
      if (e instanceof BlockGraphError) throw new AttachError(`${target.label}: ${e.message}`);
      throw e;
    }
  } else {
    disks = await queryDisks(qmp);
  }
  const out: AttachOutcome[] = [];
  for (const d of disks) {
    const label = diskLabel(d);
    const why = refusal(d, await queryNamedNodes(qmp));
    if (why) {
      out.push({ disk: label, status: 'refused', reason: `cannot attach disk ${label} of ${target.label}: ${why}` });
      continue;
    }
    try {
      const record = await attachDisk(target, d, opts);
      out.push({ disk: label, status: 'attached', filename: d.filename, shim: record.shim, record });
    } catch (e) {
      out.push({ disk: label, status: 'failed', reason: (e as Error).message });
    }
  }
  return out;
}

/** Steps 2-5 for one disk that passed `refusal`. */
async function attachDisk(target: GuestTarget, d: DiskPicture, opts: AttachOptions): Promise<AttachRecord> {
  const qmp = target.qmp;
  const label = diskLabel(d);
  const fileNode = d.fileNode!;
  const info = (await queryNamedNodes(qmp)).find((n) => n['node-name'] === fileNode);
  const shimName = safeName(`${target.label}-${label}`, 60);
  const nbdNode = `vmshift-nbd-${randomBytes(4).toString('hex')}`;
  const undo: Array<{ what: string; fn: () => Promise<void> }> = [];
  const step = async <T>(what: string, fn: () => Promise<T>): Promise<T> => {
    try {
      return await fn();
    } catch (e) {
      throw new AttachError(`attach disk ${label} of ${target.label}: ${what} failed: ${(e as Error).message}`);
    }
  };
  try {
    const shim = await step(`starting a shim on ${d.filename}`, () => opts.shims.start(shimName, d.filename));
    undo.push({ what: `stop shim ${shimName}`, fn: () => opts.shims.stop(shimName) });
    // The shim must serve exactly what QEMU has open: never a copy a stale state file names.
    const serving = await step(`asking shim ${shimName} what it serves`, () => opts.shims.backing(shimName));
    if (serving !== d.filename) throw new AttachError(`attach disk ${label} of ${target.label}: shim ${shimName} serves ${serving}, not ${d.filename} which QEMU has open`);
    const record: AttachRecord = {
      version: 1,
      guest: target.label,
      monitor: target.monitor,
      disk: label,
      formatNode: d.formatNode,
      formatDriver: d.formatDriver,
      nbdNode,
      originalFile: {
        node: fileNode,
        driver: d.fileDriver as 'file' | 'host_device',
        filename: d.filename,
        cache: info?.cache ? { direct: info.cache.direct, 'no-flush': info.cache['no-flush'] } : undefined,
        ...target.fileHints(d),
      },
      shim: { name: shimName, socket: shim.socket, exportName: shim.exportName },
      starter: opts.starterKind ?? 'direct',
      state: 'attaching',
      at: new Date().toISOString(),
    };
    await step('writing the attach record', () => opts.records.save(record));
    undo.push({ what: 'remove the attach record', fn: async () => opts.records.remove(shimName) });
    await step(`blockdev-add of nbd node ${nbdNode} on ${shim.socket}`, () => addNbdNode(qmp, shim.socket, shim.exportName, nbdNode, opts.reconnectDelayS));
    undo.push({ what: `blockdev-del ${nbdNode}`, fn: () => deleteNode(qmp, nbdNode) });
    await step(`blockdev-reopen of ${d.formatNode} onto ${nbdNode}`, () => reopenFile(qmp, d.formatNode, nbdNode));
    undo.push({ what: `blockdev-reopen of ${d.formatNode} back onto ${fileNode}`, fn: () => reopenFile(qmp, d.formatNode, fileNode) });
    // A -drive's file node went away with its last reference; a -blockdev one is the
    // monitor's and keeps an fd on the image until deleted.
    if ((await queryNamedNodes(qmp)).some((n) => n['node-name'] === fileNode)) {
      await step(`blockdev-del of the old file node ${fileNode}`, () => deleteNode(qmp, fileNode));
    }
    record.state = 'attached';
    await step('writing the attach record', () => opts.records.save(record));
    return record;
  } catch (e) {
    for (const u of undo.reverse()) {
      try {
        await u.fn();
      } catch (ue) {
        throw new AttachError(`${(e as Error).message}; undo stopped at "${u.what}": ${(ue as Error).message}. The disk may still go through shim ${shimName}: it was left running; run vmshift detach`);
      }
    }
    throw new AttachError(`${(e as Error).message} (undone: the disk is on ${d.filename} as before)`);
  }
}
