// Naming a running guest: a libvirt domain (its monitor through `virsh qemu-monitor-command`,
// its disks by target dev: `vda`) or a QMP socket (`--qmp PATH`, e.g. Proxmox's
// /var/run/qemu-server/VMID.qmp; disks by device id, drive id or node name).
import { createHash } from 'node:crypto';
import { resolve } from 'node:path';
import { create } from 'xmlbuilder2';
import { QmpClient } from '../qemu/qmp.ts';
import { VirshMonitor } from '../qemu/virsh-monitor.ts';
import type { QmpTransport } from '../qemu/transport.ts';
import type { DiskPicture } from '../qemu/block-graph.ts';
import { Virsh } from '../libvirt/virsh.ts';
import type { MonitorRef } from './records.ts';
import { safeName } from './shim-starter.ts';

export interface GuestTarget {
  /** Short name used in shim names and messages. */
  label: string;
  monitor: MonitorRef;
  qmp: QmpTransport;
  /** Map the operator's disk name to one findDisk knows (libvirt: target dev -> device alias). */
  diskRef(ref: string): string;
  /** File-node options QMP does not report but the target knows (libvirt: <driver io=...>). */
  fileHints(disk: DiskPicture): { aio?: string };
  close(): Promise<void>;
}

export interface GuestSpec {
  /** libvirt domain name; with `qmp` only a label. */
  guest?: string;
  /** Path of the guest's QMP socket. */
  qmp?: string;
  /** Time for connecting to a QMP socket (QEMU serves one client at a time). */
  connectTimeoutMs?: number;
}

export class GuestTargetError extends Error {
  override name = 'GuestTargetError';
}

export async function openGuest(spec: GuestSpec): Promise<GuestTarget> {
  if (spec.qmp) {
    const path = resolve(spec.qmp);
    const qmp = await QmpClient.connect(path, { connectTimeoutMs: spec.connectTimeoutMs ?? 10_000, timeoutMs: 60_000 });
    const label = spec.guest ? safeName(spec.guest, 32) : `qmp-${createHash('sha256').update(path).digest('hex').slice(0, 8)}`;
    return {
      label,
      monitor: { kind: 'qmp', path },
      qmp,
      diskRef: (ref) => ref,
      fileHints: () => ({}),
      close: () => qmp.close(),
    };
  }
  if (!spec.guest) throw new GuestTargetError('name a guest: a libvirt domain, or --qmp PATH');
  const virsh = new Virsh();
  const disks = libvirtDisks(await virsh.dumpxml(spec.guest));
  const byAlias = (disk: DiskPicture) => disks.find((d) => d.alias !== undefined && d.alias === disk.deviceId);
  return {
    label: safeName(spec.guest, 32),
    monitor: { kind: 'libvirt', domain: spec.guest, uri: virsh.uri },
    qmp: new VirshMonitor(spec.guest, virsh),
    diskRef: (ref) => {
      const d = disks.find((x) => x.target === ref);
      if (!d) return ref; // maybe already a device id or node name
      if (!d.alias) throw new GuestTargetError(`${spec.guest}: disk ${ref} has no <alias> in the live domain XML (is the domain running?)`);
      return d.alias;
    },
    fileHints: (disk) => {
      const io = byAlias(disk)?.io;
      return io ? { aio: io } : {};
    },
    close: async () => {},
  };
}

export interface LibvirtDiskAlias {
  target: string;
  alias?: string;
  /** <driver io=...>: native, threads or io_uring (QEMU's aio= of the file node). */
  io?: string;
}

/** Each <disk>'s target dev, device alias and io mode from a live domain XML. */
export function libvirtDisks(xml: string): LibvirtDiskAlias[] {
  let doc: Document;
  try {
    doc = create(xml).node as unknown as Document;
  } catch (e) {
    throw new GuestTargetError(`domain XML does not parse: ${(e as Error).message}`);
  }
  const out: LibvirtDiskAlias[] = [];
  const disks = doc.getElementsByTagName('disk');
  for (let i = 0; i < disks.length; i++) {
    const disk = disks.item(i)!;
    if (disk.parentNode?.nodeName !== 'devices') continue;
    const child = (name: string) => Array.from(disk.childNodes).find((n): n is Element => n.nodeType === 1 && n.nodeName === name);
    const target = child('target')?.getAttribute('dev');
    if (!target) continue;
    out.push({
      target,
      alias: child('alias')?.getAttribute('name') ?? undefined,
      io: child('driver')?.getAttribute('io') ?? undefined,
    });
  }
  return out;
}
