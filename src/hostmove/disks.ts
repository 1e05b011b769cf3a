// Moving a guest's local disks to the peer host, from the source host's side: the seam both
// migration paths use (the QMP path, `vmshift migrate --qmp ... --disk`; the libvirt path,
// src/libvirt/local-disk-handover.ts). In order:
//   PeerDisks.open     a link to the peer (SSH carrier, `vmshift link-agent --disks` there),
//   or PeerDisks.over  the migration's own link (its agent also runs with --disks)
//   prepare(plans)     the peer creates a thin file per disk in its datastore and starts a
//                      shim on it at the socket its QEMU will use (src/hostmove/peer.ts)
//   copy(onEvent)      each source shim runs a storage-migration job (mode mirror, handover
//                      'peer') whose destination is the peer's shim, reached by NBD over a
//                      link stream: resolves once every disk is a synchronized mirror (every
//                      guest write is acknowledged once both hosts have it)
//   inSync()           (with copy's degradeAfterMs) before the peer's guest may run: each job's
//                      mirror holds every acknowledged write (a degraded one caught up)
//   handover()         after the memory phase: each source job switches over (the source
//                      shim stops serving: src/migrate/peer-handover.ts), then the peer keeps
//                      its shims (commit)
//   abort(reason)      before the handover: the source jobs roll back (the guest stays on the
//                      source disks), the peer stops its shims and removes its files
// NBD over the link: the source shim's NBD client connects to a unix socket this process
// listens on (in a 0700 directory), and every connection becomes a link stream; a reset or a
// cut of the carrier is then a stall to the NBD client, and the link resends what was lost,
// so the copy goes on from where it was instead of from zero.
// A source shim killed mid-job (SIGKILL) and restarted (by vmshiftd, or whoever runs it): the
// job's control call ends with `closed`; this process waits for the shim's control socket to
// answer again (at most `holdMs`), for the dead shim's NBD streams to the peer to have ended
// (a late write of the dead process can then no longer land after the new one's), and asks the
// new shim to resume the job (migrate.resume) from the state it persisted, against the same
// peer shim (which kept running on the peer), reporting a `disk-resumed` event.
import { mkdtempSync, rmSync } from 'node:fs';
import { randomUUID } from 'node:crypto';
import type { Duplex } from 'node:stream';
import { tmpdir } from 'node:os';
import { basename, join } from 'node:path';
import { Link } from '../link/link.ts';
import { agentLink, peerName as sshPeerName, type SshPeer } from '../link/agent-link.ts';
import { Control } from '../relay/control.ts';
import { forwardUnix, type UnixForward } from '../relay/unix-splice.ts';
import { controlCall } from '../control/client.ts';
import { ControlError } from '../control/protocol.ts';
import { DISK_NAME_RE, DISKS_STREAM, nbdStreamName, type DisksMsg } from './protocol.ts';

/**
 * A guest write the peer has not answered within this time is answered by the source alone
 * (the link is cut, or the peer stalls): long enough that a healthy but loaded link never
 * degrades (its writes take milliseconds; the link resends a reset within ~1 s), short enough
 * that the guest's own I/O timeouts (30 s in Linux) are never near. Both paths use it.
 */
export const DEGRADE_AFTER_MS = 2000;

/** How long the peer may take to catch up once the source guest stopped (the hold time bounds a cut). */
export const settleTimeoutMs = (holdMs = 60_000) => Math.max(120_000, holdMs * 2);

/** Restarts of one disk's source shim a move rides out. */
const MAX_RESUMES = 5;

export interface DiskPlan {
  /** The disk's name in streams and messages. */
  name: string;
  /** The source shim's NBD socket (its control socket is beside it). */
  sourceSocket: string;
  /** The new file on the peer, and the socket its shim serves it on. */
  destPath: string;
  destSocket: string;
  /** The NBD export name, the same on both shims ('disk', or the domain's, e.g. vda). */
  exportName: string;
  size: number;
  allocated: number;
}

