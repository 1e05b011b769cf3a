// The peer's part of moving disks (runs inside `vmshift link-agent --disks`, beside the link's
// state on this host): on `prepare` it checks every new file against THIS host's datastores
// (its vmshiftd config, src/daemon/datastores.ts), creates each thin (sparse, exactly the
// disk's size), and starts a `vmshift serve` for it, detached, at the socket the destination
// QEMU will use. Every `nbd:<disk>:<n>` stream the source opens is connected to that shim's
// socket: the source's job writes through it. Until `commit` the files and shims are this
// move's to undo: an `abort`, a failed prepare or the link failing (the hold time) stops the
// shims and removes the files, so nothing is left on this host. After `commit` they are the
// disks and are left running.
// For a libvirt domain (`prepare` carries the domain's XML as it will be here) each shim is
// started exactly as this host's libvirt hook starts it at `prepare` (startShims through
// vmshiftd, the same name, owner and group): libvirt's Prepare then finds it serving, and
// vmshiftd supervises it from the first byte (a shutdown's `release` stops it, a start serves
// the new file again).
import { spawn, type ChildProcess } from 'node:child_process';
import { closeSync, openSync } from 'node:fs';
import { open, rm, statfs, unlink } from 'node:fs/promises';
import { connect } from 'node:net';
import { spliceUnix } from '../relay/unix-splice.ts';
import { callDaemon, daemonSocket } from '../cli/daemon-client.ts';
import { loadHookConfig } from '../libvirt/hook-config.ts';
import { planShims, type DomainShims } from '../libvirt/shim-plan.ts';
import { defaultGroup, startShims, stopShims } from '../libvirt/shim-control.ts';
import { dirname, isAbsolute } from 'node:path';
import type { Link } from '../link/link.ts';
import type { LinkStream } from '../link/stream.ts';
import { Control } from '../relay/control.ts';
import { controlCall } from '../control/client.ts';
import { checkDestination, SourceNotAllowedError } from '../daemon/datastores.ts';
import { loadSourcePolicy } from '../daemon/config.ts';
import { DISK_NAME_RE, DISKS_STREAM, NBD_STREAM_RE, type DiskToPrepare, type DisksMsg } from './protocol.ts';

export interface PeerDisksOptions {
  /** This host's vmshiftd config (its datastores). */
  config?: string;
  /** The command that runs vmshift here (the agent's own node and entry point). */
  self: string[];
  /** This host's libvirt hook config (its vmshiftd socket, group, libvirt URI), for libvirt domains. */
  hookConfig?: string;
  log: (m: string) => void;
}

interface Served {
  name: string;
  path: string;
  socket: string;
  /** A shim of our own (`vmshift serve`), or null when vmshiftd runs it. */
  child: ChildProcess | null;
}

class PrepareError extends Error {
  constructor(readonly code: string, message: string) {
    super(message);
  }
}

/** What the agent tells `vmshift status` here about the move's disks. */
export interface PeerDisksStatus { phase: 'waiting' | 'prepared' | 'committed'; disks: Array<{ name: string; path: string; socket: string }> }

