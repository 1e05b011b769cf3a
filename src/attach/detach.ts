// Take a shim out from under a disk, onto the file the shim backs NOW (a storage migration
// may have moved it), then stop the shim:
//
//   1. ask the shim where the disk lives; blockdev-add a file node there, with the options
//      the original file node had (same node name when it is free: libvirt refers to it)
//   2. blockdev-reopen the format node with file = that node (QEMU drains the node first)
//   3. blockdev-del the nbd node, stop the shim (it flushes), drop the attach record
//
// The live graph decides, not the record alone: when the format node no longer sits on our
// nbd node (QEMU restarted, or an attach was cut short) there is nothing to switch and the
// leftover shim is only stopped.
import { randomBytes } from 'node:crypto';
import { isAbsolute } from 'node:path';
import { deleteNode, queryDisks, queryNamedNodes, reopenFile } from '../qemu/block-graph.ts';
import type { GuestTarget } from './guest-target.ts';
import type { AttachRecord, AttachRecords, MonitorRef } from './records.ts';
import type { ShimStarter } from './shim-starter.ts';

export interface DetachOptions {
  shims: ShimStarter;
  records: AttachRecords;
  /** Only this disk (as attach named it, or its node name); default every attached disk. */
  disk?: string;
}

export type DetachOutcome =
  | { disk: string; status: 'detached'; filename: string; warnings: string[] }
  /** The guest was not on the shim any more: the shim was stopped, nothing else changed. */
  | { disk: string; status: 'stale'; reason: string }
  /** The disk stays on its shim; `reason` says why. */
  | { disk: string; status: 'failed'; reason: string };

export class DetachError extends Error {
  override name = 'DetachError';
}

async function recordsFor(monitor: MonitorRef, label: string, opts: DetachOptions, diskRef?: string): Promise<AttachRecord[]> {
  const all = await opts.records.forMonitor(monitor);
  if (!opts.disk) return all;
  const mine = all.filter((r) => r.disk === opts.disk || r.formatNode === opts.disk || r.disk === diskRef);
  if (mine.length === 0) {
    throw new DetachError(`disk ${opts.disk} of ${label} is not attached to vmshift (attached: ${all.map((r) => r.disk).join(', ') || 'none'})`);
  }
  return mine;
}

export async function detachGuest(target: GuestTarget, opts: DetachOptions): Promise<DetachOutcome[]> {
  const diskRef = opts.disk ? safeRef(target, opts.disk) : undefined;
  const out: DetachOutcome[] = [];
  for (const rec of await recordsFor(target.monitor, target.label, opts, diskRef)) {
    try {
      out.push(await detachDisk(target, rec, opts));
    } catch (e) {
      out.push({ disk: rec.disk, status: 'failed', reason: (e as Error).message });
    }
  }
  return out;
}

/**
 * The guest's QEMU is gone (e.g. Proxmox post-stop after the guest powered off): stop its
 * shims and drop their records. QEMU flushed its disks when it exited.
 */
export async function cleanupStoppedGuest(monitor: MonitorRef, label: string, opts: DetachOptions): Promise<DetachOutcome[]> {
  const out: DetachOutcome[] = [];
  for (const rec of await recordsFor(monitor, label, opts)) {
    await opts.shims.stop(rec.shim.name);
    opts.records.remove(rec.shim.name);
    out.push({ disk: rec.disk, status: 'stale', reason: `guest ${label} is stopped: shim ${rec.shim.name} stopped` });
  }
  return out;
}

function safeRef(target: GuestTarget, ref: string): string | undefined {
  try {
    return target.diskRef(ref);
  } catch {
    return undefined;
  }
}

async function detachDisk(target: GuestTarget, rec: AttachRecord, opts: DetachOptions): Promise<DetachOutcome> {
  const qmp = target.qmp;
  const what = `detach disk ${rec.disk} of ${target.label}`;
  const disk = (await queryDisks(qmp)).find((d) => d.formatNode === rec.formatNode);
  const nodes = (await queryNamedNodes(qmp)).map((n) => n['node-name']);
  if (!disk || disk.fileNode !== rec.nbdNode) {
    // Not on our node: an nbd node left by a cut-short attach is unused and can go.
    if (nodes.includes(rec.nbdNode)) await deleteNode(qmp, rec.nbdNode).catch(() => {});
    await opts.shims.stop(rec.shim.name);
    opts.records.remove(rec.shim.name);
    const now = disk ? `its file child is ${disk.fileNode ?? 'none'}` : `QEMU has no node ${rec.formatNode}`;
    return { disk: rec.disk, status: 'stale', reason: `${what}: the disk was not on the shim (${now}); shim ${rec.shim.name} stopped` };
  }

  let backing: string;
  try {
    backing = await opts.shims.backing(rec.shim.name);
  } catch (e) {
    throw new DetachError(`${what}: cannot ask shim ${rec.shim.name} where the disk lives: ${(e as Error).message}; the disk stays on the shim`);
  }
  if (!isAbsolute(backing)) {
    throw new DetachError(`${what}: the shim now serves ${backing}, not a local file; QEMU cannot be put back onto it, the disk stays on the shim`);
  }

  const o = rec.originalFile;
  const node = !o.node.startsWith('#') && !nodes.includes(o.node) ? o.node : `vmshift-file-${randomBytes(4).toString('hex')}`;
  const args: Record<string, unknown> = { driver: o.driver, 'node-name': node, filename: backing };
  if (o.cache) args.cache = o.cache;
  if (o.aio) args.aio = o.aio;
  if (o.locking) args.locking = o.locking;
  try {
    await qmp.execute('blockdev-add', args);
  } catch (e) {
    throw new DetachError(`${what}: blockdev-add of file node ${node} on ${backing} failed: ${(e as Error).message}; the disk stays on the shim`);
  }
  try {
    await reopenFile(qmp, rec.formatNode, node);
  } catch (e) {
    await deleteNode(qmp, node).catch(() => {});
    throw new DetachError(`${what}: blockdev-reopen of ${rec.formatNode} onto ${backing} failed: ${(e as Error).message}; the disk stays on the shim`);
  }
  const warnings: string[] = [];
  try {
    await deleteNode(qmp, rec.nbdNode);
  } catch (e) {
    warnings.push(`blockdev-del of ${rec.nbdNode} failed (the node is unused): ${(e as Error).message}`);
  }
  await opts.shims.stop(rec.shim.name);
  opts.records.remove(rec.shim.name);
  return { disk: rec.disk, status: 'detached', filename: backing, warnings };
}
