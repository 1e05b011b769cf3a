// Facts about processes and groups that the supervisor needs, read from /proc and
// /etc/group. A PID in the registry may have been reused by an unrelated process after a
// reboot or a long outage, and anyone may start a process whose command line reads
// `serve --socket <a shim's socket>`: before signalling or adopting a PID we check that it
// runs as our own user, that its executable is our node, and that it runs our CLI script
// with `serve ... --socket SOCKET`. A command line alone proves nothing.
import { readFile, readdir, readlink, realpath } from 'node:fs/promises';
import { join } from 'node:path';
import { projectRoot } from '../util/paths.ts';

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

/** The real, effective, saved and filesystem uids of a process (/proc/PID/status). */
async function uids(pid: number): Promise<number[] | undefined> {
  const status = await readFile(`/proc/${pid}/status`, 'utf8').catch(() => undefined);
  const m = status && /^Uid:\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)/m.exec(status);
  return m ? m.slice(1, 5).map(Number) : undefined;
}

/** node's options that take their value as the next argument. */
const WITH_VALUE = new Set(['--import', '--require', '-r', '--loader', '--experimental-loader']);

/** The scripts a shim's node may run: the bundle or the TypeScript entry point of this checkout. */
const OUR_SCRIPTS = [join(projectRoot, 'dist/vmshift.mjs'), join(projectRoot, 'src/cli/main.ts')];
let ours: Promise<{ exe: string; scripts: string[] }> | undefined;
function ourPaths() {
  ours ??= (async () => ({
    exe: await realpath(process.execPath),
    scripts: await Promise.all(OUR_SCRIPTS.map((p) => realpath(p).catch(() => p))),
  }))();
  return ours;
}

/**
 * Is `pid` a live `vmshift serve ... --socket SOCKET` process of ours: every uid ours, its
 * executable our node, and its first non-option argument our CLI script, followed by `serve`?
 */
export async function isShimProcess(pid: number | null, socket: string): Promise<boolean> {
  if (!pid || !(await processAlive(pid))) return false;
  const me = process.geteuid?.() ?? 0;
  const ids = await uids(pid);
  if (!ids || ids.some((u) => u !== me)) return false;
  const { exe, scripts } = await ourPaths();
  // The kernel's answer is already a realpath; after a node upgrade a shim started before it
  // runs the replaced binary, shown as "PATH (deleted)": still ours.
  const running = await readlink(`/proc/${pid}/exe`).catch(() => undefined);
  if (running?.replace(/ \(deleted\)$/, '') !== exe) return false;
  const argv = await commandLine(pid);
  if (!argv) return false;
  // node [--flags...] [--import LOADER] SCRIPT serve SOURCE ... --socket SOCKET
  let i = 1;
  while (i < argv.length && argv[i]!.startsWith('-')) i += WITH_VALUE.has(argv[i]!) ? 2 : 1;
  const arg = argv[i];
  const script = arg === undefined ? undefined : await realpath(arg.startsWith('/') ? arg : join(`/proc/${pid}/cwd`, arg)).catch(() => undefined);
  if (!script || !scripts.includes(script) || argv[i + 1] !== 'serve') return false;
  const at = argv.indexOf('--socket', i + 2);
  return at >= 0 && argv[at + 1] === socket;
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
