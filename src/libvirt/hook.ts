// libvirt's qemu hook (installed as /etc/libvirt/hooks/qemu or qemu.d/vmshift through
// hooks/libvirt-qemu). libvirt calls it as `qemu DOMAIN OP SUBOP EXTRA` with the domain XML
// on stdin. What it does for a domain with vmshift enabled:
//   prepare    start the domain's shims through vmshiftd; exit 1 (libvirt aborts the start
//              and shows our stderr) when that fails, e.g. the daemon is down
//   release    stop them
//   reconnect  (libvirtd restarted) make sure they run; never fails: libvirt would kill
//              the running guest
//   migrate    (incoming) print the XML with datastore paths mapped per the config's pathMap
//   started    QEMU runs: when libvirt dropped the disks' <reconnect delay> (9.0), ask
//              vmshiftd to give QEMU's NBD nodes the delay through the monitor, after this
//              hook returns; never fails
// Any other operation, and any domain without vmshift, exits 0 at once. The hook talks only
// to vmshiftd: calling back into libvirt from a hook deadlocks libvirtd.
import { closeSync, constants as fsc, openSync, writeSync } from 'node:fs';
import { join } from 'node:path';
import { daemonSocket } from '../cli/daemon-client.ts';
import { VMSHIFT_NS, listDisks, mapPaths } from './domain-xml.ts';
import { loadHookConfig, mapPath, type HookConfig } from './hook-config.ts';
import { planShims, type DomainShims } from './shim-plan.ts';
import { STALE_MARK, askToHoldIo, defaultGroup, startShims, stopShims } from './shim-control.ts';

/** Domain XML is a few KiB; anything near this is not libvirt talking to us. */
export const MAX_XML_BYTES = 4 * 1024 * 1024;

export interface HookArgs {
  domain: string;
  op: string;
  subop: string;
  extra: string;
}

export class HookUsageError extends Error {
  override name = 'HookUsageError';
}

export function parseHookArgs(argv: string[]): HookArgs {
  if (argv.length < 3 || argv.length > 4) throw new HookUsageError(`expected DOMAIN OP SUBOP [EXTRA], got ${argv.length} argument(s)`);
  const [domain, op, subop, extra = '-'] = argv as [string, string, string, string?];
  if (!domain.trim() || !/^[a-z-]+$/.test(op)) throw new HookUsageError(`bad arguments ${JSON.stringify(argv)}: expected DOMAIN OP SUBOP [EXTRA]`);
  return { domain, op, subop, extra };
}

/** Read all of a stream, refusing more than `max` bytes. */
export async function readBounded(stream: AsyncIterable<Buffer | string>, max = MAX_XML_BYTES): Promise<string> {
  const chunks: Buffer[] = [];
  let size = 0;
  for await (const c of stream) {
    const b = typeof c === 'string' ? Buffer.from(c) : c;
    size += b.length;
    if (size > max) throw new HookUsageError(`domain XML on stdin is larger than ${max} bytes`);
    chunks.push(b);
  }
  return Buffer.concat(chunks).toString('utf8');
}

export interface HookIo {
  out(text: string): void;
  err(text: string): void;
  /** Loads the config only for domains that need it (default: loadHookConfig()). */
  config?: () => Promise<HookConfig>;
  /**
   * Where warnings go besides stderr: libvirt shows a hook's stderr only when the hook fails,
   * so a warning on an operation that must not fail (release, reconnect) would be lost.
   * The hook program appends them to libvirt's log of the domain (domainLog).
   */
  warn?: (text: string) => void;
}

/** libvirt's per-domain log (QEMU's stderr and libvirt's own lines about the domain). */
export const DOMAIN_LOG_DIR = '/var/log/libvirt/qemu';

/** Append a line to libvirt's log of the domain; only to an existing file, never through a symlink. */
export function domainLog(domain: string, text: string, dir = DOMAIN_LOG_DIR): void {
  if (domain.includes('/') || domain.startsWith('.')) return;
  let fd: number | undefined;
  try {
    fd = openSync(join(dir, `${domain}.log`), fsc.O_WRONLY | fsc.O_APPEND | fsc.O_NOFOLLOW);
    writeSync(fd, `${new Date().toISOString()}: ${text}`);
  } catch {
    // No log (another libvirt layout): stderr still has it.
  } finally {
    if (fd !== undefined) closeSync(fd);
  }
}

