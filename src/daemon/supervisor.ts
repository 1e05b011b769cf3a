// The supervisor owns the shim processes: each shim is its own `vmshift serve` process,
// spawned detached (own session, output to a log file) so that neither a restart nor a crash
// of vmshiftd drops a guest's disk. On start it adopts what still runs, restarts what died
// and should run, and finishes stops that were interrupted; while it runs it restarts shims
// that die, with a growing delay so a shim that cannot start does not spin.
import { spawn } from 'node:child_process';
import { appendFileSync, openSync, closeSync } from 'node:fs';
import { chmod, chown, mkdir, readFile, rm, unlink } from 'node:fs/promises';
import { join } from 'node:path';
import type { Logger } from 'pino';
import { controlCall } from '../control/client.ts';
import { ControlError } from '../control/protocol.ts';
import { controlSocketFor } from '../shim/shim.ts';
import { loadShimState } from '../shim/state.ts';
import { Registry, checkName, checkSource, type ShimRecord } from './registry.ts';
import { findShimProcess, isShimProcess, processAlive, resolveGroup, sleep, waitForExit } from './processes.ts';

export interface SupervisorOptions {
  stateDir: string;
  runDir: string;
  /** argv that runs the vmshift CLI (the shim is `...vmshiftCommand serve ...`). */
  vmshiftCommand: string[];
  /** How long a new shim may take to answer on its control socket. */
  readyTimeoutMs?: number;
  /** How long a SIGTERMed shim may take to flush and exit before SIGKILL. */
  stopTimeoutMs?: number;
  watchIntervalMs?: number;
}

export interface StartRequest {
  name: string;
  source: string;
  export?: string;
  track?: 'bitmap' | 'bloom' | 'none';
  group?: string | null;
}

/** Unix socket paths longer than this do not fit in sockaddr_un. */
const MAX_SOCKET_PATH = 107;
/** A shim that has run this long without dying is healthy again: its restart delay resets. */
const HEALTHY_AFTER_MS = 60_000;
const LOG_MARK = '--- vmshiftd: starting shim ';
/** How long a restart waits for QEMU to reconnect before it reports the clients missing. */
export const RECONNECT_WAIT_MS = 20_000;

export interface RestartResult {
  name: string;
  oldPid: number | null;
  pid: number;
  /** The old process exited on SIGTERM, flushed (no SIGKILL, no "stop failed"). */
  clean: boolean;
  stopFailure: string | null;
  /** The job aborted first (restart --abort-job), if any. */
  abortedJob: string | null;
  /** NBD clients (QEMU) before the restart, and on the new process when measured. */
  clientsBefore: number;
  clientsAfter: number;
  /** SIGTERM to the old process gone. */
  stopMs: number;
  /** SIGTERM to the new process serving. */
  downMs: number;
  /** SIGTERM to every client back (the stall QEMU saw, within ~25 ms); null without clients or when they did not come back. */
  stallMs: number | null;
}

interface Health {
  failures: number;
  nextAttemptAt: number;
  upSince: number;
}

export class Supervisor {
  private readonly locks = new Map<string, Promise<unknown>>();
  private readonly health = new Map<string, Health>();
  private watchTimer?: NodeJS.Timeout;
  private closed = false;
  /** Set by watch(): look at the shims now (a child shim exited). */
  private childExited = () => {};

  constructor(
    readonly registry: Registry,
    private readonly log: Logger,
    private readonly opts: SupervisorOptions,
  ) {}

  private socketFor(name: string): string {
    return join(this.opts.runDir, name, 'nbd.sock');
  }

  /** Operations on one shim run one after the other (a start racing a stop would be a mess). */
  private withLock<T>(name: string, fn: () => Promise<T>): Promise<T> {
    const prev = this.locks.get(name) ?? Promise.resolve();
    const run = prev.then(fn, fn);
    const tail = run.catch(() => {});
    this.locks.set(name, tail);
    void tail.then(() => {
      if (this.locks.get(name) === tail) this.locks.delete(name);
    });
    return run;
  }

  // ---- start-up -------------------------------------------------------------------------

  /** Bring the world in line with the registry after a daemon (re)start. */
  async adoptAll(): Promise<void> {
    for (const rec of this.registry.list()) {
      await this.withLock(rec.name, () => this.reconcile(rec.name)).catch((e) => {
        this.log.error({ shim: rec.name, err: (e as Error).message }, 'shim could not be brought up; will retry');
      });
    }
  }

