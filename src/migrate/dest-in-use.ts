// Before a job writes over an existing file or block device at its destination: a file some
// process holds open (another guest's QEMU, a qemu-nbd, another shim) is never overwritten,
// and one that holds data is overwritten only when the caller said so (--overwrite). A
// missing file, or an existing one that is empty (nothing allocated, as truncate makes it, or
// at most EMPTY_ALLOCATED bytes of zeroes at its start, as `qemu-img create` makes it) needs no flag. NBD destinations are the operator's export: not checked.
import { open, readFile, readdir, readlink, realpath, stat } from 'node:fs/promises';
import { ControlError } from '../control/protocol.ts';

/** `qemu-img create -f raw` writes one zeroed block at the start (alignment probing). */
const EMPTY_ALLOCATED = 64 * 1024;

async function looksEmpty(path: string, allocated: number): Promise<boolean> {
  if (allocated === 0) return true;
  if (allocated > EMPTY_ALLOCATED) return false;
  const f = await open(path, 'r');
  try {
    const buf = Buffer.alloc(EMPTY_ALLOCATED);
    const { bytesRead } = await f.read(buf, 0, buf.length, 0);
    return buf.subarray(0, bytesRead).every((b) => b === 0);
  } finally {
    await f.close();
  }
}

/** PIDs (with their command names) that hold `path` open, from /proc/PID/fd. */
export async function holders(path: string): Promise<Array<{ pid: number; comm: string }>> {
  const target = await realpath(path);
  const found: Array<{ pid: number; comm: string }> = [];
  const pids = (await readdir('/proc').catch(() => [] as string[])).filter((n) => /^\d+$/.test(n));
  for (const p of pids) {
    const fds = await readdir(`/proc/${p}/fd`).catch(() => [] as string[]);
    for (const fd of fds) {
      if ((await readlink(`/proc/${p}/fd/${fd}`).catch(() => '')) !== target) continue;
      const comm = await readFile(`/proc/${p}/comm`, 'utf8').catch(() => '?');
      found.push({ pid: Number(p), comm: comm.trim() });
      break;
    }
  }
  return found;
}

/** Refuse a destination in use or holding data (unless `overwrite`); `backing` is the disk itself. */
export async function checkDestinationFree(path: string, overwrite: boolean, backing: string): Promise<void> {
  const st = await stat(path).catch(() => null);
  if (!st || !(st.isFile() || st.isBlockDevice())) return; // created by the job, or refused later
  // The disk itself: openDestination refuses that with its own message.
  if ((await realpath(path)) === (await realpath(backing).catch(() => backing))) return;
  const users = (await holders(path)).filter((h) => h.pid !== process.pid);
  if (users.length) {
    const who = users.map((u) => `${u.comm} (pid ${u.pid})`).join(', ');
    throw new ControlError('in-use', `destination ${path} is open in ${who}: another guest or server uses it; choose another destination`);
  }
  const holdsData = st.isBlockDevice() || !(await looksEmpty(path, st.blocks * 512));
  if (holdsData && !overwrite) {
    throw new ControlError('exists', `destination ${path} already exists and holds data: pass --overwrite to replace its contents, or choose a new path`);
  }
}
