// Rewriting libvirt domain XML so chosen disks go through a vmshift shim (an NBD export on a
// unix socket) and back. The original <source> and disk type are kept in the domain's own
// <metadata> under the vmshift namespace, so the rewrite survives libvirt redefining the
// domain and can be undone without any other state. Everything else in the document
// (unknown elements, comments, whitespace, order) is left as it was: xmlbuilder2 parses to a
// DOM that keeps all of it, and we only touch the nodes we own.
import { builder, create } from 'xmlbuilder2';
import { checkWellFormed } from './xml-check.ts';

export const VMSHIFT_NS = 'https://vmshift.dev/xmlns/1';
const XMLNS_NS = 'http://www.w3.org/2000/xmlns/';

export type DomainXmlErrorKind = 'bad-xml' | 'no-domain' | 'disk-not-found' | 'unsupported-disk' | 'already-enabled' | 'not-enabled';

export class DomainXmlError extends Error {
  constructor(readonly kind: DomainXmlErrorKind, message: string) {
    super(message);
    this.name = 'DomainXmlError';
  }
}

export type DiskSource =
  | { kind: 'file'; path: string }
  | { kind: 'block'; path: string }
  | { kind: 'nbd'; export?: string; socket?: string; host?: string; port?: string; reconnectDelay?: number }
  | { kind: 'other'; type: string };

export interface DomainDisk {
  /** Guest target, e.g. vda. */
  target: string;
  /** disk, cdrom, floppy, lun. */
  device: string;
  /** The <disk type=...>: file, block, network, volume... */
  type: string;
  /** null for an empty drive (a cdrom without medium). */
  source: DiskSource | null;
  /** <driver type=...>: raw, qcow2, ... */
  driverType?: string;
  /** This disk currently goes through a vmshift shim. */
  shimmed: boolean;
}

export interface EnableShimOpts {
  disks: string[];
  /** The shim's unix socket for a disk target. */
  socketFor: (dev: string) => string;
  /** The NBD export name: one for all disks or one per disk target. */
  exportName: string | ((dev: string) => string);
  /**
   * Seconds QEMU holds the guest's I/O while a shim restarts, as `<reconnect delay='N'/>` in
   * the NBD `<source>` (src/qemu/nbd-reconnect.ts); 0 or absent writes none. libvirt 9.0
   * does not know the element and drops it on define (enableDomain checks and says so).
   */
  reconnectDelay?: number;
}

// ---- parsing ---------------------------------------------------------------------------

function parse(xml: string): { doc: Document; domain: Element } {
  if (typeof xml !== 'string' || xml.trim() === '') throw new DomainXmlError('bad-xml', 'domain XML is empty');
  try {
    checkWellFormed(xml);
  } catch (err) {
    throw new DomainXmlError('bad-xml', `domain XML is not well-formed: ${(err as Error).message}`);
  }
  let doc: Document;
  try {
    doc = create({ skipWhitespaceOnlyText: false }, xml).node as unknown as Document;
  } catch (err) {
    throw new DomainXmlError('bad-xml', `domain XML does not parse: ${(err as Error).message}`);
  }
  const domain = doc.documentElement;
  if (!domain || domain.localName !== 'domain' || domain.namespaceURI !== null) {
    throw new DomainXmlError('no-domain', `expected a <domain> root element, found <${domain?.tagName ?? 'nothing'}>`);
  }
  return { doc, domain };
}

function serialize(doc: Document): string {
  // No XML declaration: libvirt neither writes nor needs one.
  return builder(doc as never).end({ headless: true });
}

/** The document as this module prints it: a round trip with no change yields exactly this. */
export function formatDomainXml(xml: string): string {
  return serialize(parse(xml).doc);
}

const childElements = (el: Element, name?: string): Element[] =>
  Array.from(el.childNodes).filter((n): n is Element => n.nodeType === 1 && (name === undefined || (n as Element).tagName === name));
const firstChild = (el: Element, name: string): Element | undefined => childElements(el, name)[0];

function diskElements(domain: Element): Element[] {
  const devices = firstChild(domain, 'devices');
  return devices ? childElements(devices, 'disk') : [];
}

const targetOf = (disk: Element) => firstChild(disk, 'target')?.getAttribute('dev') ?? '';

function findDisk(domain: Element, dev: string): Element {
  const disk = diskElements(domain).find((d) => targetOf(d) === dev);
  if (!disk) {
    const known = diskElements(domain).map(targetOf).join(', ') || 'none';
    throw new DomainXmlError('disk-not-found', `no disk with target '${dev}' (disks: ${known})`);
  }
  return disk;
}

/** The vmshift:disks record in <metadata>, if the shim is enabled. */
function shimRecord(domain: Element): Element | undefined {
  const meta = firstChild(domain, 'metadata');
  return meta ? childElements(meta).find((e) => e.namespaceURI === VMSHIFT_NS && e.localName === 'disks') : undefined;
}