export function serveDisks(link: Link, o: PeerDisksOptions): { status(): PeerDisksStatus } {
  const served = new Map<string, Served>();
  let committed = false;
  /** The libvirt domain's shims, started through vmshiftd (the hook's way). */
  let viaDaemon: { plan: DomainShims; socket: string } | null = null;

  /** Stop the shims this move started and remove the files it created (before a commit only). */
  const undo = async (why: string) => {
    if (committed || served.size === 0) return;
    o.log(`removing the disks prepared for this move: ${why}`);
    const all = [...served.values()];
    served.clear();
    if (viaDaemon) {
      const { plan, socket } = viaDaemon;
      viaDaemon = null;
      await stopShims(plan, socket).catch((e: Error) => o.log(`cannot stop the shims through vmshiftd: ${e.message}`));
      // The stopped shims' state files name the files removed below.
      for (const d of plan.disks) await callDaemon(socket, 'shim.forget', { name: d.name }).catch(() => {});
    }
    await Promise.all(all.map((s) => stopShim(s)));
    for (const s of all) {
      await unlink(s.path).catch((e: NodeJS.ErrnoException) => { if (e.code !== 'ENOENT') o.log(`cannot remove ${s.path}: ${e.message}`); });
      for (const f of [`${s.socket}.state.json`, `${s.socket}.log`]) await rm(f, { force: true }).catch(() => {});
    }
  };

  const prepare = async (disks: DiskToPrepare[], domainXml?: string) => {
    if (served.size) throw new PrepareError('busy', 'this move already prepared its disks');
    const policy = await loadSourcePolicy(o.config);
    let plan: DomainShims | null = null;
    if (domainXml !== undefined) {
      try { plan = planShims(domainXml); } catch (e) { throw new PrepareError('bad-request', `the domain's XML: ${(e as Error).message}`); }
      if (!plan) throw new PrepareError('bad-request', 'the domain\'s XML does not enable vmshift');
      const p = plan;
      for (const d of disks) {
        const s = p.disks.find((x) => x.dev === d.name);
        if (!s || s.source !== d.path || s.socket !== d.socket) throw new PrepareError('bad-request', `disk ${d.name}: the domain's XML does not route it through a shim on ${d.socket} over ${d.path}`);
      }
      plan = { ...p, disks: p.disks.filter((x) => disks.some((d) => d.name === x.dev)) };
    }
    for (const d of disks) {
      if (!DISK_NAME_RE.test(d.name)) throw new PrepareError('bad-request', `disk name "${d.name}" must match ${DISK_NAME_RE}`);
      if (!isAbsolute(d.path) || !isAbsolute(d.socket)) throw new PrepareError('bad-request', `disk ${d.name}: the path and the socket must be absolute`);
      if (!Number.isSafeInteger(d.size) || d.size <= 0) throw new PrepareError('bad-request', `disk ${d.name}: bad size ${d.size}`);
      try {
        await checkDestination(d.path, policy);
      } catch (e) {
        if (e instanceof SourceNotAllowedError) throw new PrepareError(e.code === 'forbidden' ? 'forbidden' : 'missing', `disk ${d.name}: ${e.message}`);
        throw e;
      }
      const fs = await statfs(dirname(d.path));
      const free = Number(fs.bavail) * Number(fs.bsize);
      if (free < d.allocated) throw new PrepareError('too-small', `disk ${d.name}: ${dirname(d.path)} has ${free} bytes free, the disk holds ${d.allocated}`);
    }
    for (const d of disks) {
      // O_EXCL: an existing file is never taken over (it may be another guest's disk).
      const fh = await open(d.path, 'wx', 0o600).catch((e: NodeJS.ErrnoException) => {
        throw new PrepareError(e.code === 'EEXIST' ? 'exists' : 'unwritable', `disk ${d.name}: cannot create ${d.path}: ${e.message}`);
      });
      const entry: Served = { name: d.name, path: d.path, socket: d.socket, child: null as unknown as ChildProcess };
      try {
        await fh.truncate(d.size);
      } finally {
        await fh.close();
      }
      served.set(d.name, entry);
      if (plan) continue;
      entry.child = await startShim(o.self, d.path, d.socket);
      o.log(`disk ${d.name}: serving the new thin file ${d.path} on ${d.socket} (pid ${entry.child.pid})`);
    }
    const pids = new Map<string, number>();
    if (plan) {
      const config = await loadHookConfig(o.hookConfig);
      const socket = daemonSocket(config.daemonSocket);
      viaDaemon = { plan, socket };
      try {
        for (const l of await startShims(plan, socket, await defaultGroup(config.group), config.libvirtUri ?? 'qemu:///system')) o.log(l);
      } catch (e) {
        throw new PrepareError('failed', `cannot start the shims through vmshiftd (${socket}): ${(e as Error).message}`);
      }
      const list = await callDaemon<{ shims: Array<{ name: string; pid: number | null }> }>(socket, 'shim.list').catch(() => ({ shims: [] }));
      for (const d of plan.disks) pids.set(d.dev, list.shims.find((x) => x.name === d.name)?.pid ?? 0);
    }
    return [...served.values()].map((s) => ({ name: s.name, path: s.path, socket: s.socket, pid: s.child?.pid ?? pids.get(s.name) ?? 0 }));
  };

  const onControl = async (ctl: Control<DisksMsg>) => {
    for (;;) {
      let m: DisksMsg;
      // The source ended the conversation (its side is done): end ours, so the link can finish.
      try { m = await ctl.next(); } catch { ctl.end(); return; }
      try {
        if (m.op === 'prepare') {
          try {
            ctl.send({ op: 'prepared', disks: await prepare(m.disks, m.domainXml) });
          } catch (e) {
            await undo(`prepare failed: ${(e as Error).message}`);
            throw e;
          }
        } else if (m.op === 'await-socket') {
          await awaitSocket(m.path, Math.min(m.timeoutMs, 120_000));
          ctl.send({ op: 'present', path: m.path });
        } else if (m.op === 'commit') {
          committed = true;
          for (const s of served.values()) s.child?.unref();
          o.log(`commit: the disks ${[...served.keys()].join(', ')} are served here now`);
          ctl.send({ op: 'committed' });
        } else if (m.op === 'abort') {
          await undo(`the source aborted: ${m.reason}`);
          ctl.send({ op: 'aborted' });
        }
      } catch (e) {
        const code = e instanceof PrepareError ? e.code : 'failed';
        o.log(`error: ${(e as Error).message}`);
        ctl.send({ op: 'error', code, message: `on the peer: ${(e as Error).message}` });
      }
    }
  };

  link.on('stream', (s: LinkStream) => {
    if (s.streamName === DISKS_STREAM) { void onControl(new Control<DisksMsg>(s, 'the source host')); return; }
    const m = NBD_STREAM_RE.exec(s.streamName);
    if (!m) return;
    const disk = served.get(m[1]!);
    if (!disk) { s.destroy(new Error(`no disk ${m[1]} was prepared`)); return; }
    spliceUnix(s, disk.socket, (e) => o.log(`disk ${disk.name}: ${e.message}`));
  });
  link.once('failed', (e: Error) => void undo(`link failed: ${e.message}`));
  return {
    status: () => ({
      phase: committed ? 'committed' : served.size ? 'prepared' : 'waiting',
      disks: [...served.values()].map((d) => ({ name: d.name, path: d.path, socket: d.socket })),
    }),
  };
}

