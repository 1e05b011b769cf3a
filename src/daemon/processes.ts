// Facts about processes and groups that the supervisor needs, read from /proc and
// /etc/group. A PID in the registry may have been reused by an unrelated process after a
// reboot or a long outage: before signalling or adopting a PID we check that its command
// line is a `vmshift serve` of that very socket.
import { readFile, readdir } from 'node:fs/promises';

/** Alive and not a zombie (an orphaned shim that died may linger as one until reaped). */
export async function processAlive(pid: number): Promise<boolean> {
  try {
    const stat = await readFile(`/proc/${pid}/stat`, 'utf8');
    // Field 3, after the parenthesised command name (which may itself contain spaces or ')').
    const state = stat.slice(stat.lastIndexOf(')') + 2, stat.lastIndexOf(')') + 3);
    return state !== 'Z' && state !== 'X';
  } catch {
    return false;
  }
}

export async function commandLine(pid: number): Promise<string[] | undefined> {
  try {
    const raw = await readFile(`/proc/${pid}/cmdline`, 'utf8');
    return raw.split('\0').filter(Boolean);
  } catch {
    return undefined;
  }
}

/** Is `pid` a live `vmshift serve ... --socket SOCKET` process? */
export async function isShimProcess(pid: number | null, socket: string): Promise<boolean> {
  if (!pid || !(await processAlive(pid))) return false;
  const argv = await commandLine(pid);
  if (!argv) return false;
  const at = argv.indexOf('--socket');
  return argv.includes('serve') && at >= 0 && argv[at + 1] === socket;
}

/**
 * The live `vmshift serve` of this socket, whatever the registry says: a daemon that died
 * between spawning a shim and recording its PID must find that shim, not start a second one.
 */
export async function findShimProcess(socket: string): Promise<number | undefined> {
  const pids = (await readdir('/proc').catch(() => [] as string[])).filter((n) => /^\d+$/.test(n)).map(Number);
  for (const pid of pids) if (pid !== process.pid && (await isShimProcess(pid, socket))) return pid;
  return undefined;
}

/** Wait until `pid` is gone; false when it still runs after timeoutMs. */
export async function waitForExit(pid: number, timeoutMs: number): Promise<boolean> {
  const deadline = Date.now() + timeoutMs;
  while (await processAlive(pid)) {
    if (Date.now() > deadline) return false;
    await sleep(50);
  }
  return true;
}

/** A group name (looked up in /etc/group) or a numeric gid. */
export async function resolveGroup(group: string): Promise<number> {
  if (/^\d+$/.test(group)) return Number(group);
  const lines = (await readFile('/etc/group', 'utf8')).split('\n');
  for (const line of lines) {
    const [name, , gid] = line.split(':');
    if (name === group && gid && /^\d+$/.test(gid)) return Number(gid);
  }
  throw new Error(`unknown group "${group}" (not in /etc/group)`);
}

export function sleep(ms: number): Promise<void> {
  return new Promise((r) => setTimeout(r, ms));
}
