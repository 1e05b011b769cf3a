// Makes QEMU hold a libvirt guest's I/O while its shim restarts, where libvirt could not say
// so at start (libvirt 9.0 has no `<reconnect delay>` for NBD disks: docs/libvirt.md). The
// hook's `started` call asks for it and returns at once; this runs in the daemon, after the
// hook (a hook must never call libvirt: libvirtd waits for it, and holds the domain's job
// lock meanwhile), through libvirt's monitor passthrough (`virsh qemu-monitor-command`; libvirt
// marks the domain tainted "custom-monitor"). See src/qemu/nbd-reconnect-live.ts for the QMP.
import type { Logger } from 'pino';
import { Virsh } from '../libvirt/virsh.ts';
import { VirshMonitor } from '../qemu/virsh-monitor.ts';
import { giveReconnectDelay } from '../qemu/nbd-reconnect-live.ts';
import { BlockGraphError } from '../qemu/block-graph.ts';
import { QmpError } from '../qemu/transport.ts';
import type { Registry, ShimRecord } from './registry.ts';

/** How long to keep trying: libvirt's job lock (an incoming migration holds it until done). */
const GIVE_UP_MS = 15 * 60_000;
const RETRY_MS = 2_000;
const VIRSH_TIMEOUT_MS = 60_000;

export interface GiverOptions {
  virsh?: (uri: string) => Virsh;
}

export class ReconnectGiver {
  private readonly busy = new Set<string>();
  private readonly virsh: (uri: string) => Virsh;
  private closed = false;

  constructor(
    private readonly registry: Registry,
    private readonly log: Logger,
    opts: GiverOptions = {},
  ) {
    this.virsh = opts.virsh ?? ((uri) => new Virsh({ uri, timeoutMs: VIRSH_TIMEOUT_MS }));
  }

  /**
   * Queue the change for these shims of one libvirt domain (returns at once). Only shims
   * started for a libvirt domain qualify: their record names the domain the daemon talks to.
   */
  request(names: string[], delayS: number): { queued: string[] } {
    const recs = names.map((n) => this.registry.get(n)).filter((r): r is ShimRecord => !!r?.owner && r.desired === 'running');
    const byDomain = new Map<string, ShimRecord[]>();
    for (const r of recs) {
      const key = `${r.owner!.uri}\n${r.owner!.uuid || r.owner!.domain}`;
      byDomain.set(key, [...(byDomain.get(key) ?? []), r]);
    }
    for (const [key, list] of byDomain) {
      if (this.busy.has(key)) continue;
      this.busy.add(key);
      void this.run(list, delayS).finally(() => this.busy.delete(key));
    }
    return { queued: recs.map((r) => r.name) };
  }

  close(): void {
    this.closed = true;
  }

  private async run(recs: ShimRecord[], delayS: number): Promise<void> {
    const owner = recs[0]!.owner!;
    const id = owner.uuid || owner.domain;
    const virsh = this.virsh(owner.uri);
    const deadline = Date.now() + GIVE_UP_MS;
    const pending = [...recs];
    while (pending.length && !this.closed) {
      const rec = pending[0]!;
      try {
        // An incoming migration's QEMU has inactive nodes and libvirt holds its job: wait.
        const state = (await virsh.run(['domstate', '--reason', '--domain', id])).trim();
        if (!/^(running|paused)\b/.test(state) || /migrat/.test(state)) throw new Error(`domain is ${state}`);
        const r = await giveReconnectDelay(new VirshMonitor(id, virsh), rec.socket, rec.export, delayS);
        this.log.info({ shim: rec.name, domain: owner.domain, node: r.node, formatNode: r.formatNode, reconnectDelay: delayS, ms: r.ms }, 'QEMU holds this disk\'s I/O while its shim restarts (reconnect-delay set through the monitor)');
        pending.shift();
      } catch (e) {
        const msg = (e as Error).message;
        // QEMU's refusal will not change; libvirt's lock or a domain still arriving will.
        const final = e instanceof QmpError || e instanceof BlockGraphError || /shut off|Domain not found|failed to get domain/.test(msg);
        if (final || Date.now() > deadline) {
          this.log.warn({ shim: rec.name, domain: owner.domain, err: msg }, 'could not give QEMU a reconnect delay: a restart of this shim fails the guest\'s I/O');
          pending.shift();
          continue;
        }
        this.log.debug({ shim: rec.name, err: msg }, 'reconnect delay: will retry');
        await new Promise((r) => setTimeout(r, RETRY_MS));
      }
    }
  }
}
