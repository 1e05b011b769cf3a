// Test helpers for real processes: start a daemon, wait until its socket answers, stop it
// by PID (never by name), and temp dirs that are removed even when a test fails.
import { spawn, type ChildProcess, type SpawnOptions } from 'node:child_process';
import { mkdtempSync, rmSync, existsSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { connect } from 'node:net';

const cleanups: Array<() => Promise<void> | void> = [];
let hooked = false;

/** Register a cleanup; all run (last first) from `cleanupAll`, and on process exit. */
export function onCleanup(fn: () => Promise<void> | void): void {
  cleanups.push(fn);
  if (!hooked) {
    hooked = true;
    // Last resort when a test file crashes: kill what is still registered, synchronously.
    process.on('exit', () => {
      for (const p of live) if (p.exitCode === null && p.signalCode === null && p.pid) try { process.kill(p.pid, 'SIGKILL'); } catch { /* gone */ }
      for (const d of dirs) rmSync(d, { recursive: true, force: true });
    });
  }
}

export async function cleanupAll(): Promise<void> {
  while (cleanups.length) {
    const fn = cleanups.pop()!;
    try { await fn(); } catch (e) { console.error('cleanup failed:', e); }
  }
}

const dirs = new Set<string>();
const live = new Set<ChildProcess>();

/** A fresh temp dir, removed at cleanup. Short paths: unix socket paths are limited to 107 bytes. */
export function tempDir(prefix = 'vmshift-test-'): string {
  const d = mkdtempSync(join(tmpdir(), prefix));
  dirs.add(d);
  onCleanup(() => { rmSync(d, { recursive: true, force: true }); dirs.delete(d); });
  return d;
}

export interface Daemon {
  proc: ChildProcess;
  pid: number;
  output(): string;
  stop(signal?: NodeJS.Signals): Promise<void>;
  exited: Promise<number | null>;
}

/** Spawn a process, capture its output, and stop it (by PID) at cleanup. */
export function startDaemon(cmd: string, args: string[], opts: SpawnOptions = {}): Daemon {
  const proc = spawn(cmd, args, { stdio: ['ignore', 'pipe', 'pipe'], ...opts });
  live.add(proc);
  let out = '';
  proc.stdout?.on('data', (b) => { out += b; if (out.length > 1e6) out = out.slice(-5e5); });
  proc.stderr?.on('data', (b) => { out += b; if (out.length > 1e6) out = out.slice(-5e5); });
  const exited = new Promise<number | null>((resolve) => proc.on('exit', (code) => { live.delete(proc); resolve(code); }));
  const stop = async (signal: NodeJS.Signals = 'SIGTERM') => {
    if (proc.exitCode !== null || proc.signalCode !== null) return;
    proc.kill(signal);
    const t = setTimeout(() => proc.kill('SIGKILL'), 5000);
    await exited;
    clearTimeout(t);
  };
  onCleanup(() => stop());
  return { proc, pid: proc.pid!, output: () => out, stop, exited };
}

/** Resolve once a unix socket accepts a connection; fail with the daemon's output otherwise. */
export async function waitForSocket(path: string, daemon?: Daemon, timeoutMs = 10000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    if (daemon && (daemon.proc.exitCode !== null || daemon.proc.signalCode !== null)) {
      throw new Error(`daemon exited before ${path} appeared:\n${daemon.output()}`);
    }
    if (existsSync(path)) {
      const ok = await new Promise<boolean>((resolve) => {
        const s = connect(path, () => { s.destroy(); resolve(true); });
        s.on('error', () => resolve(false));
      });
      if (ok) return;
    }
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${path}${daemon ? `:\n${daemon.output()}` : ''}`);
    await new Promise((r) => setTimeout(r, 25));
  }
}

/** Run a command to completion; reject with its output on a non-zero exit. */
export function run(cmd: string, args: string[], opts: SpawnOptions & { input?: string } = {}): Promise<{ stdout: string; stderr: string; code: number }> {
  return new Promise((resolve, reject) => {
    const p = spawn(cmd, args, { stdio: ['pipe', 'pipe', 'pipe'], ...opts });
    let stdout = '', stderr = '';
    p.stdout!.on('data', (b) => (stdout += b));
    p.stderr!.on('data', (b) => (stderr += b));
    p.stdin!.on('error', () => {}); // a command that exits at once must not crash the test with EPIPE
    p.stdin!.end(opts.input ?? '');
    p.on('error', reject);
    p.on('close', (code) => {
      if (code === 0) resolve({ stdout, stderr, code });
      else reject(Object.assign(new Error(`${cmd} ${args.join(' ')} exited ${code}:\n${stdout}\n${stderr}`), { stdout, stderr, code }));
    });
  });
}

/** Like `run` but resolves with the exit code instead of rejecting. */
export function runStatus(cmd: string, args: string[], opts: SpawnOptions & { input?: string } = {}) {
  return run(cmd, args, opts).catch((e: { stdout: string; stderr: string; code: number }) => ({ stdout: e.stdout ?? '', stderr: e.stderr ?? String(e), code: e.code ?? -1 }));
}

/** The error a promise rejects with; throws if it resolves instead. */
export async function rejection(p: Promise<unknown>): Promise<unknown> {
  try {
    await p;
  } catch (e) {
    return e;
  }
  throw new Error('expected a rejection');
}
