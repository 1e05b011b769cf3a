// What a domain's XML says about its vmshift shims, for the hook, the enable/disable verbs and
// the VDSM hooks alike: which disks go through a shim, under which shim name, on which
// socket, and where each disk's data lives now (the path kept in vmshift's <metadata>).
// Everything is derived from the XML alone, so a hook never has to ask libvirt.
import { join } from 'node:path';
import { create } from 'xmlbuilder2';
import { NAME_RE } from '../daemon/registry.ts';
import { DomainXmlError, disableShim, isEnabled, listDisks, recordedReconnectDelay } from './domain-xml.ts';
import { DEFAULT_RECONNECT_DELAY_S } from '../qemu/nbd-reconnect.ts';

export interface ShimmedDisk {
  /** Guest target, e.g. vda. */
  dev: string;
  /** The vmshiftd shim name. */
  name: string;
  /** Where the disk's data lives now (file or block device path). */
  source: string;
  /** The NBD socket and export the domain's XML points QEMU at. */
  socket: string;
  export: string;
  /** The `<reconnect delay>` libvirt kept in the NBD source (libvirt 9.0 keeps none). */
  xmlReconnectDelay?: number;
}

export interface DomainShims {
  domain: string;
  uuid: string;
  disks: ShimmedDisk[];
  /** Seconds QEMU should hold I/O while a shim restarts, as `vmshift enable` asked. */
  reconnectDelay: number;
}

/** The shims' run dir: --run-dir, else $VMSHIFT_RUN_DIR, else vmshiftd's default. */
// Here too for the libvirt code; the CLI's verbs take it from defaults.ts (without xmlbuilder2).
export { runDir } from '../daemon/defaults.ts';

/**
 * The shim of disk `dev` of a domain: `DOMAIN-DEV` when that is a valid shim name (readable
 * in `vmshift list`), else `UUID-DEV` (domain names may hold characters a file name may not).
 */
export function shimName(domain: string, uuid: string, dev: string): string {
  const byName = `${domain}-${dev}`;
  if (NAME_RE.test(byName)) return byName;
  const byUuid = `${uuid}-${dev}`;
  if (NAME_RE.test(byUuid)) return byUuid;
  throw new DomainXmlError('bad-xml', `cannot derive a shim name for disk '${dev}' of domain '${domain}' (uuid '${uuid}')`);
}

/** Where vmshiftd puts a shim's NBD socket (src/daemon/supervisor.ts: RUN_DIR/NAME/nbd.sock). */
export function shimSocket(dir: string, name: string): string {
  return join(dir, name, 'nbd.sock');
}

/** The domain's <name> and <uuid> (libvirt always has both; VDSM XML too). */
export function domainIdentity(xml: string): { domain: string; uuid: string } {
  let doc;
  try {
    doc = create(xml).root().toObject() as { domain?: { name?: unknown; uuid?: unknown } };
  } catch (e) {
    throw new DomainXmlError('bad-xml', `domain XML does not parse: ${(e as Error).message}`);
  }
  const text = (v: unknown) => (typeof v === 'string' ? v.trim() : '');
  const domain = text(doc.domain?.name);
  if (!domain) throw new DomainXmlError('no-domain', 'domain XML has no <name>');
  return { domain, uuid: text(doc.domain?.uuid) };
}

/** The shims a domain's XML asks for, or null when vmshift is not enabled in it. */
export function planShims(xml: string): DomainShims | null {
  if (!isEnabled(xml)) return null; // also validates the XML
  const { domain, uuid } = domainIdentity(xml);
  // The saved sources are what disableShim would put back: read them from its result.
  const restored = new Map(listDisks(disableShim(xml)).map((d) => [d.target, d]));
  const disks = listDisks(xml).filter((d) => d.shimmed).map((d): ShimmedDisk => {
    const saved = restored.get(d.target)?.source;
    if (!saved || (saved.kind !== 'file' && saved.kind !== 'block') || !saved.path) {
      throw new DomainXmlError('bad-xml', `vmshift record for '${d.target}' has no file or block path`);
    }
    if (d.source?.kind !== 'nbd' || !d.source.socket) {
      throw new DomainXmlError('unsupported-disk', `disk '${d.target}' is recorded as shimmed but is not an NBD disk on a unix socket`);
    }
    const disk: ShimmedDisk = { dev: d.target, name: shimName(domain, uuid, d.target), source: saved.path, socket: d.source.socket, export: d.source.export ?? '' };
    if (d.source.reconnectDelay !== undefined) disk.xmlReconnectDelay = d.source.reconnectDelay;
    return disk;
  });
  return { domain, uuid, disks, reconnectDelay: recordedReconnectDelay(xml) ?? DEFAULT_RECONNECT_DELAY_S };
}
