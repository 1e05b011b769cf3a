// Durable small-file replacement: write a temp file, fsync it, rename over the target, fsync
// the directory. After a crash the file holds either the old or the new content, never a mix:
// this is how a switch-over records its new backing before it swaps devices.
// The temp file is private from its creation (O_CREAT|O_EXCL|O_NOFOLLOW, mode 0600, an
// unguessable name): nothing planted beside the target can be written through, and what is
// read back is read only from files root may trust (src/util/trusted-fs.ts).
import { constants } from 'node:fs';
import { open, rename, unlink } from 'node:fs/promises';
import { randomBytes } from 'node:crypto';
import { dirname, basename, join } from 'node:path';
import { readTrustedFile } from './trusted-fs.ts';

const CREATE_PRIVATE = constants.O_WRONLY | constants.O_CREAT | constants.O_EXCL | constants.O_NOFOLLOW;

export async function writeFileAtomic(path: string, data: string | Buffer, mode = 0o600): Promise<void> {
  await (await prepareFileAtomic(path, data, mode)).commit();
}

/** A replacement written and synced beside its target, not yet in place. */
export interface PreparedFile {
  /** Rename it over the target and sync the directory: from here the new content is durable. */
  commit(): Promise<void>;
  /** Remove it, leaving the target as it was. */
  discard(): Promise<void>;
}

/**
 * The first half of writeFileAtomic: write and fsync the temp file now, rename later. A
 * switch-over prepares its new state before it holds guest I/O, so that only the rename and
 * the directory sync (one journal commit, not two) fall inside the stall.
 */
export async function prepareFileAtomic(path: string, data: string | Buffer, mode = 0o600): Promise<PreparedFile> {
  const tmp = join(dirname(path), `.${basename(path)}.${randomBytes(8).toString('hex')}.tmp`);
  const fh = await open(tmp, CREATE_PRIVATE, mode);
  try {
    await fh.writeFile(data);
    await fh.sync();
  } catch (e) {
    await fh.close();
    await unlink(tmp).catch(() => {});
    throw e;
  }
  await fh.close();
  let done = false;
  return {
    async commit() {
      if (done) throw new Error(`${path}: prepared replacement already used`);
      done = true;
      try {
        await rename(tmp, path);
      } catch (e) {
        await unlink(tmp).catch(() => {});
        throw e;
      }
      const dir = await open(dirname(path), constants.O_RDONLY | constants.O_DIRECTORY);
      try {
        await dir.sync();
      } finally {
        await dir.close();
      }
    },
    async discard() {
      if (done) return;
      done = true;
      await unlink(tmp).catch(() => {});
    },
  };
}

/** Read and parse a JSON file we may trust (owner, mode, no symlink); undefined when it does not exist. */
export async function readJsonIfExists<T>(path: string): Promise<T | undefined> {
  try {
    const data = await readTrustedFile(path);
    return data === undefined ? undefined : (JSON.parse(data.toString('utf8')) as T);
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === 'ENOENT') return undefined;
    throw new Error(`${path}: cannot read state: ${(e as Error).message}`);
  }
}
