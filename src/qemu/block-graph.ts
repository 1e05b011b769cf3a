// A small typed picture of a guest disk's QEMU block graph, and the QMP steps that put an NBD
// node under its format node and take it out again (live insertion of the vmshift shim):
//
//     device -> format node (raw/qcow2) --file--> protocol node (file)        before
//     device -> format node (raw/qcow2) --file--> nbd node -> shim -> file    after
//
// The guest keeps its device and format node; only the format node's `file` child changes,
// with `blockdev-reopen`, which drains the node's I/O itself before switching the child.
// docs/notes-live-insertion.md has the full sequence and what QEMU 7.2 refuses.
import { z } from 'zod';
import type { QmpTransport } from './transport.ts';
import { DEFAULT_RECONNECT_DELAY_S } from './nbd-reconnect.ts';

const NodeInfo = z.object({
  'node-name': z.string(),
  drv: z.string(),
  file: z.string(),
  ro: z.boolean(),
  detect_zeroes: z.string().optional(),
  cache: z.object({ direct: z.boolean(), 'no-flush': z.boolean() }).passthrough().optional(),
}).passthrough();
type NodeInfo = z.infer<typeof NodeInfo>;

const BlockInfo = z.object({
  device: z.string(),
  qdev: z.string().optional(),
  inserted: NodeInfo.optional(),
}).passthrough();

const Graph = z.object({
  nodes: z.array(z.object({ id: z.number(), name: z.string(), type: z.string() }).passthrough()),
  edges: z.array(z.object({ parent: z.number(), child: z.number(), name: z.string() }).passthrough()),
});

/** One guest disk as the block layer sees it. */
export interface DiskPicture {
  /** BlockBackend name: the `-drive id=`; '' for a disk given with -blockdev. */
  device: string;
  /** Full qdev path, e.g. /machine/peripheral/vd0/virtio-backend. */
  qdev?: string;
  /** The device's id (`-device ...,id=vd0`), taken from the qdev path. */
  deviceId?: string;
  definedAs: 'drive' | 'blockdev';
  formatNode: string;
  formatDriver: string;
  /** The protocol node under the format node (its `file` child), if there is one. */
  fileNode?: string;
  fileDriver?: string;
  filename: string;
  readOnly: boolean;
  /** QEMU made the node names up (`#block123`): blockdev-reopen cannot address such a node. */
  autoNamed: boolean;
}

export class BlockGraphError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'BlockGraphError';
  }
}

export async function queryNamedNodes(qmp: QmpTransport): Promise<NodeInfo[]> {
  return z.array(NodeInfo).parse(await qmp.execute('query-named-block-nodes', { flat: true }));
}

/** Every disk with a medium, with its format and protocol nodes. */
export async function queryDisks(qmp: QmpTransport): Promise<DiskPicture[]> {
  const blocks = z.array(BlockInfo).parse(await qmp.execute('query-block'));
  const nodes = await queryNamedNodes(qmp);
  // x-debug-query-block-graph is the only QMP view of parent/child edges in QEMU 7.2.
  const graph = Graph.parse(await qmp.execute('x-debug-query-block-graph'));
  const nameOf = new Map(graph.nodes.map((n) => [n.id, n.name]));
  const idOf = new Map(graph.nodes.filter((n) => n.type === 'block-driver').map((n) => [n.name, n.id]));
  const disks: DiskPicture[] = [];
  for (const b of blocks) {
    if (!b.inserted) continue;
    const fmt = b.inserted;
    const fmtId = idOf.get(fmt['node-name']);
    const edge = graph.edges.find((e) => e.parent === fmtId && e.name === 'file');
    const fileNode = edge ? nameOf.get(edge.child) : undefined;
    const fileInfo = nodes.find((n) => n['node-name'] === fileNode);
    disks.push({
      device: b.device,
      qdev: b.qdev,
      deviceId: b.qdev?.match(/^\/machine\/peripheral\/([^/]+)/)?.[1],
      definedAs: b.device !== '' ? 'drive' : 'blockdev',
      formatNode: fmt['node-name'],
      formatDriver: fmt.drv,
      fileNode,
      fileDriver: fileInfo?.drv,
      filename: fileInfo?.file ?? fmt.file,
      readOnly: fmt.ro,
      autoNamed: fmt['node-name'].startsWith('#') || (fileNode?.startsWith('#') ?? false),
    });
  }
  return disks;
}

/** Find a disk by -drive id, -device id, qdev path or format node name. */
export async function findDisk(qmp: QmpTransport, ref: string): Promise<DiskPicture> {
  const disks = await queryDisks(qmp);
  const d = disks.find((x) => x.device === ref || x.deviceId === ref || x.qdev === ref || x.formatNode === ref);
  if (!d) {
    const known = disks.map((x) => x.deviceId ?? x.device ?? x.formatNode).join(', ') || 'none';
    throw new BlockGraphError(`no disk '${ref}' in the guest (disks: ${known})`);
  }
  return d;
}

/**
 * Add an NBD client node for `export` on a unix socket; not attached to anything yet. It
 * holds the guest's requests for `reconnectDelayS` seconds while the shim is away (restarted
 * by vmshiftd or `vmshift restart`): see src/qemu/nbd-reconnect.ts.
 */
export async function addNbdNode(qmp: QmpTransport, socket: string, exportName: string, nodeName: string, reconnectDelayS = DEFAULT_RECONNECT_DELAY_S): Promise<void> {
  await qmp.execute('blockdev-add', {
    driver: 'nbd',
    'node-name': nodeName,
    server: { type: 'unix', path: socket },
    export: exportName,
    'reconnect-delay': reconnectDelayS,
  });
}

/**
 * Add a file protocol node. `locking: false` when another process (qemu-nbd, another QEMU)
 * holds the file open with QEMU's byte-range locks; see the notes.
 */
export async function addFileNode(qmp: QmpTransport, filename: string, nodeName: string, opts: { locking?: boolean } = {}): Promise<void> {
  await qmp.execute('blockdev-add', {
    driver: 'file',
    'node-name': nodeName,
    filename,
    ...(opts.locking === false ? { locking: 'off' } : {}),
  });
}

/**
 * Point `formatNode`'s `file` child at `newFileNode`. blockdev-reopen resets every option it
 * is not given to its default, so the options QEMU reports for the node are passed back.
 */
export async function reopenFile(qmp: QmpTransport, formatNode: string, newFileNode: string): Promise<void> {
  if (formatNode.startsWith('#')) {
    throw new BlockGraphError(`cannot reopen ${formatNode}: QEMU named it itself and blockdev-reopen refuses such nodes ("Cannot change the option 'node-name'"); start the guest with -blockdev or -drive ...,node-name=`);
  }
  const node = (await queryNamedNodes(qmp)).find((n) => n['node-name'] === formatNode);
  if (!node) throw new BlockGraphError(`cannot reopen ${formatNode}: no such node`);
  const options: Record<string, unknown> = {
    driver: node.drv,
    'node-name': formatNode,
    file: newFileNode,
    'read-only': node.ro,
  };
  if (node.cache) options.cache = { direct: node.cache.direct, 'no-flush': node.cache['no-flush'] };
  if (node.detect_zeroes) options['detect-zeroes'] = node.detect_zeroes;
  await qmp.execute('blockdev-reopen', { options: [options] });
}

/** Delete a node nothing uses any more (the old file node, or the NBD node after switching back). */
export async function deleteNode(qmp: QmpTransport, nodeName: string): Promise<void> {
  await qmp.execute('blockdev-del', { 'node-name': nodeName });
}