/** Attribute holding a local source's path for a disk type. */
const pathAttr = (type: string): string | undefined => (type === 'file' ? 'file' : type === 'block' ? 'dev' : undefined);

function describeSource(type: string, src: Element | undefined): DiskSource | null {
  if (!src) return null;
  const attr = pathAttr(type);
  if (attr) return { kind: type as 'file' | 'block', path: src.getAttribute(attr) ?? '' };
  if (type === 'network' && src.getAttribute('protocol') === 'nbd') {
    const host = firstChild(src, 'host');
    const out: DiskSource = { kind: 'nbd' };
    const name = src.getAttribute('name');
    if (name !== null) out.export = name;
    if (host?.getAttribute('transport') === 'unix') out.socket = host.getAttribute('socket') ?? undefined;
    else if (host) {
      out.host = host.getAttribute('name') ?? undefined;
      out.port = host.getAttribute('port') ?? undefined;
    }
    const delay = firstChild(src, 'reconnect')?.getAttribute('delay');
    if (delay && /^\d+$/.test(delay)) out.reconnectDelay = Number(delay);
    return out;
  }
  return { kind: 'other', type };
}

// ---- public API ------------------------------------------------------------------------

export function listDisks(xml: string): DomainDisk[] {
  const { domain } = parse(xml);
  const shimmed = new Set(recordedDisks(domain).map((r) => r.getAttribute('dev')));
  return diskElements(domain).map((d) => {
    const type = d.getAttribute('type') ?? '';
    const disk: DomainDisk = {
      target: targetOf(d),
      device: d.getAttribute('device') ?? 'disk',
      type,
      source: describeSource(type, firstChild(d, 'source')),
      shimmed: shimmed.has(targetOf(d)),
    };
    const driverType = firstChild(d, 'driver')?.getAttribute('type');
    if (driverType) disk.driverType = driverType;
    return disk;
  });
}

/**
 * The reconnect delay `vmshift enable` asked for (its vmshift record); undefined for a record
 * written before it kept one, or none when vmshift is not enabled.
 */
export function recordedReconnectDelay(xml: string): number | undefined {
  const v = shimRecord(parse(xml).domain)?.getAttribute('reconnect-delay');
  return v && /^\d+$/.test(v) ? Number(v) : undefined;
}

export function isEnabled(xml: string): boolean {
  return shimRecord(parse(xml).domain) !== undefined;
}

const recordedDisks = (domain: Element): Element[] => {
  const rec = shimRecord(domain);
  return rec ? childElements(rec).filter((e) => e.namespaceURI === VMSHIFT_NS && e.localName === 'disk') : [];
};

/** Rewrite `opts.disks` to NBD disks on their shim sockets; remember what they were. */
export function enableShim(xml: string, opts: EnableShimOpts): string {
  const { doc, domain } = parse(xml);
  if (shimRecord(domain)) throw new DomainXmlError('already-enabled', 'the vmshift shim is already enabled in this domain');
  if (opts.disks.length === 0) throw new DomainXmlError('disk-not-found', 'no disks given to enable the shim for');
  // Validate every disk before changing anything.
  const chosen = opts.disks.map((dev) => {
    const disk = findDisk(domain, dev);
    const type = disk.getAttribute('type') ?? '';
    const source = firstChild(disk, 'source');
    if (!pathAttr(type) || !source) throw new DomainXmlError('unsupported-disk', `disk '${dev}' is type '${type}'${source ? '' : ' without a source'}; only file and block disks can go through the shim`);
    // Over NBD QEMU must not probe the format: the guest could make a raw disk look like qcow2.
    if (!firstChild(disk, 'driver')?.getAttribute('type')) throw new DomainXmlError('unsupported-disk', `disk '${dev}' has no <driver type=...>; the format must be explicit`);
    return { dev, disk, type, source };
  });

  const { meta, created } = ensureMetadata(doc, domain);
  const record = doc.createElementNS(VMSHIFT_NS, 'vmshift:disks');
  record.setAttributeNS(XMLNS_NS, 'xmlns:vmshift', VMSHIFT_NS);
  // Kept here too: a libvirt that drops <reconnect> (9.0) leaves vmshiftd this to go by.
  if (opts.reconnectDelay !== undefined) record.setAttribute('reconnect-delay', String(opts.reconnectDelay));
  if (created) record.setAttribute('created-metadata', 'yes');
  meta.appendChild(record);

  for (const { dev, disk, type, source } of chosen) {
    const entry = doc.createElementNS(VMSHIFT_NS, 'vmshift:disk');
    entry.setAttribute('dev', dev);
    entry.setAttribute('type', type);
    entry.appendChild(cloneInto(doc, source, VMSHIFT_NS, 'vmshift:'));
    record.appendChild(entry);

    const nbd = doc.createElement('source');
    nbd.setAttribute('protocol', 'nbd');
    nbd.setAttribute('name', typeof opts.exportName === 'function' ? opts.exportName(dev) : opts.exportName);
    const host = doc.createElement('host');
    host.setAttribute('transport', 'unix');
    host.setAttribute('socket', opts.socketFor(dev));
    nbd.appendChild(host);
    if (opts.reconnectDelay) {
      const reconnect = doc.createElement('reconnect');
      reconnect.setAttribute('delay', String(opts.reconnectDelay));
      nbd.appendChild(reconnect);
    }
    disk.replaceChild(nbd, source);
    disk.setAttribute('type', 'network');
  }
  return serialize(doc);
}

