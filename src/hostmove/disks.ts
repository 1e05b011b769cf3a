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
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { basename, join } from 'node:path';
import { Link } from '../link/link.ts';
import { agentLink, peerName as sshPeerName, type SshPeer } from '../link/agent-link.ts';
import { Control } from '../relay/control.ts';
import { forwardUnix, type UnixForward } from '../relay/unix-splice.ts';
import { controlCall } from '../control/client.ts';
import { ControlError } from '../control/protocol.ts';
import { DISK_NAME_RE, DISKS_STREAM, nbdStreamName, type DisksMsg } from './protocol.ts';

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
  async copy(onEvent: (e: DiskEvent) => void, opts: { bandwidth?: number; degradeAfterMs?: number } = {}): Promise<void> {
    const synced = this.#plans.map(async (p) => {
      const relay = await this.#relay(p);
      let resolveSynced!: () => void;
      const isSynced = new Promise<void>((r) => (resolveSynced = r));
      const job = controlCall(`${p.sourceSocket}.ctl`, 'migrate.start', {
        // The peer created the file (O_EXCL, truncated to size): it reads as zeroes, so holes cost nothing.
        to: `nbd+unix:///${encodeURIComponent(p.exportName)}?socket=${relay}`, mode: 'mirror', handover: 'peer', peer: this.peerName, destinationZero: true,
        bandwidth: opts.bandwidth ?? 0, follow: true, abortOnDisconnect: true, ...(opts.degradeAfterMs ? { degradeAfterMs: opts.degradeAfterMs } : {}),
      }, {
        onEvent: (event, data) => {
          const d = data as Record<string, unknown>;
          if (event === 'phase' && d.phase === 'synchronized') resolveSynced();
          if (event === 'progress') onEvent({ event: 'disk-progress', disk: p.name, phase: String(d.phase), bytesCopied: Number(d.bytesCopied), dataBytes: Number(d.dataBytes), passDone: Number(d.passDone), passTotal: Number(d.passTotal), mirroredBytes: Number(d.mirroredBytes), rate: Number(d.rate), writes: (d.writes as DiskWrites | null) ?? null });
        },
      });
      job.catch(() => {});
      this.#jobs.set(p.name, job);
      await this.#race(Promise.race([isSynced, job.then(() => { throw new ControlError('protocol', `${p.name}: the job ended before it was synchronized`); })]));
    });
    await Promise.all(synced);
    onEvent({ event: 'disks-synchronized' });
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
    this.#relays.push(await forwardUnix(path, (n) => this.link.stream(nbdStreamName(p.name, n))));
    return path;
  }
}