/** `vmshift serve FILE --socket S`, detached (it outlives the agent), ready once its control socket answers. */
async function startShim(self: string[], path: string, socket: string): Promise<ChildProcess> {
  const log = openSync(`${socket}.log`, 'a', 0o600);
  const child = spawn(self[0]!, [...self.slice(1), 'serve', path, '--socket', socket], { detached: true, stdio: ['ignore', log, log] });
  closeSync(log);
  for (let i = 0; i < 400; i++) {
    if (child.exitCode !== null) throw new PrepareError('failed', `the shim for ${path} exited (${child.exitCode}); see ${socket}.log`);
    const up = await controlCall(`${socket}.ctl`, 'status', {}, { timeoutMs: 1000 }).then(() => true, () => false);
    if (up) return child;
    await new Promise((r) => setTimeout(r, 25));
  }
  child.kill('SIGTERM');
  throw new PrepareError('failed', `the shim for ${path} did not answer within 10 s; see ${socket}.log`);
}

async function stopShim(s: Served): Promise<void> {
  const child = s.child;
  if (!child || child.exitCode !== null) return;
  const exited = new Promise<void>((r) => child.once('exit', () => r()));
  child.kill('SIGTERM');
  await Promise.race([exited, new Promise((r) => setTimeout(r, 10_000))]);
}

async function awaitSocket(path: string, timeoutMs: number): Promise<void> {
  const until = Date.now() + timeoutMs;
  for (;;) {
    const ok = await new Promise<boolean>((resolve) => {
      const c = connect(path, () => { c.destroy(); resolve(true); });
      c.on('error', () => resolve(false));
    });
    if (ok) return;
    if (Date.now() > until) throw new PrepareError('missing', `nothing listens on ${path} after ${timeoutMs} ms`);
    await new Promise((r) => setTimeout(r, 100));
  }
}
