// One writer per disk, whoever starts it: a shim serving a file or block device holds
// vmshift's OFD lock on it (native/vmshift_native.c: lockDisk, one byte QEMU never locks),
// exclusive when it serves read-write, shared when read-only. A second `vmshift serve` of the
// same disk, under whatever spelling of its path, is refused while the first one runs; the lock
// goes with the open file, so a shim that dies (even SIGKILL) releases it.
import { constants } from 'node:fs';
import { open, type FileHandle } from 'node:fs/promises';
import { loadAddon } from '../block/file.ts';

interface LockOps {
  lockDisk(fd: number, exclusive: number): boolean;
}

export class DiskBusyError extends Error {
  override name = 'DiskBusyError';
}

function lockOps(): LockOps | null {
  const mod = loadAddon();
  return typeof mod?.lockDisk === 'function' ? (mod as unknown as LockOps) : null;
}

export interface DiskLock {
  /** False when the addon is missing: then nothing keeps a second writer off (said once on stderr). */
  readonly held: boolean;
  release(): Promise<void>;
}

/** Lock the file or block device at `path` (give the realpath) for one writer, or refuse. */
export async function lockDisk(path: string, readOnly: boolean): Promise<DiskLock> {
  const native = lockOps();
  if (!native) {
    process.stderr.write(`vmshift: warning: native addon missing (run scripts/build-native.sh): ${path} is served without the lock that keeps a second writer off it\n`);
    return { held: false, release: async () => {} };
  }
  // Its own open file: the lock belongs to this description, not to the device's fds.
  const fh: FileHandle = await open(path, (readOnly ? constants.O_RDONLY : constants.O_RDWR) | constants.O_NONBLOCK);
  let taken: boolean;
  try {
    taken = native.lockDisk(fh.fd, readOnly ? 0 : 1);
  } catch (e) {
    await fh.close();
    throw e;
  }
  if (!taken) {
    await fh.close();
    throw new DiskBusyError(`${path} is already served by another vmshift shim${readOnly ? ' read-write' : ''}: two writers on one disk would corrupt it (stop that shim first)`);
  }
  let open_ = true;
  return {
    held: true,
    async release() {
      if (!open_) return;
      open_ = false;
      await fh.close();
    },
  };
}