  private async reconcile(name: string): Promise<void> {
    const rec = this.registry.get(name);
    if (!rec) return;
    const alive = await isShimProcess(rec.pid, rec.socket);
    if (!alive) {
      const found = await findShimProcess(rec.socket);
      if (found) {
        this.log.warn({ shim: name, shimPid: found, recordedPid: rec.pid }, 'found the shim under an unrecorded PID');
        await this.registry.put({ ...rec, pid: found });
        return this.reconcile(name);
      }
    }
    if (rec.desired === 'stopped') {
      // A stop was interrupted by a daemon crash: finish it.
      if (alive) await this.terminate(rec);
      await this.forget(rec);
      this.log.info({ shim: name, shimPid: rec.pid }, 'finished an interrupted stop; record dropped');
      return;
    }
    if (alive && (await this.answers(rec.socket, 10_000))) {
      this.health.set(name, { failures: 0, nextAttemptAt: 0, upSince: Date.now() });
      this.log.info({ shim: name, shimPid: rec.pid, socket: rec.socket }, 'adopted running shim');
      return;
    }
    if (alive) {
      // Never start a second shim on a disk whose first shim still runs: leave it to the operator.
      this.log.warn({ shim: name, shimPid: rec.pid }, 'shim process is alive but its control socket does not answer; left alone');
      return;
    }
    this.log.warn({ shim: name, shimPid: rec.pid }, 'shim process is gone; restarting it');
    await this.launch(rec, true);
  }

  // ---- the API's operations -------------------------------------------------------------

  start(req: StartRequest): Promise<{ shim: ShimRecord; already: boolean }> {
    const name = checkName(req.name);
    const source = checkSource(req.source);
    const wanted = { export: req.export ?? 'disk', track: req.track ?? 'bitmap', group: req.group ?? null } as const;
    return this.withLock(name, async () => {
      const existing = this.registry.get(name);
      if (existing) {
        if (existing.source !== source) {
          throw new ControlError('conflict', `shim "${name}" already serves ${existing.source}, not ${source}: stop it first or pick another name`);
        }
        for (const k of ['export', 'track', 'group'] as const) {
          if (existing[k] !== wanted[k]) {
            throw new ControlError('conflict', `shim "${name}" of ${source} runs with ${k}=${existing[k]}, not ${wanted[k]}: stop it first to change it`);
          }
        }
        if (await isShimProcess(existing.pid, existing.socket)) return { shim: existing, already: true };
        return { shim: await this.launch(existing, true), already: false };
      }
      const other = this.registry.list().find((r) => r.source === source);
      if (other) throw new ControlError('conflict', `${source} is already served by shim "${other.name}": two shims on one disk would corrupt it`);
      const socket = this.socketFor(name);
      if (Buffer.byteLength(controlSocketFor(socket)) > MAX_SOCKET_PATH) {
        throw new ControlError('bad-request', `socket path ${controlSocketFor(socket)} is longer than ${MAX_SOCKET_PATH} bytes: use a shorter --run-dir or name`);
      }
      if (wanted.group) await resolveGroup(wanted.group).catch((e) => { throw new ControlError('bad-request', (e as Error).message); });
      const rec: ShimRecord = {
        name,
        source,
        ...wanted,
        socket,
        statePath: join(this.opts.stateDir, 'shims', `${name}.state.json`),
        logPath: join(this.opts.stateDir, 'logs', `${name}.log`),
        desired: 'running',
        pid: null,
        startedAt: null,
        restarts: 0,
        createdAt: new Date().toISOString(),
      };
      // Recorded before it is spawned: a daemon crash in between restarts it rather than forgets it.
      await this.registry.put(rec);
      try {
        return { shim: await this.launch(rec, false), already: false };
      } catch (e) {
        await this.forget(rec, true);
        throw e;
      }
    });
  }

  stop(nameIn: string, force = false): Promise<{ name: string; pid: number | null; backing: string }> {
    const name = checkName(nameIn);
    return this.withLock(name, async () => {
      const rec = this.registry.get(name);
      if (!rec) throw new ControlError('unknown-shim', `no shim named "${name}"`);
      const alive = await isShimProcess(rec.pid, rec.socket);
      if (alive && !force) {
        const job = await controlCall<{ job: string | null }>(controlSocketFor(rec.socket), 'status', {}, { timeoutMs: 5000 }).then((s) => s.job, () => null);
        if (job) throw new ControlError('busy', `shim "${name}" is running a ${job} job: abort it first (or stop with force)`);
      }
      // Recorded first: if we crash mid-stop, the next start finishes the stop.
      await this.registry.put({ ...rec, desired: 'stopped' });
      if (alive) await this.terminate(rec);
      const backing = (await loadShimState(rec.statePath).catch(() => undefined))?.backing ?? rec.source;
      await this.forget(rec);
      this.log.info({ shim: name, shimPid: rec.pid, backing }, 'shim stopped; record dropped');
      return { name, pid: rec.pid, backing };
    });
  }

