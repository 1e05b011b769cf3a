// Shared by the storage-migration interop tests: a real `vmshift serve` process, fio writing
// through it with crc32c verify headers, the CLI, and comparisons with qemu-img.
import { createHash } from 'node:crypto';
import { readFileSync, existsSync } from 'node:fs';
import { join } from 'node:path';
import { startDaemon, waitForSocket, run, runStatus, type Daemon } from '../helpers/proc.ts';
import { controlCall } from '../../src/control/client.ts';

export const ROOT = new URL('../..', import.meta.url).pathname;
export const VMSHIFT = join(ROOT, 'bin/vmshift');
export const MiB = 1024 * 1024;

export interface ShimProc {
  daemon: Daemon;
  socket: string;
  uri: string;
}

export async function startShim(source: string, socket: string, extra: string[] = []): Promise<ShimProc> {
  const daemon = startDaemon(VMSHIFT, ['serve', source, '--socket', socket, ...extra]);
  await waitForSocket(`${socket}.ctl`, daemon, 20000);
  return { daemon, socket, uri: `nbd+unix:///disk?socket=${socket}` };
}

/** A raw file filled with a pattern (so every pass has real data to copy). */
export async function makeDisk(path: string, size: number, pattern = 0x5a): Promise<void> {
  await run('qemu-img', ['create', '-q', '-f', 'raw', path, String(size)]);
  await run('qemu-io', ['-f', 'raw', '-c', `write -P ${pattern} 0 ${size}`, path]);
}

export interface FioJob {
  uri: string;
  seed: number;
  /** Bytes of 4k random writes (each block at most once: verifiable later). */
  ioSize: string;
  size?: string;
  rate?: string;
}

function fioArgs(j: FioJob): string[] {
  return [
    '--name=w', '--ioengine=nbd', `--uri=${j.uri}`, '--rw=randwrite', '--bs=4k', `--size=${j.size ?? '32M'}`,
    `--io_size=${j.ioSize}`, '--iodepth=8', '--verify=crc32c', '--verify_state_save=0', `--randseed=${j.seed}`, '--output-format=normal',
  ];
}

/** fio writing in the background; resolves with its exit code and output. */
export function fioWrite(j: FioJob): Promise<{ code: number; stdout: string; stderr: string }> {
  return runStatus('fio', [...fioArgs(j), '--do_verify=0', ...(j.rate ? [`--rate=${j.rate}`] : [])]);
}

/** fio's verify pass over what the write job wrote: throws (with fio's output) on a mismatch. */
export async function fioVerify(j: FioJob): Promise<void> {
  const r = await runStatus('fio', [...fioArgs(j), '--verify_only', '--verify_fatal=1']);
  if (r.code !== 0 || /verify: bad|err=\s*[1-9]/.test(r.stdout + r.stderr)) throw new Error(`fio verify failed (exit ${r.code}):\n${r.stdout}\n${r.stderr}`);
}

export interface CliResult {
  code: number;
  events: Array<{ event: string; data: any }>;
  result: any;
  error: { code: string; message: string } | null;
  stderr: string;
}

/** Run a vmshift verb with --json and parse its JSON lines. */
export async function vmshift(args: string[]): Promise<CliResult> {
  const r = await runStatus(VMSHIFT, [...args, '--json']);
  const lines = r.stdout.split('\n').filter(Boolean).map((l) => {
    try {
      return JSON.parse(l);
    } catch {
      return { unparsed: l };
    }
  });
  return {
    code: r.code,
    events: lines.filter((l) => 'event' in l),
    result: lines.find((l) => 'result' in l)?.result ?? null,
    error: lines.find((l) => 'error' in l)?.error ?? null,
    stderr: r.stderr,
  };
}

export function migrate(socket: string, to: string, extra: string[] = []): Promise<CliResult> {
  return vmshift(['migrate-storage', '--socket', socket, '--to', to, ...extra]);
}

export async function status(socket: string): Promise<any> {
  const r = await runStatus(VMSHIFT, ['status', '--socket', socket, '--json']);
  if (r.code !== 0) throw new Error(`status failed: ${r.stderr}`);
  return JSON.parse(r.stdout);
}

/** qemu-img compare of a raw file with what the shim serves; throws when they differ. */
export async function compareWithShim(file: string, socket: string): Promise<void> {
  await run('qemu-img', ['compare', '--image-opts', `driver=raw,file.driver=file,file.filename=${file}`, `driver=nbd,server.type=unix,server.path=${socket},export=disk`]);
}

export function sha256(path: string): string {
  return createHash('sha256').update(readFileSync(path)).digest('hex');
}

/** Poll migrate.status until `pred` holds for the running job (bounded). */
export async function waitForJob(socket: string, pred: (job: any) => boolean, timeoutMs = 60000): Promise<any> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const s = await controlCall<any>(`${socket}.ctl`, 'migrate.status', {}, { timeoutMs: 5000 });
    if (s.running && pred(s.job)) return s.job;
    if (Date.now() > deadline) throw new Error(`timed out waiting for the job on ${socket}: ${JSON.stringify(s)}`);
    await new Promise((res) => setTimeout(res, 50));
  }
}

export { existsSync };

/** Connections waiting in the backlog of the unix socket listening at `path` (ss's Recv-Q for a listener). */
async function pendingConnections(path: string): Promise<number> {
  const r = await runStatus('ss', ['-xlH', 'src', path]);
  const cols = r.stdout.trim().split(/\s+/);
  return r.code === 0 && cols.length > 2 ? Number(cols[2]) : 0;
}

/**
 * Run `vmshift ARGS` against a shim held still while the CLI starts, however slow that is
 * (node and the bundle, or tsx when dist/ is stale, on a loaded machine: seconds): the shim
 * is stopped (SIGSTOP) now, the CLI starts and connects to its control socket (the kernel
 * queues the connection), and only then does the shim go on, with the CLI's request first
 * in its queue. Resolves, once the shim runs again, to the CLI's pending result. What the
 * shim was doing (a job, a guest's writes) is exactly where it was: a test that needs
 * "the abort lands in this phase" or "the job starts while fio still writes" then holds at
 * any copy speed.
 */
export async function whileHeld(shim: ShimProc, args: string[]): Promise<{ result: Promise<CliResult> }> {
  return holdUntilConnected(shim.daemon.pid, `${shim.socket}.ctl`, () => ({ result: vmshift(args) }));
}

/** whileHeld's hold for any process `pid` listening on `ctl`: stopped while `start()` (a client) gets going, until something connects to `ctl`. */
export async function holdUntilConnected<T>(pid: number, ctl: string, start: () => T): Promise<T> {
  const before = await pendingConnections(ctl);
  process.kill(pid, 'SIGSTOP');
  try {
    const started = start();
    const deadline = Date.now() + 60000;
    while ((await pendingConnections(ctl)) <= before) {
      if (Date.now() > deadline) throw new Error(`nothing connected to ${ctl} while its process was held`);
      await new Promise((res) => setTimeout(res, 20));
    }
    return started;
  } finally {
    process.kill(pid, 'SIGCONT');
  }
}

/** `vmshift abort` that lands while the job is where the caller's waitForJob saw it (whileHeld; the job moves at most a burst of its --bandwidth in between). */
export async function abortHeld(shim: ShimProc): Promise<CliResult> {
  return (await whileHeld(shim, ['abort', '--socket', shim.socket])).result;
}