const HANDLED = new Set(['prepare', 'release', 'reconnect', 'migrate', 'started']);

/** Decide and act for one hook call; returns the exit code. */
export async function runHook(args: HookArgs, xml: string, io: HookIo): Promise<number> {
  const say = (line: string) => io.err(`vmshift hook: domain '${args.domain}' ${args.op}: ${line}\n`);
  const warn = (line: string) => {
    say(line);
    io.warn?.(`vmshift hook: ${args.op}: ${line}\n`);
  };
  // A start on a disk whose XML names an older path is worth a line in libvirt's log.
  const tell = (line: string) => (line.includes(STALE_MARK) ? warn(line) : say(line));
  // Only these operations concern us, and only domains that carry our metadata namespace:
  // everything else leaves at once, without parsing anything.
  if (!HANDLED.has(args.op) || !xml.includes(VMSHIFT_NS)) return 0;
  // Failing these stops the guest from starting or arriving; the others must never fail.
  const mayRefuse = args.op === 'prepare' || args.op === 'migrate';
  try {
    const plan = planShims(xml);
    if (!plan || plan.disks.length === 0) return 0;
    const config = await (io.config ?? (() => loadHookConfig()))();
    const socket = daemonSocket(config.daemonSocket);
    const uri = config.libvirtUri ?? 'qemu:///system';
    switch (args.op) {
      case 'prepare':
        for (const l of await startShims(plan, socket, await defaultGroup(config.group), uri)) tell(l);
        return 0;
      case 'reconnect':
        for (const l of await startShims(plan, socket, await defaultGroup(config.group), uri)) tell(l);
        return 0;
      case 'release':
        for (const l of await stopShims(plan, socket)) say(l);
        return 0;
      case 'started':
        for (const l of await askToHoldIo(plan, socket)) say(l);
        return 0;
      case 'migrate': {
        const mapped = mapDomainPaths(xml, plan, config.pathMap);
        if (mapped !== null) io.out(mapped);
        return 0;
      }
    }
    return 0;
  } catch (e) {
    const msg = (e as Error).message;
    if (mayRefuse) {
      warn(`refused: ${msg}`);
      return 1;
    }
    warn(`warning: ${msg}${args.op === 'release' ? "; vmshiftd stops the domain's shims when it is back" : ''}`);
    return 0;
  }
}

/** The XML with every local disk path (live and recorded) mapped, or null when none maps. */
export function mapDomainPaths(xml: string, plan: DomainShims, pathMap: Record<string, string>): string | null {
  const paths = new Set(plan.disks.map((d) => d.source));
  for (const d of listDisks(xml)) if (d.source && (d.source.kind === 'file' || d.source.kind === 'block')) paths.add(d.source.path);
  const mapping: Record<string, string> = {};
  for (const p of paths) {
    const to = mapPath(p, pathMap);
    if (to !== undefined && to !== p) mapping[p] = to;
  }
  return Object.keys(mapping).length ? mapPaths(xml, mapping) : null;
}

/** The hook as a program: argv, the domain XML on stdin, the exit code libvirt reads. */
export async function main(): Promise<void> {
  let args: HookArgs;
  try {
    args = parseHookArgs(process.argv.slice(2));
  } catch (e) {
    process.stderr.write(`vmshift hook: ${(e as Error).message}\n`);
    process.exit(2);
  }
  let xml: string;
  try {
    xml = await readBounded(process.stdin);
  } catch (e) {
    // Without the XML we cannot know whether the domain is ours: refuse only where it matters.
    process.stderr.write(`vmshift hook: domain '${args.domain}' ${args.op}: ${(e as Error).message}\n`);
    process.exit(args.op === 'prepare' || args.op === 'migrate' ? 1 : 0);
  }
  const code = await runHook(args, xml, { out: (t) => process.stdout.write(t), err: (t) => process.stderr.write(t), warn: (t) => domainLog(args.domain, t) });
  process.exitCode = code;
}
