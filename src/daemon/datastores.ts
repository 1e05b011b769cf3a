// Which disks vmshiftd may serve: only files and block devices inside the datastores the
// operator allowed, and NBD exports only when the operator said so. A shim runs as root and
// hands its disk, read-write, to QEMU's user; what it serves comes from callers it cannot fully
// trust (a domain's XML, which for an incoming migration was written on another host; a state
// file on disk). So every path is resolved first (realpath: `..`, `//` and symlinks cannot walk
// out of a datastore) and then matched against the allowed prefixes, whole components only.
// The same resolution names a disk by device and inode, so that two spellings of one file
// (`img//d.raw`, `img/./d.raw`, a symlink) are recognised as one disk.
import { lstat, readlink, realpath, stat } from 'node:fs/promises';
import { basename, dirname, isAbsolute, join } from 'node:path';
import { isNbdUri } from '../block/open.ts';
import { checkTrustedDir } from '../util/trusted-fs.ts';

/**
 * Where libvirt, Proxmox VE and oVirt keep disk images by default: libvirt's `default` pool,
 * Proxmox's `local` dir storage and its network storages (NFS/CIFS/CephFS are mounted under
 * /mnt/pve/ID), and oVirt/VDSM's storage domains. Block devices (LVM, iSCSI) are not in it:
 * /dev holds the host's own disks too; add each volume group (/dev/VG) that holds guest disks.
 */
export const DEFAULT_DATASTORES: readonly string[] = ['/var/lib/libvirt/images', '/var/lib/vz/images', '/mnt/pve', '/rhev/data-center'];

export interface SourcePolicy {
  /** Absolute directory prefixes (resolved with realpath when checked). */
  datastores: readonly string[];
  /** May a shim's source be an NBD URI? (Off by default: it could name another guest's shim.) */
  allowNbd: boolean;
}

export const DEFAULT_POLICY: SourcePolicy = { datastores: DEFAULT_DATASTORES, allowNbd: false };

/** `code` is the API error code: `forbidden` outside the policy, `bad-request` when malformed or missing. */
export class SourceNotAllowedError extends Error {
  override name = 'SourceNotAllowedError';
  constructor(
    message: string,
    readonly code: 'forbidden' | 'bad-request' = 'forbidden',
  ) {
    super(message);
  }
}

export interface ResolvedSource {
  /** The realpath of a file or block device, or the NBD URI as given. */
  canonical: string;
  /** What makes two sources the same disk: `file:DEV:INO`, `blk:RDEV` or `nbd:URI`. */
  id: string;
}

const HOW = 'allow its datastore in /etc/vmshift/vmshiftd.json ("datastores") or with vmshiftd --datastore DIR';

async function allowedRoots(policy: SourcePolicy): Promise<string[]> {
  const roots: string[] = [];
  for (const d of policy.datastores) {
    const r = await realpath(d).catch(() => undefined);
    if (r) roots.push(r);
  }
  return roots;
}

function inside(path: string, root: string): boolean {
  return path === root || path.startsWith(root === '/' ? '/' : `${root}/`);
}

/**
 * The symlink hops from `path` to what it finally names, each with its directory resolved;
 * the last one is the realpath. /dev/vg0/lv -> ../dm-3 gives [/dev/vg0/lv, /dev/dm-3].
 */
async function hops(path: string): Promise<string[]> {
  const out: string[] = [];
  let p = path;
  for (let i = 0; i < 40; i++) {
    const dir = await realpath(dirname(p));
    const cur = join(dir, basename(p));
    out.push(cur);
    if (!(await lstat(cur)).isSymbolicLink()) return out;
    const target = await readlink(cur);
    p = isAbsolute(target) ? target : join(dir, target);
  }
  throw new SourceNotAllowedError(`${path}: too many levels of symlinks`, 'bad-request');
}