  /**
   * Swap the shim's process under a running guest: SIGTERM the old one (it answers what is
   * in flight, flushes and exits; QEMU, told to reconnect, holds the guest's requests), and
   * only once it is gone start the new one on the same socket and state file, so two
   * processes never have the disk open. Refused while a job runs unless `abortJob`: a
   * restart ends the job, and throwing its copy away is the operator's call. The result
   * measures the stall as QEMU sees it: from the old shim's last moment of serving to its
   * clients (as many as before) connected to the new one.
   */
  restart(nameIn: string, opts: { abortJob?: boolean } = {}): Promise<RestartResult> {
    const name = checkName(nameIn);
    return this.withLock(name, async () => {
      const rec = this.registry.get(name);
      if (!rec || rec.desired !== 'running') throw new ControlError('unknown-shim', `no shim named "${name}"`);
      const ctl = controlSocketFor(rec.socket);
      const alive = await isShimProcess(rec.pid, rec.socket);
      // An unresponsive shim is restarted too (that is what the operator asks for): the new
      // process starts only after the old one has exited.
      const before = alive ? await controlCall<{ job: string | null; nbd: { clients: number } }>(ctl, 'status', {}, { timeoutMs: 5000 }).catch(() => null) : null;
      let abortedJob: string | null = null;
      if (before?.job) {
        if (!opts.abortJob) {
          throw new ControlError('busy', `shim "${name}" is running a ${before.job} job: a restart would end it and throw its copy away. Wait for it to finish, or restart with --abort-job (the job rolls back first; the disk stays where it is)`);
        }
        this.log.warn({ shim: name, job: before.job }, 'aborting the job before a restart');
        await controlCall(ctl, 'migrate.abort', {}, { timeoutMs: 120_000 }).catch((e) => {
          if (!(e instanceof ControlError && e.code === 'no-job')) throw e;
        });
        abortedJob = before.job;
      }
      const clientsBefore = before?.nbd.clients ?? 0;
      const t0 = Date.now();
      let clean = true;
      if (alive) clean = await this.terminate(rec);
      const stoppedAt = Date.now();
      const stopFailure = alive ? await this.stopFailure(rec) : null;
      if (stopFailure) clean = false;
      this.log.info({ shim: name, shimPid: rec.pid, clean, stopMs: stoppedAt - t0 }, 'restart: old shim stopped');
      const next = await this.launch(rec, true);
      const servingAt = Date.now();
      const reconnected = clientsBefore > 0 ? await this.waitForClients(next, clientsBefore) : null;
      const result: RestartResult = {
        name,
        oldPid: rec.pid,
        pid: next.pid!,
        clean,
        stopFailure,
        abortedJob,
        clientsBefore,
        clientsAfter: reconnected?.clients ?? 0,
        stopMs: stoppedAt - t0,
        downMs: servingAt - t0,
        stallMs: reconnected?.at !== undefined ? reconnected.at - t0 : null,
      };
      this.log.info({ shim: name, shimPid: next.pid, ...result }, 'shim restarted');
      return result;
    });
  }

  /**
   * Wait for as many NBD clients on the new shim as the old one had: when they came, or no
   * time after `timeoutMs` (QEMU 7.2 retries 1, 3, 7 and 15 s after the drop; the lock on
   * this shim is held meanwhile, so no longer than that).
   */
  private async waitForClients(rec: ShimRecord, want: number, timeoutMs = RECONNECT_WAIT_MS): Promise<{ at?: number; clients: number }> {
    const deadline = Date.now() + timeoutMs;
    let clients = 0;
    while (Date.now() < deadline) {
      clients = await controlCall<{ nbd: { clients: number } }>(controlSocketFor(rec.socket), 'status', {}, { timeoutMs: 5000 }).then((s) => s.nbd.clients, () => 0);
      if (clients >= want) return { at: Date.now(), clients };
      await sleep(25);
    }
    return { clients };
  }

  /** "stop failed" in this run's log: the old shim exited without a clean flush. */
  private async stopFailure(rec: ShimRecord): Promise<string | null> {
    try {
      const text = await readFile(rec.logPath, 'utf8');
      const line = text.slice(text.lastIndexOf(LOG_MARK)).split('\n').find((l) => l.startsWith('vmshift: stop failed'));
      return line ?? null;
    } catch {
      return null;
    }
  }

