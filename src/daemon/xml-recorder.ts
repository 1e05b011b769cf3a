// Keeps a libvirt domain's persistent XML in step with where its disks live. The truth is
// each shim's state file (made durable at the switch-over); the supervisor follows it into
// the registry's `backing` and tells this recorder, which rewrites the path vmshift keeps in
// the domain's <metadata> (`virsh define`), retrying while libvirtd is away. It runs in the
// daemon, never in a hook (a hook calling libvirt deadlocks libvirtd) and never only in a CLI
// (which can die): a move is recorded even when the command that started it is gone.
// It also deals with a shim left running when its domain stopped while vmshiftd was down.
import type { Logger } from 'pino';
import { mapPaths } from '../libvirt/domain-xml.ts';
import { planShims } from '../libvirt/shim-plan.ts';
import { Virsh, VirshError } from '../libvirt/virsh.ts';
import { lineage, loadShimState } from '../shim/state.ts';
import type { Registry, ShimRecord } from './registry.ts';

/** Retry delays after a failed record, growing to this (libvirtd restarting, a slow define). */
const MAX_RETRY_MS = 30_000;
/** `virsh define` of a running domain re-probes QEMU: tens of seconds on a loaded host. */
const VIRSH_TIMEOUT_MS = 180_000;

export interface RecorderOptions {
  /** virsh for a URI (tests inject one). */
  virsh?: (uri: string) => Virsh;
}

export class XmlRecorder {
  private readonly busy = new Set<string>();
  private readonly retry = new Map<string, { failures: number; at: number }>();
  private readonly virsh: (uri: string) => Virsh;

  constructor(
    private readonly registry: Registry,
    private readonly log: Logger,
    opts: RecorderOptions = {},
  ) {
    this.virsh = opts.virsh ?? ((uri) => new Virsh({ uri, timeoutMs: VIRSH_TIMEOUT_MS }));
  }

  /** Record the shim's backing in its owner's XML if that is not done yet (returns at once). */
  poke(name: string): void {
    const rec = this.registry.get(name);
    if (!rec?.owner || !rec.backing || rec.recorded === rec.backing || this.busy.has(name)) return;
    const r = this.retry.get(name);
    if (r && Date.now() < r.at) return;
    this.busy.add(name);
    void this.record(rec)
      .then(
        () => this.retry.delete(name),
        (e) => {
          const failures = (this.retry.get(name)?.failures ?? 0) + 1;
          this.retry.set(name, { failures, at: Date.now() + Math.min(MAX_RETRY_MS, 1000 * 2 ** (failures - 1)) });
          this.log.warn({ shim: name, domain: rec.owner?.domain, backing: rec.backing, err: (e as Error).message, failures }, 'could not record the disk path in the domain XML; will retry');
        },
      )
      .finally(() => this.busy.delete(name));
  }

  private async record(rec: ShimRecord): Promise<void> {
    const owner = rec.owner!, backing = rec.backing!;
    const virsh = this.virsh(owner.uri);
    const id = owner.uuid || owner.domain;
    const xml = await virsh.dumpxml(id, { inactive: true });
    const disk = planShims(xml)?.disks.find((d) => d.dev === owner.dev && d.name === rec.name);
    const state = await loadShimState(rec.statePath).catch(() => undefined);
    if (!disk) {
      this.log.warn({ shim: rec.name, domain: owner.domain, dev: owner.dev }, 'the domain no longer routes this disk through the shim; its XML is left alone');
    } else if (disk.source !== backing) {
      // Only a path this disk has had is rewritten: anything else is the operator's edit.
      if (state && !lineage(state).has(disk.source)) {
        this.log.warn({ shim: rec.name, domain: owner.domain, recordedPath: disk.source, backing }, 'the domain XML names a path this disk never had; left alone');
      } else {
        const t0 = Date.now();
        await virsh.define(mapPaths(xml, { [disk.source]: backing }));
        this.log.info({ shim: rec.name, domain: owner.domain, dev: owner.dev, from: disk.source, backing, ms: Date.now() - t0 }, 'recorded the disk path in the domain XML');
      }
    }
    const now = this.registry.get(rec.name);
    if (now && now.backing === backing) await this.registry.put({ ...now, recorded: backing });
  }

  /**
   * After a daemon (re)start: is the owner domain of this adopted shim still running? A shim
   * whose domain stopped while vmshiftd was down (the hook's `release` could not reach it)
   * is stopped. Returns true when it should be stopped. libvirt unreachable: keep it.
   */
  async ownerStopped(rec: ShimRecord): Promise<boolean> {
    if (!rec.owner) return false;
    try {
      return (await this.virsh(rec.owner.uri).domstate(rec.owner.uuid || rec.owner.domain)) === 'shut off';
    } catch (e) {
      // A domain that is gone for good cannot need its shim either.
      if (e instanceof VirshError && e.kind === 'no-domain') return true;
      this.log.warn({ shim: rec.name, domain: rec.owner.domain, err: (e as Error).message }, 'could not ask libvirt whether the domain runs; shim kept');
      return false;
    }
  }
}
