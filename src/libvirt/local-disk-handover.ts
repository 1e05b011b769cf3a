// The disk handover for a vmshift-enabled domain whose disks are local to this host: each disk
// goes to a new thin file on the peer, through the shims (src/hostmove/), over the migration's
// own link (the peer's agent runs with --disks beside --libvirt-socket).
//   prepare   every local disk must be served by a shim here (the domain is enabled); the new
//             path on the peer is `--disk DEV=PATH` or `--to-dir DIR`/<file name>. The XML
//             libvirt defines there (`virsh migrate --xml/--persistent-xml`) is this one with
//             those paths in vmshift's record; the peer creates each file (O_EXCL, sparse) in
//             its datastores and starts its shim through its vmshiftd exactly as its libvirt
//             hook would, at the socket the domain names (the same path on both hosts)
//   copy      each source shim's job copies its disk to the peer's shim (selective: holes and
//             zeroes cost nothing) and then holds a synchronized mirror: every guest write is
//             acknowledged once both hosts have it; resolves when every disk is synchronized
//             (a mirrored write the peer leaves unanswered for DEGRADE_AFTER_MS, the link being
//             cut, is answered by the source alone and copied again once the link is back)
//   settle    the source QEMU is gone, the peer's paused: wait until each job's mirror holds
//             every acknowledged write (a degraded one caught up) before the peer's guest runs
//   commit    the guest runs on the peer: the peer keeps its shims; each source shim hands the
//             disk over (refuses every request from then on) unless this host's libvirt
//             `release` hook stopped it first (the guest is gone from here either way)
//   rollback  the source jobs roll back (the guest keeps its disks here), the peer stops its
//             shims and removes its files
// The source file is never written by the move: it stays as the guest left it.
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import type { Link } from '../link/link.ts';
import { DEGRADE_AFTER_MS, PeerDisks, planDisks, settleTimeoutMs, type DiskEvent, type DiskPlan, type PeerTarget } from '../hostmove/disks.ts';
import { mapPaths } from './domain-xml.ts';
import { planShims } from './shim-plan.ts';
import { startedBy } from './shim-control.ts';
import { callDaemon, daemonSocket } from '../cli/daemon-client.ts';
import { HandoverError, type DiskHandover, type DomainDisk, type PeerProbe } from './disk-handover.ts';


export interface LocalDisksOptions {
  /** The peer's directory for the new files (named as the files here). */
  toDir?: string;
  /** A new path on the peer per disk target (`--disk vda=PATH`), before --to-dir. */
  paths: Record<string, string>;
  /** Bytes per second for the copy; 0 = no limit. */
  bandwidth?: number;
}

export interface LocalDisksContext {
  domain: string;
  disks: DomainDisk[];
  /** The domain's live XML, and its migratable forms (live and persistent) for the peer. */
  xml: string;
  migratableXml: string;
  inactiveXml: string;
  persistent: boolean;
  link: Link;
  target: PeerTarget;
  /** A private directory of this migration (the XML files virsh reads). */
  workDir: string;
  onEvent: (e: DiskEvent | { event: 'warning'; message: string }) => void;
  /** The link's hold time: a settle waits at most that plus the catch-up. */
  holdMs?: number;
}

export class LocalDisksHandover implements DiskHandover {
  readonly kind = 'local-disks';
  #peer: PeerDisks | null = null;
  #plans: DiskPlan[] = [];
  #flags: string[] = [];
  /** This host's vmshiftd, which runs the source shims. */
  #daemon = daemonSocket();

  constructor(private readonly ctx: LocalDisksContext, private readonly opts: LocalDisksOptions) {}

