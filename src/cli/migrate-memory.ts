// `vmshift migrate --qmp SRC_QMP --peer ssh://root@HOST[:PORT] --dest-qmp PATH_ON_PEER`: move
// a running guest's memory (and devices) to a destination QEMU on another host, over the
// resumable link (src/relay/migrate.ts). The guest's disks must be reachable from both hosts.
// Progress on stderr (a line per second on a terminal), JSON lines on stdout with --json.
// Ctrl-C before the commit rolls back (the guest runs on here). Exit 0 when the guest runs on
// the destination, 1 when it failed (and runs on here), 3 when in doubt (see the message).
// --balloon shrinks the guest on its own memory statistics first (src/balloon/); its defaults
// come from the `balloon` section of vmshiftd's config file (src/daemon/config.ts).
import type { Argv, ArgumentsCamelCase } from 'yargs';
import { homedir } from 'node:os';
import { join, resolve } from 'node:path';
import { formatBytes, parseDuration, parseSize } from '../util/size.ts';
import { printJson, UsageError } from './output.ts';
import { MigrateError, migrateMemory, type MigrateEvent } from '../relay/migrate.ts';
import { DEFAULT_DAEMON_CONFIG, loadBalloonDefaults } from '../daemon/config.ts';
import { mib } from '../balloon/policy.ts';

interface Args {
  domain?: string;
  desturi?: string;
  qmp?: string;
  peer?: string;
  destQmp?: string;
  identity?: string;
  knownHosts?: string;
  sharedDir?: string;
  maxDowntime: string;
  bandwidth?: string;
  compress: 'none' | 'cache' | 'xbzrle';
  cacheSize: string;
  linkRate?: string;
  peerVmshift: string;
  peerSocketDir: string;
  holdTime: string;
  balloon?: boolean;
  balloonFloor?: string;
  balloonHeadroom?: string;
  config: string;
  json: boolean;
}

export function parsePeer(url: string): { host: string; port: number; user: string } {
  const m = /^ssh:\/\/(?:([A-Za-z0-9_][A-Za-z0-9._-]*)@)?(\[[0-9a-fA-F:]+\]|[A-Za-z0-9][A-Za-z0-9.-]*)(?::(\d{1,5}))?\/?$/.exec(url);
  if (!m) throw new UsageError(`--peer ${url}: expected ssh://[USER@]HOST[:PORT]`);
  const port = m[3] ? Number(m[3]) : 22;
  if (port < 1 || port > 65535) throw new UsageError(`--peer ${url}: port ${port} is out of range`);
  return { user: m[1] ?? 'root', host: m[2].replace(/^\[|\]$/g, ''), port };
}

/** Exit 3 for a migration left in doubt (both forms of `migrate`); other errors go on to `fail`. */
export function exitIfInDoubt(e: unknown, json: boolean): void {
  if (!(e instanceof MigrateError && e.inDoubt)) return;
  if (json) printJson({ error: { code: e.code, message: e.message } });
  else process.stderr.write(`vmshift: IN DOUBT: ${e.message}\n`);
  process.exit(3);
}

