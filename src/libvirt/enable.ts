// The libvirt side of the verbs: enable/disable vmshift in a domain's persistent XML, and
// move a disk of a running, enabled domain while recording its new path in that XML.
// Only the inactive (persistent) definition is rewritten: a running guest keeps its devices
// until it next starts, and the hook reads the XML libvirt hands it at that start.
import { resolve } from 'node:path';
import { callDaemon } from '../cli/daemon-client.ts';
import type { CallOptions } from '../control/client.ts';
import type { ControlError } from '../control/protocol.ts';
import type { JobResult } from '../migrate/job.ts';
import { DomainXmlError, disableShim, enableShim, listDisks } from './domain-xml.ts';
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

/** Names of the shims vmshiftd runs now (empty when it is not reachable). */
async function servingShims(daemonSocket: string | undefined): Promise<Set<string>> {
  if (!daemonSocket) return new Set();
  const r = await callDaemon<{ shims: Array<{ name: string; desired: string }> }>(daemonSocket, 'shim.list', {}, { timeoutMs: 10_000 }).catch(() => ({ shims: [] }));
  return new Set(r.shims.filter((s) => s.desired === 'running').map((s) => s.name));
}

/** Disks `enable` picks when none is named: every file or block disk (not cdroms). */
function defaultDisks(xml: string): string[] {
  return listDisks(xml)
    .filter((d) => d.device === 'disk' && (d.type === 'file' || d.type === 'block') && d.source)
    .map((d) => d.target);
}

