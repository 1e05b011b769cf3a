// The libvirt side of the verbs: enable/disable vmshift in a domain's persistent XML, and
// move a disk of a running, enabled domain while recording its new path in that XML.
// Only the inactive (persistent) definition is rewritten: a running guest keeps its devices
// until it next starts, and the hook reads the XML libvirt hands it at that start.
import { resolve } from 'node:path';
import { callDaemon } from '../cli/daemon-client.ts';
import type { CallOptions } from '../control/client.ts';
import { DomainXmlError, disableShim, enableShim, listDisks, mapPaths } from './domain-xml.ts';
import { domainIdentity, planShims, shimName, shimSocket, type ShimmedDisk } from './shim-plan.ts';
import type { Virsh } from './virsh.ts';
import { DEFAULT_RECONNECT_DELAY_S } from '../qemu/nbd-reconnect.ts';

export interface EnableResult {
  domain: string;
  disks: Array<{ dev: string; shim: string; socket: string }>;
  /** The domain runs: the change applies from its next start. */
  running: boolean;
  /**
   * The `<reconnect delay>` asked for, and whether libvirt kept it. libvirt 9.0 drops the
   * element without a word (it came in a later release); QEMU then fails the guest's I/O
   * at once when a shim restarts.
   */
  reconnect: { delay: number; kept: boolean };
}

/** Disks `enable` picks when none is named: every file or block disk (not cdroms). */
function defaultDisks(xml: string): string[] {
  return listDisks(xml)
    .filter((d) => d.device === 'disk' && (d.type === 'file' || d.type === 'block') && d.source)
    .map((d) => d.target);
}

export async function enableDomain(virsh: Virsh, domain: string, opts: { disks?: string[]; runDir: string; reconnectDelay?: number }): Promise<EnableResult> {
  const xml = await virsh.dumpxml(domain, { inactive: true });
  const { domain: name, uuid } = domainIdentity(xml);
  const disks = opts.disks?.length ? opts.disks : defaultDisks(xml);
  if (disks.length === 0) throw new DomainXmlError('disk-not-found', `domain '${name}' has no file or block disk to put a shim under`);
  const socketFor = (dev: string) => shimSocket(opts.runDir, shimName(name, uuid, dev));
  const delay = opts.reconnectDelay ?? DEFAULT_RECONNECT_DELAY_S;
  const next = enableShim(xml, { disks, socketFor, exportName: (dev) => dev, reconnectDelay: delay });
  await virsh.define(next);
  // What libvirt made of it: an element it does not know is dropped, not refused.
  const stored = listDisks(await virsh.dumpxml(domain, { inactive: true })).filter((d) => disks.includes(d.target));
  const kept = delay > 0 && stored.every((d) => d.source?.kind === 'nbd' && d.source.reconnectDelay === delay);
  const running = (await virsh.domstate(domain)) !== 'shut off';
  return { domain: name, disks: disks.map((dev) => ({ dev, shim: shimName(name, uuid, dev), socket: socketFor(dev) })), running, reconnect: { delay, kept } };
}

export async function disableDomain(virsh: Virsh, domain: string): Promise<{ domain: string; disks: Array<{ dev: string; source: string }>; running: boolean }> {
  const xml = await virsh.dumpxml(domain, { inactive: true });
  const plan = planShims(xml);
  if (!plan) throw new DomainXmlError('not-enabled', `vmshift is not enabled in domain '${domain}'`);
  // The recorded sources already hold any path a migration moved the disk to.
  await virsh.define(disableShim(xml));
  const running = (await virsh.domstate(domain)) !== 'shut off';
  return { domain: plan.domain, disks: plan.disks.map((d) => ({ dev: d.dev, source: d.source })), running };
}

export interface MigrateDomainOptions {
  disk: string;
  to: string;
  daemonSocket: string;
  /** migrate.start parameters (mode, maxDowntimeMs, bandwidth, ...). */
  params?: Record<string, unknown>;
  onEvent?: CallOptions['onEvent'];
  signal?: AbortSignal;
}

/** The shimmed disk `dev` of an enabled domain, with a clear error for every other case. */
export function shimmedDisk(xml: string, domain: string, dev: string): ShimmedDisk {
  const plan = planShims(xml);
  if (!plan) throw new DomainXmlError('not-enabled', `vmshift is not enabled in domain '${domain}': run 'vmshift enable ${domain}' first`);
  const disk = plan.disks.find((d) => d.dev === dev);
  if (!disk) {
    const all = listDisks(xml).map((d) => d.target);
    const why = all.includes(dev) ? 'does not go through a vmshift shim' : 'does not exist';
    throw new DomainXmlError('disk-not-found', `disk '${dev}' of domain '${domain}' ${why} (shimmed disks: ${plan.disks.map((d) => d.dev).join(', ') || 'none'})`);
  }
  return disk;
}

/**
 * Move disk `dev` of a running, enabled domain to `to` through its shim (the job runs in
 * the shim, driven by vmshiftd), then record the new path in the domain's persistent
 * metadata so the next start, and `vmshift disable`, use it.
 */
export async function migrateDomainStorage(virsh: Virsh, domain: string, opts: MigrateDomainOptions): Promise<{ result: unknown; from: string; to: string }> {
  const disk = shimmedDisk(await virsh.dumpxml(domain, { inactive: true }), domain, opts.disk);
  const state = await virsh.domstate(domain);
  if (state !== 'running' && state !== 'paused') throw new Error(`domain '${domain}' is ${state}: migrate-storage moves the disks of a running domain (move a stopped one's files yourself)`);
  const to = resolve(opts.to);
  const result = await callDaemon(opts.daemonSocket, 'job.start', { ...opts.params, name: disk.name, to, follow: true }, { onEvent: opts.onEvent, signal: opts.signal, timeoutMs: 0 });
  // Re-read: the definition may have changed while the job ran. mapPaths rewrites the saved
  // source in vmshift's record (the live <source> is the NBD socket and stays).
  const fresh = await virsh.dumpxml(domain, { inactive: true });
  try {
    await virsh.define(mapPaths(fresh, { [disk.source]: to }));
  } catch (e) {
    throw new Error(`the disk moved to ${to}, but recording that in domain '${domain}' failed: ${(e as Error).message}; keep the domain running and retry with 'vmshift enable' after fixing libvirt, or the next start would use ${disk.source}`);
  }
  return { result, from: disk.source, to };
}