export interface PeerTarget extends SshPeer {
  /** The peer's vmshiftd config (its datastores); default its /etc/vmshift/vmshiftd.json. */
  peerConfig?: string;
}

export type DiskEvent =
  | { event: 'disks-prepared'; disks: Array<{ name: string; path: string; socket: string; pid: number }> }
  | { event: 'disk-progress'; disk: string; phase: string; bytesCopied: number; dataBytes: number; passDone: number; passTotal: number; mirroredBytes: number; rate: number; writes: DiskWrites | null }
  | { event: 'disks-synchronized' }
  | { event: 'disk-shim-lost'; disk: string; why: string; lastBytesCopied: number; lastCursor: number }
  | { event: 'disk-resumed'; disk: string; resumedFrom: number; copiedEverything: boolean; dataBytesBefore: number; restartBytes: number; recopyBound: number; note: string | null }
  | { event: 'disks-moved'; disks: DiskMoved[] }
  | { event: 'carrier'; state: string; why: string };

/** The guest's writes during a job's mirror (src/migrate/context.ts JobFigures.writes). */
export interface DiskWrites { count: number; maxMs: number; p99Ms: number; degradedWrites: number; laggingBytes: number }

/** What a disk's job reported at its handover. */
export interface DiskMoved { name: string; bytesCopied: number; mirroredBytes: number; passes: number; writes: DiskWrites | null }

/** `--disk SOCKET=PATH` or `--to-dir DIR` (then PATH is DIR/basename(backing)); the peer's socket defaults to the same path. */
export async function planDisks(specs: Array<{ sourceSocket: string; destPath?: string; destSocket?: string; name?: string; exportName?: string }>, toDir?: string): Promise<DiskPlan[]> {
  const plans: DiskPlan[] = [];
  for (const [i, s] of specs.entries()) {
    const st = await controlCall<{ backing: string; size: number; job: string | null }>(`${s.sourceSocket}.ctl`, 'status', {}, { timeoutMs: 5000 });
    if (st.job) throw new ControlError('busy', `${s.sourceSocket}: a ${st.job} job is already running on this disk`);
    const destPath = s.destPath ?? (toDir ? join(toDir, basename(st.backing)) : undefined);
    if (!destPath) throw new ControlError('bad-request', `${s.sourceSocket}: where on the peer? give --disk SOCKET=PATH or --to-dir DIR`);
    const name = s.name ?? `disk${i}`;
    if (!DISK_NAME_RE.test(name)) throw new ControlError('bad-request', `disk name "${name}" must match ${DISK_NAME_RE}`);
    const exportName = s.exportName ?? 'disk';
    const allocated = await allocatedBytes(s.sourceSocket, exportName).catch(() => st.size);
    plans.push({ name, sourceSocket: s.sourceSocket, destPath, destSocket: s.destSocket ?? s.sourceSocket, exportName, size: st.size, allocated });
  }
  return plans;
}

/** What the shim reports as allocated (block status), or the size when it cannot tell. */
async function allocatedBytes(socket: string, exportName: string): Promise<number> {
  const { openDevice } = await import('../block/open.ts');
  const dev = await openDevice(`nbd+unix:///${encodeURIComponent(exportName)}?socket=${socket}`, { readOnly: true, connections: 1 });
  try {
    let n = 0;
    for (let off = 0; off < dev.size;) {
      const ext = await dev.blockStatus(off, Math.min(dev.size - off, 2 ** 31));
      if (ext.length === 0) break;
      for (const e of ext) { if (!e.zero) n += e.length; off = e.offset + e.length; }
    }
    return n;
  } finally {
    await dev.close();
  }
}

export class PeerDisks {
  readonly link: Link;
  readonly peerName: string;
  #ctl: Control<DisksMsg> | null = null;
  #dir = mkdtempSync(join(tmpdir(), 'vmshift-disks-'));
  #relays: UnixForward[] = [];
  #jobs = new Map<string, Promise<unknown>>();
  #plans: DiskPlan[] = [];
  #prepared = false;
  #failed: Promise<never>;
  #ownsLink: boolean;
  /** Each disk's NBD streams to the peer that are still open. */
  #streams = new Map<string, Set<Duplex>>();
  #aborting = false;