  get plans(): DiskPlan[] { return this.#plans; }

  async prepare(_probe: PeerProbe): Promise<void> {
    const c = this.ctx;
    const plan = planShims(c.xml);
    if (!plan) throw new HandoverError(`${c.domain} is not enabled with vmshift: its local disks need shims to move with it (vmshift enable ${c.domain})`);
    const local = c.disks.filter((d) => (d.type === 'file' || d.type === 'block') && d.source !== '-' && d.device !== 'cdrom');
    if (local.length) throw new HandoverError(`${c.domain}: disk ${local[0]!.target} (${local[0]!.source}) is not served by a vmshift shim: enable vmshift for every local disk (vmshift enable ${c.domain} --disk ${local[0]!.target}) first`);
    for (const dev of Object.keys(this.opts.paths)) {
      if (!plan.disks.some((d) => d.dev === dev)) throw new HandoverError(`--disk ${dev}=...: ${c.domain} has no disk ${dev} served by a shim (it has ${plan.disks.map((d) => d.dev).join(', ')})`);
    }
    try {
      this.#plans = await planDisks(plan.disks.map((d) => ({ sourceSocket: d.socket, destPath: this.opts.paths[d.dev], destSocket: d.socket, name: d.dev, exportName: d.export })), this.opts.toDir);
    } catch (e) {
      throw new HandoverError(`${c.domain}: ${(e as Error).message}`);
    }
    // The recorded path of each disk (what the hook starts its shim on) becomes the new file.
    const mapping = Object.fromEntries(plan.disks.map((d, i) => [d.source, this.#plans[i]!.destPath]));
    const live = mapPaths(c.migratableXml, mapping);
    const liveFile = join(c.workDir, 'dest.xml');
    writeFileSync(liveFile, live, { mode: 0o600 });
    this.#flags = ['--xml', liveFile];
    if (c.persistent) {
      const persistentFile = join(c.workDir, 'dest-persistent.xml');
      writeFileSync(persistentFile, mapPaths(c.inactiveXml, mapping), { mode: 0o600 });
      this.#flags.push('--persistent-xml', persistentFile);
    }
    const peer = PeerDisks.over(c.link, c.target);
    this.#peer = peer;
    try {
      await peer.prepare(this.#plans, c.onEvent, live);
    } catch (e) {
      throw new HandoverError((e as Error).message);
    }
  }

  async copy(): Promise<void> {
    await this.#peer!.copy(this.ctx.onEvent, { bandwidth: this.opts.bandwidth ?? 0, degradeAfterMs: DEGRADE_AFTER_MS });
  }

  async settle(): Promise<void> {
    await this.#peer!.inSync(settleTimeoutMs(this.ctx.holdMs));
  }

  /** The copy ends in a synchronized mirror already. */
  async sync(): Promise<void> {}

  virshFlags(): string[] {
    return this.#flags;
  }

  async keep(): Promise<void> {
    await this.#peer!.keepPeer();
  }

  async commit(): Promise<void> {
    const peer = this.#peer!;
    const moved = await peer.handover().catch((e: Error) => { this.ctx.onEvent({ event: 'warning', message: e.message }); return null; });
    if (moved) this.ctx.onEvent({ event: 'disks-moved', disks: moved });
    await peer.close();
    // This host's `release` hook could not stop the source shims (vmshiftd refuses while a job
    // runs, and the job ran until the handover just now): stop them here, as the hook would
    // have. Each serves nothing any more (every request is refused: the disk moved).
    const plan = planShims(this.ctx.xml)!;
    // Its state file is dropped too: the disk left this host (a move back starts afresh).
    for (const d of plan.disks) {
      await callDaemon(this.#daemon, 'shim.stop', { name: d.name, startedBy: startedBy(plan) }, { timeoutMs: 30_000 })
        .then(() => callDaemon(this.#daemon, 'shim.forget', { name: d.name }))
        .catch((e: Error) => {
          this.ctx.onEvent({ event: 'warning', message: `the source shim '${d.name}' (moved to the peer) could not be stopped through vmshiftd (${this.#daemon}): ${e.message}; stop it with vmshift shim-stop ${d.name}` });
        });
    }
  }

  async rollback(): Promise<void> {
    if (!this.#peer) return;
    await this.#peer.abort('the migration was rolled back').catch(() => {});
    await this.#peer.close();
  }
}