  /** The shim's control socket, for calls the daemon forwards (jobs). */
  controlSocket(nameIn: string): string {
    const rec = this.registry.get(checkName(nameIn));
    if (!rec || rec.desired !== 'running') throw new ControlError('unknown-shim', `no shim named "${nameIn}"`);
    return controlSocketFor(rec.socket);
  }

  async describe(rec: ShimRecord): Promise<{ state: string; shim: unknown; job: unknown; error: string | null }> {
    if (!(await isShimProcess(rec.pid, rec.socket))) {
      return { state: rec.desired === 'stopped' ? 'stopping' : 'down', shim: null, job: null, error: `process ${rec.pid ?? '(none)'} is not running` };
    }
    const ctl = controlSocketFor(rec.socket);
    try {
      const [shim, job] = await Promise.all([
        controlCall(ctl, 'status', {}, { timeoutMs: 5000 }),
        controlCall(ctl, 'migrate.status', {}, { timeoutMs: 5000 }).catch(() => null),
      ]);
      return { state: 'running', shim, job, error: null };
    } catch (e) {
      return { state: 'unresponsive', shim: null, job: null, error: (e as Error).message };
    }
  }

  // ---- watching -------------------------------------------------------------------------

  /** Restart shims that die while the daemon runs (adopted ones are not our children: poll). */
  watch(): void {
    const interval = this.opts.watchIntervalMs ?? 1000;
    const tick = async () => {
      for (const rec of this.registry.list()) {
        if (this.closed || rec.desired !== 'running' || this.locks.has(rec.name)) continue;
        const h = this.health.get(rec.name) ?? { failures: 0, nextAttemptAt: 0, upSince: Date.now() };
        if (await isShimProcess(rec.pid, rec.socket)) {
          if (h.failures && Date.now() - h.upSince > HEALTHY_AFTER_MS) this.health.set(rec.name, { ...h, failures: 0 });
          continue;
        }
        if (Date.now() < h.nextAttemptAt) continue;
        this.log.warn({ shim: rec.name, shimPid: rec.pid }, 'shim process died; restarting it');
        await this.withLock(rec.name, async () => {
          const now = this.registry.get(rec.name);
          if (now?.desired === 'running' && !(await isShimProcess(now.pid, now.socket))) await this.launch(now, true);
        }).catch((e) => this.log.error({ shim: rec.name, err: (e as Error).message }, 'restart failed; will retry'));
      }
    };
    let ticking = false;
    const run = () => {
      ticking = true;
      void tick().finally(() => {
        ticking = false;
        loop();
      });
    };
    const loop = () => {
      if (this.closed) return;
      this.watchTimer = setTimeout(run, interval);
    };
    // A shim this daemon spawned is its child: its exit is seen at once, and the restart
    // begins without waiting for the next poll. QEMU retries its connection 1 s after the
    // drop, then 3 s: a shim back within the second costs its guest a 1 s stall, not 3 s.
    this.childExited = () => {
      if (this.closed || ticking) return;
      clearTimeout(this.watchTimer);
      run();
    };
    loop();
  }

  /** Stop watching. Shims keep running: they are not ours to stop when the daemon goes. */
  close(): void {
    this.closed = true;
    clearTimeout(this.watchTimer);
  }

  // ---- processes ------------------------------------------------------------------------

  /** Spawn `vmshift serve` for a record, wait until it answers, and record its PID. */
  private async launch(rec: ShimRecord, restart: boolean): Promise<ShimRecord> {
    await this.prepareDirs(rec);
    const [cmd, ...pre] = this.opts.vmshiftCommand;
    const args = [...pre, 'serve', rec.source, '--socket', rec.socket, '--export', rec.export, '--track', rec.track, '--state', rec.statePath, '--socket-mode', rec.group ? '0660' : '0600'];
    // A marker line lets an error quote this run's output, not an older run's.
    appendFileSync(rec.logPath, `${LOG_MARK}${new Date().toISOString()} ${rec.source}\n`, { mode: 0o600 });
    const out = openSync(rec.logPath, 'a', 0o600);
    let pid: number | undefined;
    try {
      const child = spawn(cmd!, args, { detached: true, stdio: ['ignore', out, out], cwd: '/' });
      pid = child.pid;
      child.on('error', () => {}); // reported below as "exited before answering"
      child.on('exit', () => setImmediate(() => this.childExited()));
      child.unref();
    } finally {
      closeSync(out);
    }
    if (!pid) throw new ControlError('spawn-failed', `shim "${rec.name}": could not run ${cmd}`);
    const h = this.health.get(rec.name) ?? { failures: 0, nextAttemptAt: 0, upSince: 0 };
    const next: ShimRecord = { ...rec, pid, startedAt: new Date().toISOString(), restarts: rec.restarts + (restart ? 1 : 0) };
    await this.registry.put(next);
    this.log.info({ shim: rec.name, shimPid: pid, source: rec.source, socket: rec.socket, restart }, 'shim spawned');
    try {
      await this.waitReady(next);
      if (rec.group) await chown(rec.socket, -1, await resolveGroup(rec.group));
    } catch (e) {
      this.health.set(rec.name, { failures: h.failures + 1, nextAttemptAt: Date.now() + Math.min(60_000, 1000 * 2 ** h.failures), upSince: 0 });
      if (await processAlive(pid)) await this.terminate(next);
      throw e;
    }
    this.health.set(rec.name, { failures: h.failures, nextAttemptAt: 0, upSince: Date.now() });
    this.log.info({ shim: rec.name, shimPid: pid, socket: rec.socket }, 'shim serving');
    return next;
  }