  /** `link`: an existing link whose agent also serves the disks (the libvirt path's), else one of its own. */
  private constructor(readonly target: PeerTarget, link?: Link) {
    this.peerName = sshPeerName(target);
    this.#ownsLink = !link;
    this.link = link ?? agentLink(target, 'disks', 'disks', ['--disks', ...(target.peerConfig ? ['--disks-config', target.peerConfig] : [])]);
    this.#failed = new Promise<never>((_, reject) => this.link.once('failed', (e: Error) => reject(new ControlError('link-failed', `the link to ${this.peerName} failed: ${e.message}`))));
    this.#failed.catch(() => {});
  }

  /** Over a link that is up already and whose agent runs with `--disks` (it stays the caller's to finish). */
  static over(link: Link, target: PeerTarget): PeerDisks {
    const p = new PeerDisks(target, link);
    p.#ctl = new Control<DisksMsg>(link.stream(DISKS_STREAM), p.peerName);
    return p;
  }

  static async open(target: PeerTarget, onEvent: (e: DiskEvent) => void): Promise<PeerDisks> {
    const p = new PeerDisks(target);
    p.link.on('carrier', (state: string, why: string) => onEvent({ event: 'carrier', state, why }));
    await p.#race(new Promise((r) => p.link.once('carrier', r)));
    p.#ctl = new Control<DisksMsg>(p.link.stream(DISKS_STREAM), p.peerName);
    return p;
  }

  #race<T>(x: Promise<T>): Promise<T> {
    return Promise.race([x, this.#failed]);
  }

  async #ask(m: DisksMsg, want: DisksMsg['op']): Promise<DisksMsg> {
    this.#ctl!.send(m);
    const r = await this.#race(this.#ctl!.next());
    if (r.op === 'error') throw new ControlError(r.code, r.message);
    if (r.op !== want) throw new ControlError('protocol', `the peer answered "${r.op}" to ${m.op}`);
    return r;
  }

  /** The peer creates the thin files and serves each on its socket; nothing changes there if any fails. */
  /** `domainXml`: the domain's XML as it will be on the peer; its shims are then started there as its libvirt hook starts them (through vmshiftd). */
  async prepare(plans: DiskPlan[], onEvent: (e: DiskEvent) => void, domainXml?: string): Promise<void> {
    this.#plans = plans;
    const r = await this.#ask({ op: 'prepare', disks: plans.map((p) => ({ name: p.name, size: p.size, allocated: p.allocated, path: p.destPath, socket: p.destSocket })), ...(domainXml ? { domainXml } : {}) }, 'prepared');
    this.#prepared = true;
    if (r.op === 'prepared') onEvent({ event: 'disks-prepared', disks: r.disks });
  }

  /** Resolves once a unix socket on the peer accepts connections (e.g. its QEMU's QMP). */
  async awaitPeerSocket(path: string, timeoutMs = 60_000): Promise<void> {
    await this.#ask({ op: 'await-socket', path, timeoutMs }, 'present');
  }