/**
 * A block device is named through symlinks (LVM's /dev/VG/LV, /dev/disk/by-id/..., oVirt's
 * /dev/SD/VOL) whose realpath, /dev/dm-N, lies in no datastore. It is allowed when one hop of
 * its chain lies in a datastore and every symlink from there on sits in a directory only root
 * can change (as udev's and LVM's do): nobody else could have pointed it elsewhere.
 */
async function blockDeviceAllowedVia(path: string, roots: string[]): Promise<boolean> {
  const chain = await hops(path);
  const trusted = await Promise.all(chain.map((h) => checkTrustedDir(dirname(h)).then(() => true, () => false)));
  // Walking back from the device: the links after hop i are all in root-only directories.
  for (let i = chain.length - 2, safe = true; i >= 0 && safe; i--) {
    safe = trusted[i]!;
    if (safe && roots.some((r) => inside(chain[i]!, r))) return true;
  }
  return false;
}

/** Throw unless the resolved `path` lies inside an allowed datastore. */
async function checkInside(path: string, shown: string, policy: SourcePolicy, role: string, blockDevice = false): Promise<void> {
  const roots = await allowedRoots(policy);
  if (roots.some((r) => inside(path, r))) return;
  if (blockDevice && (await blockDeviceAllowedVia(shown, roots))) return;
  const where = path === shown ? path : `${shown} (which is ${path})`;
  throw new SourceNotAllowedError(`${role} ${where} is outside the allowed datastores (${policy.datastores.join(', ') || 'none'}): ${HOW}`);
}

/** Resolve and check a shim's source (or a backing read from its state file). */
export async function resolveSource(source: string, policy: SourcePolicy, role = 'source'): Promise<ResolvedSource> {
  if (isNbdUri(source)) {
    if (!policy.allowNbd) throw new SourceNotAllowedError(`${role} ${source} is an NBD URI, and NBD sources are not allowed: set "allowNbdSources": true in /etc/vmshift/vmshiftd.json (or vmshiftd --allow-nbd-sources) if every caller may name any export this host can reach`);
    return { canonical: source, id: `nbd:${source}` };
  }
  if (!source.startsWith('/')) throw new SourceNotAllowedError(`${role} ${JSON.stringify(source)} is not an absolute path`, 'bad-request');
  let canonical: string;
  try {
    canonical = await realpath(source);
  } catch (e) {
    throw new SourceNotAllowedError(`${role} ${source}: ${(e as NodeJS.ErrnoException).code === 'ENOENT' ? 'no such file' : (e as Error).message}`, 'bad-request');
  }
  const st = await stat(canonical);
  await checkInside(canonical, source, policy, role, st.isBlockDevice());
  if (st.isBlockDevice()) return { canonical, id: `blk:${st.rdev}` };
  if (!st.isFile()) throw new SourceNotAllowedError(`${role} ${source} is neither a regular file nor a block device`, 'bad-request');
  return { canonical, id: `file:${st.dev}:${st.ino}` };
}

/** The disk id of a source that was already accepted, or undefined when it is gone. */
export async function diskId(source: string): Promise<string | undefined> {
  if (isNbdUri(source)) return `nbd:${source}`;
  const st = await stat(source).catch(() => undefined);
  if (!st) return undefined;
  return st.isBlockDevice() ? `blk:${st.rdev}` : `file:${st.dev}:${st.ino}`;
}

/**
 * A job's destination path (it may not exist yet): its directory resolved, then checked like a
 * source, since after the switch-over the shim serves it. NBD destinations pass: they are
 * written to, not served from this host's files.
 */
export async function checkDestination(to: string, policy: SourcePolicy): Promise<void> {
  if (isNbdUri(to)) return;
  const dir = await realpath(dirname(to)).catch(() => {
    throw new SourceNotAllowedError(`destination ${to}: its directory does not exist`, 'bad-request');
  });
  const existing = await realpath(to).catch(() => undefined);
  await checkInside(existing ?? join(dir, basename(to)), to, policy, 'destination');
}