/** Undo enableShim; `newPaths` gives a disk's new file/device when its data moved meanwhile. */
export function disableShim(xml: string, opts: { newPaths?: Record<string, string> } = {}): string {
  const { doc, domain } = parse(xml);
  const record = shimRecord(domain);
  if (!record) throw new DomainXmlError('not-enabled', 'the vmshift shim is not enabled in this domain');
  const entries = recordedDisks(domain);
  for (const dev of Object.keys(opts.newPaths ?? {})) {
    if (!entries.some((e) => e.getAttribute('dev') === dev)) throw new DomainXmlError('disk-not-found', `new path given for '${dev}', which is not shimmed`);
  }
  const restores = entries.map((entry) => {
    const dev = entry.getAttribute('dev') ?? '';
    const saved = childElements(entry).find((e) => e.localName === 'source');
    if (!saved) throw new DomainXmlError('bad-xml', `vmshift record for '${dev}' has no saved source`);
    return { dev, type: entry.getAttribute('type') ?? 'file', saved, disk: findDisk(domain, dev) };
  });
  for (const { dev, type, saved, disk } of restores) {
    const source = cloneInto(doc, saved, null, '');
    const newPath = opts.newPaths?.[dev];
    if (newPath !== undefined) source.setAttribute(pathAttr(type)!, newPath);
    const current = firstChild(disk, 'source');
    if (current) disk.replaceChild(source, current);
    else disk.appendChild(source);
    disk.setAttribute('type', type);
  }
  const meta = record.parentNode as Element;
  if (record.getAttribute('created-metadata') === 'yes') removeWithIndent(meta);
  else meta.removeChild(record);
  return serialize(doc);
}

/** Rewrite local disk paths (file= / dev=), saved ones in the vmshift record included. */
export function mapPaths(xml: string, mapping: Record<string, string>): string {
  const { doc, domain } = parse(xml);
  const rewrite = (src: Element) => {
    for (const attr of ['file', 'dev']) {
      const v = src.getAttribute(attr);
      if (v !== null && Object.hasOwn(mapping, v)) src.setAttribute(attr, mapping[v]!);
    }
  };
  for (const disk of diskElements(domain)) for (const src of Array.from(disk.getElementsByTagName('source'))) rewrite(src);
  for (const entry of recordedDisks(domain)) {
    for (const src of childElements(entry).filter((e) => e.localName === 'source')) rewrite(src);
  }
  return serialize(doc);
}

// ---- helpers ---------------------------------------------------------------------------

/** Libvirt's order puts <metadata> after name/uuid/genid/title/description. */
function ensureMetadata(doc: Document, domain: Element): { meta: Element; created: boolean } {
  const existing = firstChild(domain, 'metadata');
  if (existing) return { meta: existing, created: false };
  const meta = doc.createElement('metadata');
  const before = childElements(domain).filter((e) => ['name', 'uuid', 'genid', 'title', 'description'].includes(e.tagName)).at(-1);
  // Indent like the element we follow, so the result reads like libvirt's own output.
  const prev = before?.previousSibling;
  const indent = prev && prev.nodeType === 3 && /^\s+$/.test(prev.nodeValue ?? '') ? prev.nodeValue! : '';
  // Insert [indent, <metadata>] right after `before`; removal takes both away again.
  const anchor = before ? before.nextSibling : domain.firstChild;
  if (indent) domain.insertBefore(doc.createTextNode(indent), anchor);
  domain.insertBefore(meta, anchor);
  return { meta, created: true };
}

/** Remove an element we inserted together with the whitespace text we put next to it. */
function removeWithIndent(el: Element): void {
  const parent = el.parentNode!;
  const prev = el.previousSibling;
  if (prev && prev.nodeType === 3 && /^\s+$/.test(prev.nodeValue ?? '')) parent.removeChild(prev);
  parent.removeChild(el);
}

/** Deep copy of `el` with every element renamed into namespace `ns` (or none) with `prefix`. */
function cloneInto(doc: Document, el: Element, ns: string | null, prefix: string): Element {
  const copy = ns ? doc.createElementNS(ns, prefix + el.localName) : doc.createElement(el.localName);
  for (const a of Array.from(el.attributes)) {
    if (a.namespaceURI === XMLNS_NS) continue;
    copy.setAttribute(a.name, a.value);
  }
  for (const n of Array.from(el.childNodes)) {
    copy.appendChild(n.nodeType === 1 ? cloneInto(doc, n as Element, ns, prefix) : doc.importNode(n, true));
  }
  return copy;
}