  /** Per-shim socket dir: QEMU's group may enter it (setgid so the socket gets the group too). */
  private async prepareDirs(rec: ShimRecord): Promise<void> {
    await mkdir(join(this.opts.stateDir, 'shims'), { recursive: true, mode: 0o700 });
    await mkdir(join(this.opts.stateDir, 'logs'), { recursive: true, mode: 0o700 });
    const dir = join(this.opts.runDir, rec.name);
    await mkdir(dir, { recursive: true });
    if (rec.group) {
      await chown(dir, -1, await resolveGroup(rec.group));
      await chmod(dir, 0o2750);
    } else {
      await chmod(dir, 0o700);
    }
  }

  private async waitReady(rec: ShimRecord): Promise<void> {
    const timeoutMs = this.opts.readyTimeoutMs ?? 60_000;
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      if (!(await processAlive(rec.pid!))) {
        throw new ControlError('shim-failed', `shim "${rec.name}" (pid ${rec.pid}) exited before serving ${rec.source}: ${await this.logTail(rec)}`);
      }
      if (await this.answers(rec.socket, 0)) return;
      if (Date.now() > deadline) {
        throw new ControlError('shim-failed', `shim "${rec.name}" (pid ${rec.pid}) did not answer on ${controlSocketFor(rec.socket)} within ${timeoutMs} ms: ${await this.logTail(rec)}`);
      }
      await sleep(100);
    }
  }

  /** Does the control socket answer `status` (retrying for up to `forMs`)? */
  private async answers(socket: string, forMs: number): Promise<boolean> {
    const deadline = Date.now() + forMs;
    for (;;) {
      const ok = await controlCall(controlSocketFor(socket), 'status', {}, { timeoutMs: 5000 }).then(() => true, () => false);
      if (ok || Date.now() >= deadline) return ok;
      await sleep(200);
    }
  }

  /** SIGTERM by PID (the shim flushes and closes), SIGKILL if it hangs; false after a SIGKILL. */
  private async terminate(rec: ShimRecord): Promise<boolean> {
    const pid = rec.pid!;
    try {
      process.kill(pid, 'SIGTERM');
    } catch {
      return true;
    }
    if (await waitForExit(pid, this.opts.stopTimeoutMs ?? 30_000)) return true;
    this.log.error({ shim: rec.name, shimPid: pid }, 'shim did not exit after SIGTERM; sending SIGKILL');
    try {
      process.kill(pid, 'SIGKILL');
    } catch {
      /* gone */
    }
    await waitForExit(pid, 5000);
    return false;
  }

  /**
   * Drop a record and the shim's files. After a failed first start the state file is kept if
   * it records a move (then it is the only pointer to where the disk lives).
   */
  private async forget(rec: ShimRecord, failedStart = false): Promise<void> {
    const state = await loadShimState(rec.statePath).catch(() => undefined);
    if (!failedStart || !state || state.backing === state.origin) await unlink(rec.statePath).catch(() => {});
    await rm(join(this.opts.runDir, rec.name), { recursive: true, force: true });
    await this.registry.remove(rec.name);
    this.health.delete(rec.name);
  }

  private async logTail(rec: ShimRecord): Promise<string> {
    try {
      const text = await readFile(rec.logPath, 'utf8');
      const run = text.slice(text.lastIndexOf(LOG_MARK)).split('\n').slice(1);
      return run.filter(Boolean).slice(-5).join(' | ') || '(no output)';
    } catch {
      return `(no log at ${rec.logPath})`;
    }
  }
}
