// How a guest's disks go with it when `vmshift migrate DOMAIN URI` moves it to another host.
// The migration (src/libvirt/migrate-domain.ts) calls a DiskHandover at fixed points:
//   prepare   before anything changes: check the destination can take every disk; throws
//             with a clear message (and leaves nothing behind) when it cannot
//   copy      bulk copy to the destination, before the memory phase
//   sync      from then on keep the destination in step with every guest write, until the
//             memory phase ends (the synchronized mirror)
//   commit    the guest runs on the destination: the destination's disks are the primary
//   rollback  the guest stays here: undo whatever prepare/copy/sync made on the destination
// Shared storage (this file) is the trivial case: both hosts reach the same file at the same
// path, so nothing is copied; prepare proves the sharing by writing a random token beside
// each disk here and reading it back on the peer. A vmshift-enabled domain's local disks
// (src/libvirt/local-disk-handover.ts) implement the same interface: shims on the peer backed
// by new files, a copy over the link, a synchronized mirror, the peer's shim becoming primary.
import { randomBytes } from 'node:crypto';
import { closeSync, constants as fsc, openSync, rmSync, writeSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { VMSHIFT_NS } from './domain-xml.ts';

export interface DomainDisk {
  /** file, block, network, volume (virsh domblklist --details). */
  type: string;
  device: string;
  target: string;
  /** '-' when there is none (an empty cdrom). */
  source: string;
}

/** What a handover may ask of the peer (answered by the link agent there). */
export interface PeerProbe {
  /** Read each file on the peer: its first bytes, or null where the peer sees none. */
  readFiles(paths: string[]): Promise<Array<string | null>>;
}

export interface DiskHandover {
  readonly kind: string;
  prepare(peer: PeerProbe): Promise<void>;
  copy(): Promise<void>;
  sync(): Promise<void>;
  /** Flags the handover needs on `virsh migrate` (shared storage proven here: `--unsafe`). */
  virshFlags(): string[];
  /**
   * The destination's disks are the guest's from now on, before it runs there (libvirt's
   * Finish succeeded): nothing may remove them, not even a link that fails next.
   */
  keep(): Promise<void>;
  commit(): Promise<void>;
  rollback(): Promise<void>;
}

export class HandoverError extends Error {
  override name = 'HandoverError';
}

/** `virsh domblklist DOMAIN --details` output to disks. */
export function parseDomblklist(text: string): DomainDisk[] {
  const disks: DomainDisk[] = [];
  for (const line of text.split('\n').slice(2)) {
    const m = /^\s*(\S+)\s+(\S+)\s+(\S+)\s+(.+?)\s*$/.exec(line);
    if (m) disks.push({ type: m[1], device: m[2], target: m[3], source: m[4] });
  }
  return disks;
}

/** The `cache` attribute of the `<driver>` of the disk with target `dev` in domain XML. */
export function diskCache(xml: string, dev: string): string | null {
  for (const m of xml.matchAll(/<disk\b[\s\S]*?<\/disk>/g)) {
    if (!new RegExp(`<target\\b[^>]*\\bdev=['"]${dev.replace(/[^A-Za-z0-9]/g, '')}['"]`).test(m[0])) continue;
    return /<driver\b[^>]*\bcache=['"]([a-z]+)['"]/.exec(m[0])?.[1] ?? null;
  }
  return null;
}

/**
 * Disks both hosts reach at the same path. libvirt calls a file disk "shared" only on a
 * filesystem it knows to be shared (NFS, GlusterFS, CephFS, ...) and otherwise refuses the
 * migration unless `--unsafe`; here the sharing is proven instead: a token file written
 * beside each disk is read back by the peer. Network disks (NBD, iSCSI, RBD) are shared to
 * libvirt already. A block device cannot be probed this way: refused in this version.
 */
export class SharedStorageHandover implements DiskHandover {
  readonly kind = 'shared-storage';
  private probed = false;

  /** `xml`: the domain's live XML (for each disk's cache mode). */
  constructor(private readonly domain: string, private readonly disks: DomainDisk[], private readonly xml: string, private readonly peerName: string) {}

  async prepare(peer: PeerProbe): Promise<void> {
    // A vmshift-enabled domain's disks are served by shims here, each holding its disk's
    // writer lock: the destination's `prepare` hook could not start a second shim on the
    // same shared file while the source still runs. Handing a disk over to the peer's shim
    // is the local-disk handover's job, not this one's.
    if (this.xml.includes(VMSHIFT_NS)) throw new HandoverError(`${this.domain} is enabled with vmshift (its disks are served by shims): it moves with the local-disk handover (src/libvirt/local-disk-handover.ts), not on shared storage`);
    const files = this.disks.filter((d) => d.source !== '-' && (d.type === 'file' || d.type === 'block'));
    const block = files.find((d) => d.type === 'block');
    if (block) throw new HandoverError(`${this.domain}: disk ${block.target} is the block device ${block.source}: this version moves guests whose disks are files on storage both hosts mount (or network disks)`);
    // What libvirt checks before it lets a shared disk migrate, since --unsafe skips it: a host
    // page cache in front of a shared file would let the destination read stale blocks.
    for (const d of files) {
      const cache = diskCache(this.xml, d.target);
      if (cache !== 'none' && cache !== 'directsync' && d.device !== 'cdrom') throw new HandoverError(`${this.domain}: disk ${d.target} uses cache='${cache ?? 'default'}': a disk shared between hosts must use cache='none' or 'directsync' (the host page cache would hide writes from the other host)`);
    }
    const dirs = [...new Set(files.map((d) => dirname(d.source)))];
    const probes = dirs.map((d) => ({ dir: d, path: join(d, `.vmshift-probe-${randomBytes(8).toString('hex')}`), token: `vmshift-probe ${randomBytes(16).toString('hex')}\n` }));
    const written: string[] = [];
    try {
      for (const p of probes) {
        let fd: number;
        try {
          fd = openSync(p.path, fsc.O_WRONLY | fsc.O_CREAT | fsc.O_EXCL | fsc.O_NOFOLLOW, 0o600);
        } catch (e) {
          throw new HandoverError(`cannot write a probe file in ${p.dir} (where ${this.domain}'s disk lives) to check that ${this.peerName} sees it: ${(e as Error).message}`);
        }
        written.push(p.path);
        try { writeSync(fd, p.token); } finally { closeSync(fd); }
      }
      const seen = probes.length ? await peer.readFiles(probes.map((p) => p.path)) : [];
      probes.forEach((p, i) => {
        if (seen[i] !== p.token) {
          const disk = files.find((d) => dirname(d.source) === p.dir)!;
          throw new HandoverError(`${this.peerName} does not see ${p.dir} (disk ${disk.target}: ${disk.source}) as this host does: the disks must be on storage both hosts mount at the same path (moving local disks is not in this version)`);
        }
      });
      this.probed = true;
    } finally {
      for (const f of written) rmSync(f, { force: true });
    }
  }

  async copy(): Promise<void> { /* both hosts reach the same file */ }
  async sync(): Promise<void> { /* every write lands in the one file */ }

  virshFlags(): string[] {
    return this.probed && this.disks.some((d) => d.type === 'file' && d.source !== '-') ? ['--unsafe'] : [];
  }

  async keep(): Promise<void> { /* the destination made nothing */ }
  async commit(): Promise<void> { /* the destination QEMU opened the same files */ }
  async rollback(): Promise<void> { /* nothing was made on the destination */ }
}