  /**
   * Start every disk's job; resolves when all are synchronized mirrors, rejects when one fails.
   * `degradeAfterMs`: a mirrored guest write the peer leaves unanswered that long (a cut link)
   * is answered by the source alone and copied again once the link is back; the caller must
   * then wait for inSync() before the peer's guest runs.
   */
  async copy(onEvent: (e: DiskEvent) => void, opts: { bandwidth?: number; degradeAfterMs?: number; holdMs?: number } = {}): Promise<void> {
    const synced = this.#plans.map(async (p) => {
      const relay = await this.#relay(p);
      let resolveSynced!: () => void;
      const isSynced = new Promise<void>((r) => (resolveSynced = r));
      const job = this.#runJob(p, {
        // The peer created the file (O_EXCL, truncated to size): it reads as zeroes, so holes cost nothing.
        to: `nbd+unix:///${encodeURIComponent(p.exportName)}?socket=${relay}`, mode: 'mirror', handover: 'peer', peer: this.peerName, destinationZero: true,
        bandwidth: opts.bandwidth ?? 0, follow: true, abortOnDisconnect: true, ...(opts.degradeAfterMs ? { degradeAfterMs: opts.degradeAfterMs } : {}),
        // Who the job is, for the state a restarted shim resumes it from.
        jobId: `${p.name}-${randomUUID()}`, destinationId: `${this.peerName}:${p.destSocket}:${p.destPath}`,
      }, onEvent, resolveSynced, opts.holdMs ?? 60_000);
      job.catch(() => {});
      this.#jobs.set(p.name, job);
      await this.#race(Promise.race([isSynced, job.then(() => { throw new ControlError('protocol', `${p.name}: the job ended before it was synchronized`); })]));
    });
    await Promise.all(synced);
    onEvent({ event: 'disks-synchronized' });
  }

  /**
   * Run a disk's job to its end; when its shim dies (the call ends with `closed`) and comes
   * back within `holdMs`, resume the job there. A job's own failure ends it.
   */
  async #runJob(p: DiskPlan, params: Record<string, unknown>, onEvent: (e: DiskEvent) => void, onSynced: () => void, holdMs: number): Promise<unknown> {
    let method = 'migrate.start', lastBytes = 0, lastCursor = 0;
    for (let restarts = 0; ; restarts++) {
      try {
        return await controlCall(`${p.sourceSocket}.ctl`, method, params, {
          onEvent: (event, data) => {
            const d = data as Record<string, unknown>;
            if (event === 'phase' && d.phase === 'synchronized') onSynced();
            if (event === 'resumed' && d) {
              const r = d as { resumedFrom: number; copiedEverything: boolean; dataBytesBefore: number; restartBytes: number; note: string | null };
              // At most what the old job copied since its last persist is copied again.
              onEvent({ event: 'disk-resumed', disk: p.name, ...r, recopyBound: r.copiedEverything ? lastBytes : Math.max(0, lastBytes - r.dataBytesBefore) });
            }
            if (event === 'progress' && d.phase !== undefined) {
              lastBytes = Number(d.dataBytes);
              if (d.phase === 'mirror') lastCursor = Number(d.passDone);
              onEvent({ event: 'disk-progress', disk: p.name, phase: String(d.phase), bytesCopied: Number(d.bytesCopied), dataBytes: Number(d.dataBytes), passDone: Number(d.passDone), passTotal: Number(d.passTotal), mirroredBytes: Number(d.mirroredBytes), rate: Number(d.rate), writes: (d.writes as DiskWrites | null) ?? null });
            }
          },
        });
      } catch (e) {
        if (!(e instanceof ControlError && e.code === 'closed') || this.#aborting || restarts >= MAX_RESUMES) throw e;
        onEvent({ event: 'disk-shim-lost', disk: p.name, why: e.message, lastBytesCopied: lastBytes, lastCursor });
        await this.#untilShimBack(p, holdMs);
        await this.#untilStreamsEnded(p, holdMs);
        method = 'migrate.resume';
      }
    }
  }

  /** The source shim's control socket answers again (it was restarted), within `holdMs`. */
  async #untilShimBack(p: DiskPlan, holdMs: number): Promise<void> {
    const deadline = Date.now() + holdMs;
    for (;;) {
      const up = await controlCall(`${p.sourceSocket}.ctl`, 'status', {}, { timeoutMs: 2000 }).then(() => true, () => false);
      if (up) return;
      if (this.#aborting) throw new ControlError('aborted', `${p.name}: the move is being aborted`);
      if (Date.now() > deadline) throw new ControlError('shim-lost', `${p.name}: the source shim on ${p.sourceSocket} went away mid-copy and did not come back within ${Math.round(holdMs / 1000)} s: the move is aborted, the guest keeps its source disk`);
      await new Promise((r) => setTimeout(r, 200));
    }
  }

  /** The dead shim's NBD streams to the peer have ended (whatever it had sent was applied or dropped there). */
  async #untilStreamsEnded(p: DiskPlan, holdMs: number): Promise<void> {
    const deadline = Date.now() + holdMs;
    const open = this.#streams.get(p.name);
    while (open && open.size > 0) {
      if (Date.now() > deadline) throw new ControlError('shim-lost', `${p.name}: ${open.size} NBD streams of the dead source shim did not end on ${this.peerName} within ${Math.round(holdMs / 1000)} s: not resumed`);
      await new Promise((r) => setTimeout(r, 50));
    }
  }

  /**
   * The memory phase has ended (the guest runs on the peer): first the peer keeps its shims
   * for good (commit), so nothing can remove a disk the guest now runs on; then each source
   * shim hands over and stops serving. A source that fails to hand over is reported, and its
   * guest on this host is stopped anyway (postmigrate).
   */
  async handover(): Promise<DiskMoved[]> {
    await this.#ask({ op: 'commit' }, 'committed');
    const failed: string[] = [];
    const moved: DiskMoved[] = [];
    for (const p of this.#plans) {
      await controlCall<{ bytesCopied: number; mirroredBytes: number; pass: number; writes: DiskWrites | null }>(`${p.sourceSocket}.ctl`, 'migrate.handover', {}, { timeoutMs: 60_000 })
        .then((r) => moved.push({ name: p.name, bytesCopied: r.bytesCopied, mirroredBytes: r.mirroredBytes, passes: r.pass, writes: r.writes ?? null }), (e: Error) => failed.push(`${p.name}: ${e.message}`));
      await this.#jobs.get(p.name)?.catch(() => {});
    }
    if (failed.length) throw new ControlError('handover-failed', `the guest runs on ${this.peerName} with its disks there, but these source shims did not hand over: ${failed.join('; ')}`);
    return moved;
  }

  /** Resolves once every disk's peer holds every acknowledged write (after a cut: caught up). */
  async inSync(timeoutMs: number): Promise<void> {
    await Promise.all(this.#plans.map((p) => this.#race(controlCall(`${p.sourceSocket}.ctl`, 'migrate.insync', { timeoutMs }, { timeoutMs: timeoutMs + 5000 }))));
  }

  /** In doubt whether the guest runs on the peer: the peer keeps its files and shims. */
  async keepPeer(): Promise<void> {
    if (this.#prepared) await this.#ask({ op: 'commit' }, 'committed');
  }

  /** Before the handover: roll the source jobs back and have the peer remove what it made. */
  async abort(reason: string): Promise<void> {
    this.#aborting = true;
    for (const p of this.#plans) {
      if (this.#jobs.has(p.name)) await controlCall(`${p.sourceSocket}.ctl`, 'migrate.abort', {}, { timeoutMs: 60_000 }).catch(() => {});
    }
    if (this.#prepared && this.link.state === 'running') await this.#ask({ op: 'abort', reason }, 'aborted').catch(() => {});
    this.#prepared = false;
  }

  /** End the link (BYE once both sides are done) and the local relays. */
  async close(): Promise<void> {
    this.#ctl?.end();
    for (const r of this.#relays) r.close();
    if (this.#ownsLink && this.link.state === 'running') {
      await Promise.race([this.link.finish().catch(() => {}), new Promise((r) => setTimeout(r, 5000))]);
      if (this.link.state === 'running') this.link.abort('the disks moved');
    }
    rmSync(this.#dir, { recursive: true, force: true });
  }

  get stats() {
    return this.link.stats();
  }

  /** A unix socket here whose every connection is a link stream to the peer's shim for `p`. */
  async #relay(p: DiskPlan): Promise<string> {
    const path = join(this.#dir, `${p.name}.nbd`);
    const open = new Set<Duplex>();
    this.#streams.set(p.name, open);
    this.#relays.push(await forwardUnix(path, (n) => {
      const s = this.link.stream(nbdStreamName(p.name, n));
      open.add(s);
      s.once('close', () => open.delete(s));
      return s;
    }));
    return path;
  }
}
