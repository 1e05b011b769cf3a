// Give a running guest's NBD node a reconnect delay that its start did not (libvirt 9.0 has
// no XML for it, see docs/libvirt.md). QEMU 7.2 cannot change `reconnect-delay` on an open
// nbd node: blockdev-reopen refuses every option the driver does not handle ("Cannot change
// the option 'reconnect-delay'", block.c bdrv_reopen_prepare; block/nbd.c only checks
// read-only). So the node is replaced under the disk's format node, twice, to end up with
// libvirt's own node name:
//
//     format --file--> NAME (nbd, no delay)                  as libvirt started it
//     format --file--> vmshift-rd-X (nbd, delay)             blockdev-add + blockdev-reopen
//     format --file--> NAME (nbd, delay)                     blockdev-del NAME, add it again, reopen
//
// libvirt keeps addressing NAME (blockdev-del on unplug, stats by node name) and its format
// node, device and XML never change. Each reopen drains the format node first: the guest sees
// two short stalls, never an error. Every step is undone (newest first) when a later one fails.
import { randomBytes } from 'node:crypto';
import { BlockGraphError, deleteNode, queryDisks, queryNamedNodes, reopenFile, type DiskPicture } from './block-graph.ts';
import type { QmpTransport } from './transport.ts';

export interface LiveReconnectResult {
  /** The format node whose `file` child was replaced. */
  formatNode: string;
  /** The nbd node's name, the same before and after. */
  node: string;
  delayS: number;
  ms: number;
}

/** The disk whose protocol node is the NBD client of this unix socket (and export). */
export function findNbdDisk(disks: DiskPicture[], socket: string, exportName: string): DiskPicture | undefined {
  // QEMU names an nbd node by its URI: nbd+unix:///EXPORT?socket=PATH.
  return disks.find((d) => d.fileDriver === 'nbd' && d.filename === `nbd+unix:///${exportName}?socket=${socket}`);
}

/** The options libvirt gives an NBD storage node, with the delay added. */
function nbdNodeOptions(nodeName: string, socket: string, exportName: string, delayS: number, like: { ro: boolean; cache?: { direct: boolean; 'no-flush': boolean } }): Record<string, unknown> {
  return {
    driver: 'nbd',
    'node-name': nodeName,
    server: { type: 'unix', path: socket },
    export: exportName,
    'reconnect-delay': delayS,
    'read-only': like.ro,
    // The format node decides whether a guest's discard goes on; the protocol node must pass it.
    discard: 'unmap',
    ...(like.cache ? { cache: { direct: like.cache.direct, 'no-flush': like.cache['no-flush'] } } : {}),
  };
}

export async function giveReconnectDelay(qmp: QmpTransport, socket: string, exportName: string, delayS: number): Promise<LiveReconnectResult> {
  const t0 = Date.now();
  const disk = findNbdDisk(await queryDisks(qmp), socket, exportName);
  if (!disk || !disk.fileNode) throw new BlockGraphError(`no disk of the guest reads export '${exportName}' on ${socket} through a format node`);
  if (disk.autoNamed) throw new BlockGraphError(`the nodes of the disk on ${socket} were named by QEMU (${disk.formatNode}, ${disk.fileNode}); blockdev-reopen cannot address them`);
  const name = disk.fileNode;
  const old = (await queryNamedNodes(qmp)).find((n) => n['node-name'] === name);
  if (!old) throw new BlockGraphError(`node ${name} vanished`);
  const tmp = `vmshift-rd-${randomBytes(4).toString('hex')}`;
  const undo: Array<() => Promise<unknown>> = [];
  const step = async (run: () => Promise<unknown>, back?: () => Promise<unknown>) => {
    await run();
    if (back) undo.push(back);
  };
  try {
    await step(() => qmp.execute('blockdev-add', nbdNodeOptions(tmp, socket, exportName, delayS, old)), () => deleteNode(qmp, tmp));
    await step(() => reopenFile(qmp, disk.formatNode, tmp), () => reopenFile(qmp, disk.formatNode, name));
    // The original node is gone from here on: undoing means giving the name back (without the delay).
    await step(() => deleteNode(qmp, name), () => qmp.execute('blockdev-add', nbdNodeOptions(name, socket, exportName, 0, old)));
    await step(() => qmp.execute('blockdev-add', nbdNodeOptions(name, socket, exportName, delayS, old)), () => deleteNode(qmp, name));
    await step(() => reopenFile(qmp, disk.formatNode, name));
  } catch (e) {
    for (const back of undo.reverse()) {
      try {
        await back();
      } catch (u) {
        throw new BlockGraphError(`giving ${name} a reconnect delay failed (${(e as Error).message}) and so did undoing it (${(u as Error).message}): the disk reads through ${tmp} now`);
      }
    }
    throw e;
  }
  // Nothing reads through the temporary node any more; a failure here only leaves an idle node.
  await deleteNode(qmp, tmp).catch(() => {});
  return { formatNode: disk.formatNode, node: name, delayS, ms: Date.now() - t0 };
}
