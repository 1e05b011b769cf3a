// A ShimStarter without vmshiftd: each shim is a `vmshift serve` process of its own, started
// detached (it must outlive the `vmshift attach` that started it) in a run directory:
//     DIR/NAME.sock  NBD socket (NAME.sock.ctl: its control socket)
//     DIR/NAME.pid   its PID, so a later `vmshift detach` can stop it
//     DIR/NAME.state.json  its durable backing (where a storage migration moved the disk)
//     DIR/NAME.log   its output
// The state file of an earlier shim of the same name is removed before a start: an attach
// must serve exactly the file QEMU has open now, never a stale migrated copy.
import { spawn } from 'node:child_process';
import { closeSync, existsSync, mkdirSync, openSync, readFileSync, readdirSync, rmSync, writeFileSync } from 'node:fs';
import { connect } from 'node:net';
import { join, resolve } from 'node:path';
import { vmshiftBin } from '../util/paths.ts';
import { controlCall } from '../control/client.ts';
import { controlSocketFor } from '../shim/shim.ts';
import type { ShimStarter, StartedShim } from './shim-starter.ts';

const VMSHIFT_BIN = vmshiftBin;
/** sockaddr_un holds 108 bytes including the NUL; `.ctl` is appended for the control socket. */
const MAX_SOCKET = 107 - '.ctl'.length;

export function defaultRunDir(): string {
  return process.env.VMSHIFT_RUN_DIR ?? '/run/vmshift';
}

export interface DirectShimsOpts {
  /** Octal mode of the NBD sockets (0660 lets QEMU's group in); default 0600. */
  socketMode?: string;
  /** How long a shim may take to listen. */
  startTimeoutMs?: number;
}

export class DirectShims implements ShimStarter {
  readonly dir: string;

  constructor(dir = join(defaultRunDir(), 'shims'), private readonly opts: DirectShimsOpts = {}) {
    this.dir = resolve(dir);
  }

  private paths(name: string) {
    const base = join(this.dir, name);
    return { socket: `${base}.sock`, pid: `${base}.pid`, state: `${base}.state.json`, log: `${base}.log` };
  }

  async start(name: string, source: string): Promise<StartedShim> {
    const p = this.paths(name);
    if (p.socket.length > MAX_SOCKET) throw new Error(`shim ${name}: socket path ${p.socket} is longer than ${MAX_SOCKET} bytes; use a shorter run directory`);
    mkdirSync(this.dir, { recursive: true, mode: 0o700 });
    const running = this.runningPid(name);
    if (running) throw new Error(`shim ${name} is already running (pid ${running}, socket ${p.socket})`);
    rmSync(p.state, { force: true });
    const log = openSync(p.log, 'w', 0o600);
    const child = spawn(VMSHIFT_BIN, ['serve', source, '--socket', p.socket, '--state', p.state, '--socket-mode', this.opts.socketMode ?? '0600'], {
      detached: true,
      stdio: ['ignore', log, log],
    });
    closeSync(log);
    let exited: string | null = null;
    child.on('exit', (code, sig) => { exited = sig ?? `exit ${code}`; });
    child.on('error', (e) => { exited = e.message; });
    child.unref();
    if (!child.pid) throw new Error(`shim ${name}: cannot run ${VMSHIFT_BIN}`);
    writeFileSync(p.pid, `${child.pid}\n`, { mode: 0o600 });
    const deadline = Date.now() + (this.opts.startTimeoutMs ?? 30_000);
    // Ready means the control socket answers: the shim opens it after the NBD socket.
    while (!(await canConnect(controlSocketFor(p.socket)))) {
      if (exited !== null || Date.now() > deadline) {
        if (exited === null) killPid(child.pid, 'SIGKILL');
        rmSync(p.pid, { force: true });
        throw new Error(`shim ${name} for ${source} did not start (${exited ?? 'timed out'}): ${tail(p.log)}`);
      }
      await sleep(50);
    }
    return { socket: p.socket, exportName: 'disk', backing: source };
  }

  async backing(name: string): Promise<string> {
    const st = await controlCall<{ backing: string }>(controlSocketFor(this.paths(name).socket), 'status', {}, { timeoutMs: 10_000 });
    return st.backing;
  }

  async stop(name: string): Promise<void> {
    const p = this.paths(name);
    const pid = this.runningPid(name);
    if (pid) {
      // SIGTERM: the shim finishes in-flight requests, flushes and exits.
      killPid(pid, 'SIGTERM');
      const deadline = Date.now() + 30_000;
      while (alive(pid)) {
        if (Date.now() > deadline) {
          killPid(pid, 'SIGKILL');
          break;
        }
        await sleep(50);
      }
    }
    for (const f of [p.pid, p.state]) rmSync(f, { force: true });
  }

  /** Names of the shims with a PID file here (running or not). */
  list(): string[] {
    if (!existsSync(this.dir)) return [];
    return readdirSync(this.dir).filter((f) => f.endsWith('.pid')).map((f) => f.slice(0, -4));
  }

  /**
   * The PID of the running shim `name`, or null. A PID is only trusted when that process's
   * command line names this shim's socket: PIDs are reused.
   */
  runningPid(name: string): number | null {
    const p = this.paths(name);
    let pid: number;
    try {
      pid = Number(readFileSync(p.pid, 'utf8').trim());
    } catch {
      return null;
    }
    if (!Number.isSafeInteger(pid) || pid <= 1 || !alive(pid)) return null;
    try {
      return readFileSync(`/proc/${pid}/cmdline`, 'utf8').split('\0').includes(p.socket) ? pid : null;
    } catch {
      return null;
    }
  }
}

function alive(pid: number): boolean {
  try {
    // A zombie still has a /proc entry; it is as good as gone.
    return !/^\d+ \(.*\) Z/.test(readFileSync(`/proc/${pid}/stat`, 'utf8'));
  } catch {
    return false;
  }
}

function killPid(pid: number, sig: NodeJS.Signals): void {
  try { process.kill(pid, sig); } catch { /* already gone */ }
}

function canConnect(path: string): Promise<boolean> {
  if (!existsSync(path)) return Promise.resolve(false);
  return new Promise((res) => {
    const s = connect(path, () => { s.destroy(); res(true); });
    s.on('error', () => res(false));
  });
}

function tail(file: string): string {
  try {
    return readFileSync(file, 'utf8').trim().split('\n').slice(-5).join(' | ') || '(no output)';
  } catch {
    return '(no log)';
  }
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));
