// Files and directories that root may trust: vmshift runs as root and keeps its state, journals,
// logs and sockets in directories it reads back later. A file or directory someone else could
// have made, replaced or swapped for a symlink must never steer it (which disk to serve, which
// file to delete, what to chown). The rules, as OpenSSH's StrictModes has them:
//   - owned by root or by us (the effective uid), never by another user;
//   - not writable by group or others (a directory may be, when sticky, like /tmp: then only
//     its entries' owners may replace them, and those entries are checked themselves);
//   - never reached through a symlink where we create, read or change things (O_NOFOLLOW).
// Every ancestor of such a directory is held to the same rules: a writable parent could swap it.
import { constants, type Stats } from 'node:fs';
import { lstat, mkdir, open, type FileHandle } from 'node:fs/promises';
import { dirname, resolve } from 'node:path';

export class UntrustedPathError extends Error {
  override name = 'UntrustedPathError';
}

const myUid = () => process.geteuid?.() ?? 0;

/** Why `st` (of `path`) is not ours to trust, or null when it is. */
function distrust(path: string, st: Stats, what: string): string | null {
  if (st.isSymbolicLink()) return `${path} is a symlink: ${what} must not be reached through one`;
  if (st.uid !== 0 && st.uid !== myUid()) return `${path} is owned by uid ${st.uid}, not root${myUid() ? ` or uid ${myUid()}` : ''}: someone else could change ${what}`;
  const sticky = st.isDirectory() && (st.mode & 0o1000) !== 0;
  if ((st.mode & 0o022) !== 0 && !sticky) return `${path} is writable by ${st.mode & 0o002 ? 'everyone' : 'its group'} (mode ${(st.mode & 0o7777).toString(8).padStart(4, '0')}): someone else could change ${what}`;
  return null;
}

/** Throw unless every directory from `dir` up to / is one we may trust (see the top). */
export async function checkTrustedDir(dir: string, what = 'its contents'): Promise<void> {
  let p = resolve(dir);
  for (;;) {
    const st = await lstat(p);
    if (!st.isDirectory() && !st.isSymbolicLink()) throw new UntrustedPathError(`${p} is not a directory`);
    const why = distrust(p, st, what);
    if (why) throw new UntrustedPathError(why);
    if (p === '/') return;
    p = dirname(p);
  }
}

export interface DirSpec {
  mode: number;
  /** Group to give the directory (QEMU's, for socket dirs); its owner stays us. */
  gid?: number;
}

/**
 * Create `dir` (and missing parents, 0755 like mkdir -p) or take the existing one, refusing
 * one that is not ours (owner, symlink, ancestors writable by others), then set its mode and
 * group through a handle opened with O_NOFOLLOW: a symlink planted at `dir` is never
 * followed to chown or chmod what it points at.
 */
export async function ensureDir(dir: string, spec: DirSpec, what = 'the files vmshift keeps there'): Promise<void> {
  const path = resolve(dir);
  await checkTrustedDir(dirname(path), what).catch(async (e) => {
    if ((e as NodeJS.ErrnoException).code !== 'ENOENT') throw e;
    await ensureDir(dirname(path), { mode: 0o755 }, what);
  });
  await mkdir(path, { mode: spec.mode & 0o777 }).catch((e: NodeJS.ErrnoException) => {
    if (e.code !== 'EEXIST') throw e;
  });
  let fh: FileHandle;
  try {
    fh = await open(path, constants.O_RDONLY | constants.O_DIRECTORY | constants.O_NOFOLLOW);
  } catch (e) {
    const code = (e as NodeJS.ErrnoException).code;
    if (code === 'ELOOP' || code === 'ENOTDIR') {
      // O_DIRECTORY|O_NOFOLLOW on a symlink fails with either, depending on the kernel.
      const link = (await lstat(path).catch(() => undefined))?.isSymbolicLink();
      throw new UntrustedPathError(`${path} is ${link ? 'a symlink' : 'not a directory'}: refusing to use it for ${what}`);
    }
    throw e;
  }
  try {
    const st = await fh.stat();
    if (st.uid !== 0 && st.uid !== myUid()) throw new UntrustedPathError(`${path} is owned by uid ${st.uid}, not root: refusing to use it for ${what} (remove it or give it to root)`);
    if (spec.gid !== undefined && st.gid !== spec.gid) await fh.chown(st.uid, spec.gid);
    if ((st.mode & 0o7777) !== spec.mode) await fh.chmod(spec.mode);
  } finally {
    await fh.close();
  }
}

/**
 * Read a file only if it, and the directory it is in, are ours (see the top); undefined when
 * it does not exist. For the state, journals and registries that tell root what to serve,
 * where, and what to delete.
 */
export async function readTrustedFile(path: string): Promise<Buffer | undefined> {
  let fh: FileHandle;
  try {
    fh = await open(path, constants.O_RDONLY | constants.O_NOFOLLOW | constants.O_NONBLOCK);
  } catch (e) {
    const code = (e as NodeJS.ErrnoException).code;
    if (code === 'ENOENT') return undefined;
    if (code === 'ELOOP') throw new UntrustedPathError(`${path} is a symlink: state files are never read through one`);
    throw e;
  }
  try {
    const st = await fh.stat();
    if (!st.isFile()) throw new UntrustedPathError(`${path} is not a regular file`);
    const why = distrust(path, st, 'what vmshift reads from it');
    if (why) throw new UntrustedPathError(why);
    await checkTrustedDir(dirname(resolve(path)), `${path}`);
    return await fh.readFile();
  } finally {
    await fh.close();
  }
}
