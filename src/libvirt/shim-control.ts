// Starting and stopping a domain's shims through vmshiftd (hooks and verbs share this). The
// daemon picks each shim's socket; the domain's XML already names one (written by
// `vmshift enable`): if they differ QEMU would connect to nothing, so that is an error.
// Every shim is started naming its domain (`startedBy: libvirt:UUID`), and stopped only so:
// a name that happens to match (another domain's shim, one started by hand) is never stopped
// by this domain's failed start or its release.
import { readFile } from 'node:fs/promises';
import { callDaemon } from '../cli/daemon-client.ts';
import type { DomainShims } from './shim-plan.ts';

interface StartedShim {
  shim: { name: string; socket: string; source: string };
  already: boolean;
  /** Where the disk lives now (the shim's state file); `stale` is what we named when older. */
  backing?: string;
  stale?: string | null;
}

/** Marks a start line about a domain XML that names an older path of the disk. */
export const STALE_MARK = "the domain's XML still records";

/** QEMU's group on Debian/Ubuntu libvirt hosts; used when the config names none and it exists. */
const QEMU_GROUP = 'libvirt-qemu';

export async function defaultGroup(configured: string | null | undefined): Promise<string | null> {
  if (configured !== undefined) return configured;
  const groups = await readFile('/etc/group', 'utf8').catch(() => '');
  return groups.split('\n').some((l) => l.startsWith(`${QEMU_GROUP}:`)) ? QEMU_GROUP : null;
}

/** Who started a domain's shims, in vmshiftd's registry. */
export function startedBy(plan: DomainShims): string {
  return `libvirt:${plan.uuid || plan.domain}`;
}

/**
 * Make every shim of the domain run (idempotent); returns one line per disk for logs. All or
 * none: when one fails, the shims this call started are stopped again (not those that already
 * ran: they serve a running guest), and the error is rethrown.
 */
export async function startShims(plan: DomainShims, daemonSocket: string, group: string | null, libvirtUri?: string): Promise<string[]> {
  const lines: string[] = [];
  const started: string[] = [];
  const by = startedBy(plan);
  try {
    for (const d of plan.disks) {
      // The owner lets vmshiftd keep this domain's XML in step with where the disk lives.
      const owner = libvirtUri ? { kind: 'libvirt', uri: libvirtUri, domain: plan.domain, uuid: plan.uuid, dev: d.dev } : undefined;
      const r = await callDaemon<StartedShim>(daemonSocket, 'shim.start', { name: d.name, source: d.source, export: d.export, group, startedBy: by, owner });
      if (!r.already) started.push(d.name);
      if (r.shim.socket !== d.socket) {
        throw new Error(`domain '${plan.domain}' disk ${d.dev}: its XML points at ${d.socket} but vmshiftd serves shim '${d.name}' on ${r.shim.socket}; run 'vmshift disable' and 'vmshift enable' with the daemon's --run-dir`);
      }
      const backing = r.backing ?? d.source;
      const note = r.stale ? ` (${STALE_MARK} ${r.stale}, where the disk lived before it moved; vmshiftd updates the XML)` : '';
      lines.push(`${d.dev}: shim '${d.name}' ${r.already ? 'already serves' : 'serves'} ${backing} on ${d.socket}${note}`);
    }
  } catch (e) {
    for (const name of started.reverse()) await callDaemon(daemonSocket, 'shim.stop', { name, startedBy: by }).catch(() => {});
    throw e;
  }
  return lines;
}

/** Stop every shim of the domain; a shim the daemon does not know is already stopped. */
export async function stopShims(plan: DomainShims, daemonSocket: string): Promise<string[]> {
  const lines: string[] = [];
  const known = new Set((await callDaemon<{ shims: Array<{ name: string }> }>(daemonSocket, 'shim.list')).shims.map((s) => s.name));
  for (const d of plan.disks) {
    if (!known.has(d.name)) continue;
    await callDaemon(daemonSocket, 'shim.stop', { name: d.name, startedBy: startedBy(plan) });
    lines.push(`${d.dev}: shim '${d.name}' stopped`);
  }
  return lines;
}

/**
 * After QEMU started (`started`): the disks whose NBD source lost its `<reconnect delay>` to
 * libvirt (9.0 drops it) get it from vmshiftd, which changes QEMU's nodes through libvirt's
 * monitor once this hook has returned (the hook itself must not call libvirt).
 */
export async function askToHoldIo(plan: DomainShims, daemonSocket: string): Promise<string[]> {
  const missing = plan.disks.filter((d) => d.xmlReconnectDelay !== plan.reconnectDelay);
  if (plan.reconnectDelay === 0 || missing.length === 0) return [];
  const r = await callDaemon<{ queued: string[] }>(daemonSocket, 'shim.hold-io', { names: missing.map((d) => d.name), delay: plan.reconnectDelay });
  return [`vmshiftd gives ${r.queued.join(', ') || 'no shim'} a reconnect delay of ${plan.reconnectDelay} s through the monitor (libvirt dropped <reconnect delay>)`];
}