export async function enableDomain(virsh: Virsh, domain: string, opts: { disks?: string[]; runDir: string; daemonSocket?: string; reconnectDelay?: number }): Promise<EnableResult> {
  const xml = await virsh.dumpxml(domain, { inactive: true });
  const { domain: name, uuid } = domainIdentity(xml);
  const plan = planShims(xml);
  if (plan) {
    // Say whose disks already go through shims, and whether those serve right now.
    const serving = await servingShims(opts.daemonSocket);
    const state = (d: ShimmedDisk) => (serving.has(d.name) ? `shim '${d.name}' serves it now` : `shim '${d.name}' from its next start`);
    throw new DomainXmlError('already-enabled', `vmshift is already enabled in domain '${name}': ${plan.disks.map((d) => `${d.dev} (${state(d)})`).join(', ')}; to change the disks, 'vmshift disable ${name}' first`);
  }
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

export async function disableDomain(virsh: Virsh, domain: string, opts: { daemonSocket: string }): Promise<{ domain: string; disks: Array<{ dev: string; source: string; wasRecorded: string }>; running: boolean }> {
  const xml = await virsh.dumpxml(domain, { inactive: true });
  const plan = planShims(xml);
  if (!plan) throw new DomainXmlError('not-enabled', `vmshift is not enabled in domain '${domain}'`);
  // Where each disk lives is the shim's state file (vmshiftd), not the XML's record, which a
  // move may not have reached yet: writing the record back could boot the guest on an old copy.
  const newPaths: Record<string, string> = {};
  for (const d of plan.disks) {
    let where: { backing: string } | null;
    try {
      where = await callDaemon<{ backing: string }>(opts.daemonSocket, 'shim.locate', { name: d.name }, { timeoutMs: 30_000 });
    } catch (e) {
      if ((e as ControlError).code === 'unknown-shim') where = null; // never started: the record is right
      else throw new Error(`cannot ask vmshiftd where disk ${d.dev} of '${plan.domain}' lives now (${(e as Error).message}); start vmshiftd and retry: its state is the truth, the XML's record may be behind`);
    }
    if (where && where.backing !== d.source) newPaths[d.dev] = where.backing;
  }
  await virsh.define(disableShim(xml, { newPaths }));
  const running = (await virsh.domstate(domain)) !== 'shut off';
  // The XML holds where each disk lives now: the shims' records of it are no longer needed
  // (a running domain's shims keep theirs until they stop; the next enable starts afresh).
  if (!running) for (const d of plan.disks) await callDaemon(opts.daemonSocket, 'shim.forget', { name: d.name }, { timeoutMs: 30_000 }).catch(() => {});
  return { domain: plan.domain, disks: plan.disks.map((d) => ({ dev: d.dev, source: newPaths[d.dev] ?? d.source, wasRecorded: d.source })), running };
}

export interface MigrateDomainOptions {
  /** The disk target; optional when exactly one disk goes through a shim. */
  disk?: string;
  to: string;
  daemonSocket: string;
  /** migrate.start parameters (mode, maxDowntimeMs, bandwidth, ...). */
  params?: Record<string, unknown>;
  onEvent?: CallOptions['onEvent'];
  /** What the command is doing or waiting for, for the operator. */
  onNote?: (text: string) => void;
  /** Aborting it asks vmshiftd to abort the job (Ctrl-C): rolled back unless already committed. */
  interrupt?: AbortSignal;
  /** How long to wait for vmshiftd to record the new path in the domain's XML (default 10 min). */
  recordWaitMs?: number;
}

export interface MigrateDomainResult {
  domain: string;
  disk: string;
  /** Where the disk lived when the job started (the shim's state, not the XML's record). */
  from: string;
  to: string;
  result: JobResult | null;
  /** vmshiftd has recorded `to` in the domain's persistent XML (false: it keeps retrying). */
  recorded: boolean;
}

/** The job was interrupted (Ctrl-C) before its switch-over: the disk stays on its source. */
export class MigrationInterrupted extends Error {
  override name = 'MigrationInterrupted';
}

/** The shimmed disk `dev` of an enabled domain, with a clear error for every other case. */
export function shimmedDisk(xml: string, domain: string, dev?: string): ShimmedDisk {
  const plan = planShims(xml);
  if (!plan) throw new DomainXmlError('not-enabled', `vmshift is not enabled in domain '${domain}': run 'vmshift enable ${domain}' first`);
  const names = plan.disks.map((d) => d.dev).join(', ') || 'none';
  if (dev === undefined) {
    if (plan.disks.length === 1) return plan.disks[0]!;
    throw new DomainXmlError('disk-not-found', `domain '${domain}' has ${plan.disks.length} disks through vmshift shims (${names}): name one with --disk`);
  }
  const disk = plan.disks.find((d) => d.dev === dev);
  if (!disk) {
    const all = listDisks(xml).map((d) => d.target);
    const why = all.includes(dev) ? 'does not go through a vmshift shim' : 'does not exist';
    throw new DomainXmlError('disk-not-found', `disk '${dev}' of domain '${domain}' ${why} (shimmed disks: ${names})`);
  }
  return disk;
}

interface Located { backing: string; recorded: boolean | null }

/**
 * Move a disk of a running, enabled domain to `to` through its shim (the job runs in the
 * shim, driven by vmshiftd). The job belongs to this call until its switch-over: if this
 * process dies or loses vmshiftd, the shim aborts it and the disk stays where it was. Once the
 * switch-over committed, the shim's state file holds the move and vmshiftd records it in the
 * domain's persistent XML (this call only waits for that and reports it).
 */
export async function migrateDomainStorage(virsh: Virsh, domain: string, opts: MigrateDomainOptions): Promise<MigrateDomainResult> {
  const disk = shimmedDisk(await virsh.dumpxml(domain, { inactive: true }), domain, opts.disk);
  const state = await virsh.domstate(domain);
  if (state !== 'running' && state !== 'paused') throw new Error(`domain '${domain}' is ${state}: migrate-storage moves the disks of a running domain (move a stopped one's files yourself)`);
  const to = resolve(opts.to);
  const note = opts.onNote ?? (() => {});
  const daemon = <T>(method: string, params: Record<string, unknown>, timeoutMs = 30_000) => callDaemon<T>(opts.daemonSocket, method, params, { timeoutMs });
  let interrupted = false;
  const onInterrupt = () => {
    interrupted = true;
    note(`aborting the move of ${domain} ${disk.dev} (the disk stays where it is unless the switch-over already committed)...`);
    daemon('job.abort', { name: disk.name }, 120_000).catch(() => {});
  };
  opts.interrupt?.addEventListener('abort', onInterrupt, { once: true });
  let result: JobResult | null = null;
  try {
    result = await callDaemon<JobResult>(opts.daemonSocket, 'job.start', { ...opts.params, name: disk.name, to, follow: true, abortOnDisconnect: true }, { onEvent: opts.onEvent, timeoutMs: 0 });
  } catch (e) {
    const code = (e as ControlError).code;
    if (code !== 'closed' && code !== 'unreachable' && code !== 'daemon-down') {
      if (interrupted) throw new MigrationInterrupted(`interrupted: the move of ${domain} ${disk.dev} was aborted; the disk stays on ${await whereNow(opts.daemonSocket, disk.name).catch(() => 'its source')}`);
      throw e;
    }
    // vmshiftd went away mid-job (restarted?): the shim aborts the job unless it had
    // committed. Ask the daemon, once it is back, where the disk lives now.
    note(`lost the connection to vmshiftd (${(e as Error).message}); waiting for it to learn where the disk is now...`);
    const backing = await settledBacking(opts.daemonSocket, disk.name);
    if (backing !== to) throw new Error(`vmshiftd went away before the switch-over: the move of ${domain} ${disk.dev} was aborted and the disk stays on ${backing}; run the command again`);
  } finally {
    opts.interrupt?.removeEventListener('abort', onInterrupt);
  }
  const from = result?.from ?? disk.source;
  note(`moved ${domain} ${disk.dev} to ${to}; waiting for vmshiftd to record it in the domain's definition (libvirt re-probes QEMU on each define: this can take a minute)...`);
  const where = await callDaemon<Located>(opts.daemonSocket, 'shim.locate', { name: disk.name, waitRecordedMs: opts.recordWaitMs ?? 600_000 }, { timeoutMs: (opts.recordWaitMs ?? 600_000) + 30_000, signal: opts.interrupt })
    .catch(() => ({ backing: to, recorded: false }) as Located);
  return { domain, disk: disk.dev, from, to, result, recorded: where.recorded === true };
}

async function whereNow(socket: string, name: string): Promise<string> {
  return (await callDaemon<Located>(socket, 'shim.locate', { name }, { timeoutMs: 10_000 })).backing;
}

/** Wait (up to ~2 min) for vmshiftd to answer and the shim's job to end; then its backing. */
async function settledBacking(socket: string, name: string): Promise<string> {
  const deadline = Date.now() + 120_000;
  for (;;) {
    try {
      const s = await callDaemon<{ running: boolean }>(socket, 'job.status', { name }, { timeoutMs: 10_000 });
      if (!s.running) return await whereNow(socket, name);
    } catch (e) {
      // The shim is gone (the domain stopped meanwhile): its state file still says where.
      if ((e as ControlError).code === 'unknown-shim') return await whereNow(socket, name);
      if (Date.now() > deadline) throw new Error(`vmshiftd did not come back within 2 minutes (${(e as Error).message}): whether the disk moved is in the shim's state file, which the domain's next start serves; 'vmshift list' shows it once vmshiftd runs`);
    }
    await new Promise((r) => setTimeout(r, 500));
  }
}