export const migrateMemoryCommand = {
  command: 'migrate [domain] [desturi]',
  describe: 'Move a running guest to another host: a libvirt DOMAIN to qemu+ssh://HOST/system, or (--qmp) a QEMU to a QEMU waiting there (disks reachable from both)',
  builder: (y: Argv) =>
    y
      .positional('domain', { type: 'string', describe: 'the libvirt domain to move (libvirt drives the migration)' })
      .positional('desturi', { type: 'string', describe: 'the destination libvirt: qemu+ssh://[USER@]HOST[:PORT]/system' })
      .option('connect', { alias: 'c', type: 'string', default: 'qemu:///system', describe: "this host's libvirt (with DOMAIN)" })
      .option('persistent', { type: 'boolean', default: true, describe: 'define the domain on the destination (--no-persistent: transient there)' })
      .option('undefine-source', { type: 'boolean', default: true, describe: 'undefine it here once it runs there (--no-undefine-source keeps the definition)' })
      .option('run-dir', { type: 'string', default: '/run/vmshift', describe: "vmshift's run directory, the same path on both hosts (with DOMAIN)" })
      .option('libvirt-via', { choices: ['link', 'direct'] as const, default: 'link' as const, describe: "libvirt's connection to the peer: over vmshift's link (a reset is hidden from it) or virsh's own (with DOMAIN)" })
      .option('connect-timeout', { type: 'string', default: '20s', describe: 'how long to try reaching the peer before giving up (with DOMAIN)' })
      .option('qmp', { type: 'string', describe: "the source guest's QMP socket (without DOMAIN)" })
      .option('peer', { type: 'string', describe: 'the destination host: ssh://[USER@]HOST[:PORT] (with --qmp)' })
      .option('dest-qmp', { type: 'string', describe: 'the QMP socket, on the peer, of a QEMU started with -incoming defer -S (with --qmp)' })
      .option('identity', { type: 'string', describe: 'SSH private key (default ~/.ssh/id_ed25519)' })
      .option('known-hosts', { type: 'string', describe: 'known_hosts file to verify the peer (default ~/.ssh/known_hosts)' })
      .option('shared-dir', { type: 'string', describe: 'a directory both hosts mount: carries the stream while the network is cut' })
      .option('max-downtime', { type: 'string', default: '300ms', describe: 'pause allowed at the switch-over' })
      .option('bandwidth', { type: 'string', describe: 'migration rate limit per second (e.g. 100M)' })
      .option('compress', { choices: ['none', 'cache', 'xbzrle'] as const, default: 'none' as const, describe: "memory compression: vmshift's cache between the relays, QEMU's XBZRLE, or none" })
      .option('cache-size', { type: 'string', default: '256M', describe: 'memory for page copies (the cache on each host, or QEMU\'s XBZRLE cache)' })
      .option('link-rate', { type: 'string', describe: "the link's rate per second (e.g. 50M): then the guest's dirty rate is measured and auto-converge decided" })
      .option('hold-time', { type: 'string', default: '60s', describe: 'how long both carriers may be silent before the migration fails' })
      .option('peer-vmshift', { type: 'string', default: 'vmshift', describe: 'the vmshift command on the peer' })
      .option('peer-socket-dir', { type: 'string', default: '/run/vmshift/links', describe: "where the peer's link agent listens" })
      .option('balloon', { type: 'boolean', describe: 'shrink the guest to its working set plus headroom first (its balloon statistics say how far); given back on the destination' })
      .option('balloon-floor', { type: 'string', describe: 'never shrink the guest below this (default: max(64M, a quarter of its memory))' })
      .option('balloon-headroom', { type: 'string', describe: 'memory left available to the guest on top of its working set (default: max(32M, 5%))' })
      .option('config', { type: 'string', default: DEFAULT_DAEMON_CONFIG, describe: "vmshiftd's config file: its balloon section gives the defaults" }),
  handler: async (argv: ArgumentsCamelCase<Args>) => {
    if (argv.domain) {
      if (argv.qmp || argv.peer || argv.destQmp) throw new UsageError('migrate DOMAIN URI takes no --qmp, --peer or --dest-qmp (those move a QEMU without libvirt)');
      const { migrateDomainHandler } = await import('./migrate-domain.ts');
      await migrateDomainHandler(argv as unknown as Parameters<typeof migrateDomainHandler>[0]);
      return;
    }
    if (!argv.qmp || !argv.peer || !argv.destQmp) throw new UsageError('migrate: name a DOMAIN and a qemu+ssh:// URI, or give --qmp, --peer and --dest-qmp');
    const peer = parsePeer(argv.peer);
    const defaults = await loadBalloonDefaults(argv.config);
    const floor = argv.balloonFloor !== undefined ? parseSize(argv.balloonFloor, '--balloon-floor') : defaults.floor;
    const headroom = argv.balloonHeadroom !== undefined ? parseSize(argv.balloonHeadroom, '--balloon-headroom') : defaults.headroom;
    const balloon = (argv.balloon ?? defaults.enabled) ? { floor, headroom } : undefined;
    const ac = new AbortController();
    const onInt = () => ac.abort();
    process.once('SIGINT', onInt);
    let last = 0;
    const onEvent = (e: MigrateEvent) => {
      if (argv.json) { printJson(e); return; }
      if (e.event === 'progress') {
        const now = Date.now();
        if (now - last < 1000) return;
        last = now;
        process.stderr.write(`pass ${e.pass}: ${formatBytes(e.transferred)} sent, ${formatBytes(e.remaining)} left, dirtying ${formatBytes(e.dirtyRate)}/s${e.etaS !== null ? `, ETA ${e.etaS} s` : ''}\n`);
      } else if (e.event === 'warning') process.stderr.write(`warning: ${e.message}\n`);
      else if (e.event === 'carrier') process.stderr.write(`link ${e.state}: ${e.why}\n`);
      else if (e.event === 'committed') process.stderr.write('source in postmigrate: commit sent\n');
      else if (e.event === 'parameters') for (const r of e.reasons) process.stderr.write(`parameter: ${r}\n`);
      else if (e.event === 'balloon') process.stderr.write(`balloon ${e.state}: ${e.why}${e.target !== null ? ` (target ${mib(e.target)}, was ${mib(e.figures.actual)})` : ''}\n`);
    };
    try {
      const done = await migrateMemory({
        qmp: resolve(argv.qmp), peer, destQmp: argv.destQmp!,
        identity: argv.identity ?? join(homedir(), '.ssh/id_ed25519'), knownHosts: argv.knownHosts ?? join(homedir(), '.ssh/known_hosts'),
        sharedDir: argv.sharedDir ? resolve(argv.sharedDir) : undefined,
        maxDowntimeMs: parseDuration(argv.maxDowntime, '--max-downtime'),
        bandwidth: argv.bandwidth ? parseSize(argv.bandwidth, '--bandwidth') : 0,
        compress: argv.compress, cacheSize: parseSize(argv.cacheSize, '--cache-size'),
        linkRate: argv.linkRate ? parseSize(argv.linkRate, '--link-rate') : undefined,
        holdMs: parseDuration(argv.holdTime, '--hold-time'), balloon,
        peerVmshift: argv.peerVmshift, peerSocketDir: argv.peerSocketDir, onEvent, signal: ac.signal,
      });
      if (argv.json) printJson(done);
      else {
        if (done.balloon) process.stderr.write(`balloon: ${mib(done.balloon.original)} -> ${mib(done.balloon.actual)} before the move (${done.balloon.state} after ${done.balloon.steps} steps, ${(done.balloon.ms / 1000).toFixed(1)} s); ${done.balloon.restored && 'target' in done.balloon.restored ? `given back on the destination (target ${mib(done.balloon.restored.target)})` : `NOT given back on the destination: ${done.balloon.restored?.error ?? 'no answer'}`}\n`);
        process.stderr.write(`done in ${(done.ms / 1000).toFixed(1)} s (downtime ${done.downtimeMs} ms, ${formatBytes(done.transferred)}; link: ${done.link.reconnects} reconnects, ${formatBytes(done.link.resentBytes)} resent, ${formatBytes(done.link.fromFileBytes)} from the shared file)\n`);
        const c = done.cache;
        if (c) process.stderr.write(`cache: ${formatBytes(c.bytesIn)} from QEMU, ${formatBytes(c.bytesOut)} on the link (${formatBytes(c.saved)} saved), hit rate ${(c.hitRate * 100).toFixed(1)}%, ${c.entries} of ${c.budgetEntries} pages kept, ${c.bypassedPages} pages sent raw (the link kept up)\n`);
      }
    } catch (e) {
      exitIfInDoubt(e, argv.json);
      throw e;
    } finally {
      process.off('SIGINT', onInt);
    }
  },
};
