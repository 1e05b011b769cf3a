// `vmshift migrate --qmp SRC_QMP --peer ssh://root@HOST[:PORT] | tls://HOST:PORT --dest-qmp
// PATH_ON_PEER`: move a running guest's memory (and devices) to a destination QEMU on another
// host, over the resumable link (src/relay/migrate.ts). The guest's disks must be reachable
// from both hosts, or be moved first: `--disk SOCKET[=PATH]` (a source shim's NBD socket, and
// the new file on the peer; `--to-dir DIR` names it DIR/<file name>) copies each to a new thin
// file on the peer and holds a synchronized mirror until the memory phase ends
// (src/hostmove/disks.ts). `vmshift migrate DOMAIN qemu+ssh://HOST/system` goes through
// libvirt's own migration instead (src/cli/migrate-domain.ts).
// Progress on stderr (a line per second on a terminal), JSON lines on stdout with --json.
// Ctrl-C or `vmshift abort --qmp SRC_QMP` (through the migration's control socket,
// src/relay/migration-socket.ts) before the commit rolls back (the guest runs on here). Exit 0
// when the guest runs on the destination, 1 when it failed (and runs on here), 3 when in doubt.
// --balloon shrinks the guest on its own memory statistics first (src/balloon/); its defaults
// come from the `balloon` section of vmshiftd's config file (src/daemon/config.ts).
import type { Argv, ArgumentsCamelCase } from 'yargs';
import { lstatSync } from 'node:fs';
import { homedir } from 'node:os';
import { join, resolve } from 'node:path';
import { formatBytes, parseDuration, parseSize } from '../util/size.ts';
import { printJson, UsageError } from './output.ts';
import { MigrateError, migrateMemory, type MigrateEvent, type Peer } from '../relay/migrate.ts';
import { listenMigration, type AbortOutcome } from '../relay/migration-socket.ts';
import { DEFAULT_DAEMON_CONFIG, runDir } from '../daemon/defaults.ts';
import { DEGRADE_AFTER_MS, PeerDisks, planDisks, settleTimeoutMs, type DiskEvent } from '../hostmove/disks.ts';
import { mib } from '../balloon/policy.ts';
import type { BalloonDefaults } from '../daemon/config.ts';

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
  disk?: string[];
  toDir?: string;
  destSocket?: string[];
  peerConfig?: string;
  timeout?: string;
  timeoutAction: string;
  paused: boolean;
  tlsDir?: string;
  tlsCa?: string;
  tlsCert?: string;
  tlsKey?: string;
  runDir?: string;
  balloon?: boolean;
  balloonFloor?: string;
  balloonHeadroom?: string;
  config: string;
  json: boolean;
}

/** `SOCKET[=PATH]` pairs, and `SRC=DST` socket renames, into planDisks' input. */
export function parseDiskSpecs(disks: string[], destSockets: string[] = []): Array<{ sourceSocket: string; destPath?: string; destSocket?: string }> {
  const renames = new Map<string, string>();
  for (const d of destSockets) {
    const i = d.indexOf('=');
    if (i <= 0 || !d.slice(i + 1).startsWith('/')) throw new UsageError(`--dest-socket ${d}: expected SOURCE_SOCKET=/PEER/SOCKET`);
    renames.set(resolve(d.slice(0, i)), d.slice(i + 1));
  }
  return disks.map((d) => {
    const i = d.indexOf('=');
    const sourceSocket = resolve(i < 0 ? d : d.slice(0, i));
    const destPath = i < 0 ? undefined : d.slice(i + 1);
    if (destPath !== undefined && !destPath.startsWith('/')) throw new UsageError(`--disk ${d}: the path on the peer must be absolute`);
    return { sourceSocket, destPath, destSocket: renames.get(sourceSocket) };
  });
}

export type PeerUrl = { scheme: 'ssh'; host: string; port: number; user: string } | { scheme: 'tls'; host: string; port: number };

/**
 * vmshiftd's balloon defaults. An absent file is the defaults (as loadConfigFile has it), so
 * zod and the config schema load only when there is a file: every migrate starts sooner.
 */
async function balloonDefaults(path: string): Promise<BalloonDefaults> {
  if (!lstatSync(path, { throwIfNoEntry: false })) return { enabled: false };
  return (await import('../daemon/config.ts')).loadBalloonDefaults(path);
}

export function parsePeer(url: string): PeerUrl {
  const m = /^(ssh|tls):\/\/(?:([A-Za-z0-9_][A-Za-z0-9._-]*)@)?(\[[0-9a-fA-F:]+\]|[A-Za-z0-9][A-Za-z0-9.-]*)(?::(\d{1,5}))?\/?$/.exec(url);
  if (!m) throw new UsageError(`--peer ${url}: expected ssh://[USER@]HOST[:PORT] or tls://HOST:PORT`);
  const host = m[3].replace(/^\[|\]$/g, '');
  if (m[1] === 'tls') {
    if (m[2]) throw new UsageError(`--peer ${url}: a tls:// peer has no user (the certificate says who we are)`);
    if (!m[4]) throw new UsageError(`--peer ${url}: a tls:// peer needs the port its link-agent --listen uses`);
  }
  const port = m[4] ? Number(m[4]) : 22;
  if (port < 1 || port > 65535) throw new UsageError(`--peer ${url}: port ${port} is out of range`);
  return m[1] === 'tls' ? { scheme: 'tls', host, port } : { scheme: 'ssh', user: m[2] ?? 'root', host, port };
}

/** The TLS files: --tls-dir DIR (QEMU's names: ca-cert.pem, client-cert.pem, client-key.pem), each overridable. */
export function tlsFiles(a: { tlsDir?: string; tlsCa?: string; tlsCert?: string; tlsKey?: string }): { ca: string; cert: string; key: string } {
  const inDir = (f: string) => (a.tlsDir ? join(resolve(a.tlsDir), f) : undefined);
  const ca = a.tlsCa ?? inDir('ca-cert.pem'), cert = a.tlsCert ?? inDir('client-cert.pem'), key = a.tlsKey ?? inDir('client-key.pem');
  if (!ca || !cert || !key) throw new UsageError('--peer tls://... needs --tls-dir DIR, or --tls-ca, --tls-cert and --tls-key');
  return { ca: resolve(ca), cert: resolve(cert), key: resolve(key) };
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
      .option('run-dir', { type: 'string', describe: "vmshift's run directory (default $VMSHIFT_RUN_DIR or /run/vmshift): with DOMAIN the same path on both hosts; with --qmp where the migration's control socket goes, for vmshift abort" })
      .option('libvirt-via', { choices: ['link', 'direct'] as const, default: 'link' as const, describe: "libvirt's connection to the peer: over vmshift's link (a reset is hidden from it) or virsh's own (with DOMAIN)" })
      .option('connect-timeout', { type: 'string', default: '20s', describe: 'how long to try reaching the peer before giving up (with DOMAIN)' })
      .option('qmp', { type: 'string', describe: "the source guest's QMP socket (without DOMAIN)" })
      .option('peer', { type: 'string', describe: 'the destination host: ssh://[USER@]HOST[:PORT], or tls://HOST:PORT (a vmshift link-agent --listen there) (with --qmp)' })
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
      .option('disk', { type: 'string', array: true, describe: "move this local disk first: a source shim's NBD socket, =PATH of the new file on the peer (with DOMAIN: DEV=PATH, e.g. vda=/srv/images/web.raw)" })
      .option('to-dir', { type: 'string', describe: "the peer's directory for the new files of local disks without a --disk =PATH" })
      .option('dest-socket', { type: 'string', array: true, describe: "SOURCE_SOCKET=PEER_SOCKET: where the peer serves the disk (default: the same path)" })
      .option('peer-config', { type: 'string', describe: "the peer's vmshiftd config, for its datastores (default /etc/vmshift/vmshiftd.json there)" })
      .option('peer-hook-config', { type: 'string', describe: "with DOMAIN: the peer's libvirt hook config, naming its vmshiftd (default /etc/vmshift/hooks.json there)" })
      .option('timeout', { type: 'string', describe: 'once the migration runs this long without completing (a guest dirtying faster than the link), do --timeout-action' })
      .option('timeout-action', { choices: ['abort', 'suspend'], default: 'abort', describe: 'at --timeout: roll back, or pause the guest so that the migration completes' })
      .option('paused', { type: 'boolean', default: false, describe: 'leave the guest paused on the destination (as virsh migrate --suspend): resume it there with QMP "cont"' })
      .option('tls-dir', { type: 'string', describe: 'tls:// peer: a directory with ca-cert.pem, client-cert.pem, client-key.pem' })
      .option('tls-ca', { type: 'string', describe: 'tls:// peer: PEM CA bundle the peer\'s certificate must be signed by' })
      .option('tls-cert', { type: 'string', describe: 'tls:// peer: PEM client certificate (chain) of this host' })
      .option('tls-key', { type: 'string', describe: 'tls:// peer: PEM private key of --tls-cert' })
      .option('balloon', { type: 'boolean', describe: 'shrink the guest to its working set plus headroom first (its balloon statistics say how far); given back on the destination' })
      .option('balloon-floor', { type: 'string', describe: 'never shrink the guest below this (default: max(64M, a quarter of its memory))' })
      .option('balloon-headroom', { type: 'string', describe: 'memory left available to the guest on top of its working set (default: max(32M, 5%))' })
      .option('config', { type: 'string', default: DEFAULT_DAEMON_CONFIG, describe: "vmshiftd's config file: its balloon section gives the defaults" }),
  handler: async (argv: ArgumentsCamelCase<Args>) => {
    if (argv.domain) {
      if (argv.qmp || argv.peer || argv.destQmp) throw new UsageError('migrate DOMAIN URI takes no --qmp, --peer or --dest-qmp (those move a QEMU without libvirt)');
      argv.runDir = runDir(argv.runDir);
      const { migrateDomainHandler } = await import('./migrate-domain.ts');
      await migrateDomainHandler(argv as unknown as Parameters<typeof migrateDomainHandler>[0]);
      return;
    }
    if (!argv.qmp || !argv.peer || !argv.destQmp) throw new UsageError('migrate: name a DOMAIN and a qemu+ssh:// URI, or give --qmp, --peer and --dest-qmp');
    const url = parsePeer(argv.peer);
    const peer: Peer = url.scheme === 'ssh'
      ? { ...url, identity: argv.identity ?? join(homedir(), '.ssh/id_ed25519'), knownHosts: argv.knownHosts ?? join(homedir(), '.ssh/known_hosts') }
      : { ...url, ...tlsFiles(argv) };
    const timeoutMs = argv.timeout ? parseDuration(argv.timeout, '--timeout') : 0;
    const defaults = await balloonDefaults(argv.config);
    const floor = argv.balloonFloor !== undefined ? parseSize(argv.balloonFloor, '--balloon-floor') : defaults.floor;
    const headroom = argv.balloonHeadroom !== undefined ? parseSize(argv.balloonHeadroom, '--balloon-headroom') : defaults.headroom;
    const balloon = (argv.balloon ?? defaults.enabled) ? { floor, headroom } : undefined;
    const ac = new AbortController();
    const onInt = () => ac.abort(new Error('interrupted'));
    process.once('SIGINT', onInt);
    let last = 0;
    /** Progress lines on a terminal: at most one a second (memory and disks share it). */
    const due = () => {
      const now = Date.now();
      if (now - last < 1000) return false;
      last = now;
      return true;
    };
    let committed = false;
    let phase = 'connecting';
    const onEvent = (e: MigrateEvent) => {
      if (e.event === 'committed') committed = true;
      if (e.event === 'progress') phase = e.status;
      if (argv.json) { printJson(e); return; }
      if (e.event === 'progress') {
        if (!due()) return;
        process.stderr.write(`pass ${e.pass}: ${formatBytes(e.transferred)} sent, ${formatBytes(e.remaining)} left, dirtying ${formatBytes(e.dirtyRate)}/s${e.etaS !== null ? `, ETA ${e.etaS} s` : ''}\n`);
      } else if (e.event === 'warning') process.stderr.write(`warning: ${e.message}\n`);
      else if (e.event === 'carrier') process.stderr.write(`link ${e.state}: ${e.why}\n`);
      else if (e.event === 'committed') process.stderr.write('source in postmigrate: commit sent\n');
      else if (e.event === 'parameters') for (const r of e.reasons) process.stderr.write(`parameter: ${r}\n`);
      else if (e.event === 'balloon') process.stderr.write(`balloon ${e.state}: ${e.why}${e.target !== null ? ` (target ${mib(e.target)}, was ${mib(e.figures.actual)})` : ''}\n`);
    };
    const onDisk = (e: DiskEvent) => {
      if (argv.json) { printJson(e); return; }
      if (e.event === 'disk-progress') {
        if (!due()) return;
        process.stderr.write(`disk ${e.disk}: ${e.phase}, ${formatBytes(e.passDone)} of ${formatBytes(e.passTotal)}, ${formatBytes(e.bytesCopied)} copied, ${formatBytes(e.mirroredBytes)} mirrored\n`);
      } else if (e.event === 'disks-prepared') process.stderr.write(`peer serves ${e.disks.map((d) => `${d.name} (${d.path} on ${d.socket})`).join(', ')}\n`);
      else if (e.event === 'disks-synchronized') process.stderr.write('disks synchronized: every write reaches both hosts; moving memory\n');
      else if (e.event === 'carrier') process.stderr.write(`disk link ${e.state}: ${e.why}\n`);
      else if (e.event === 'disk-shim-lost') process.stderr.write(`disk ${e.disk}: the source shim went away (${e.why}); waiting for it to be restarted\n`);
      else if (e.event === 'disk-resumed') process.stderr.write(`disk ${e.disk}: resumed ${e.copiedEverything ? `from zero (${e.note ?? 'nothing proven on the peer'})` : `from ${formatBytes(e.resumedFrom)}`}, at most ${formatBytes(e.recopyBound)} copied again\n`);
    };
    const holdMs = parseDuration(argv.holdTime, '--hold-time');
    const bandwidth = argv.bandwidth ? parseSize(argv.bandwidth, '--bandwidth') : 0;
    let disks: PeerDisks | null = null;
    if (argv.disk?.length) {
      if (peer.scheme !== 'ssh') throw new UsageError('--disk moves disks over an ssh:// peer only (its link agent starts the peer\'s shims)');
      const plans = await planDisks(parseDiskSpecs(argv.disk, argv.destSocket), argv.toDir);
      disks = await PeerDisks.open({
        user: peer.user, host: peer.host, port: peer.port, identity: peer.identity, knownHosts: peer.knownHosts, peerVmshift: argv.peerVmshift, peerSocketDir: argv.peerSocketDir, peerConfig: argv.peerConfig,
        sharedDir: argv.sharedDir ? resolve(argv.sharedDir) : undefined, holdMs,
      }, onDisk);
      try {
        const aborted = new Promise<never>((_, reject) => ac.signal.addEventListener('abort', () => reject(new MigrateError('source', 'interrupted: migration cancelled')), { once: true }));
        aborted.catch(() => {});
        await Promise.race([(async () => {
          await disks!.prepare(plans, onDisk);
          // A cut must not stall the guest: its writes are answered by the source alone after
          // DEGRADE_AFTER_MS, and the peer catches up before the commit (beforeCommit below).
          await disks!.copy(onDisk, { bandwidth, holdMs, degradeAfterMs: DEGRADE_AFTER_MS });
          await disks!.awaitPeerSocket(argv.destQmp!);
        })(), aborted]);
      } catch (e) {
        await disks.abort((e as Error).message);
        await disks.close();
        throw e;
      }
    }
    const qmp = resolve(argv.qmp);
    // `vmshift abort --qmp` reaches this process here; the outcome it hears is this run's own.
    let outcome: Promise<unknown> = new Promise(() => {});
    const control = await listenMigration(runDir(argv.runDir), qmp, {
      status: () => ({ qmp, peer: argv.peer, phase, committed }),
      abort: async (): Promise<AbortOutcome> => {
        if (committed) return { aborted: false, message: 'too late: the commit was sent, the guest runs on the destination' };
        ac.abort(new Error('aborted by vmshift abort'));
        return outcome.then(() => ({ aborted: false, message: 'too late: the migration completed first; the guest runs on the destination' }),
          (e: Error) => ({ aborted: !(e instanceof MigrateError && e.inDoubt), message: e.message }));
      },
    });
    try {
      const run = migrateMemory({
        qmp, peer, destQmp: argv.destQmp,
        sharedDir: argv.sharedDir ? resolve(argv.sharedDir) : undefined,
        maxDowntimeMs: parseDuration(argv.maxDowntime, '--max-downtime'),
        bandwidth,
        compress: argv.compress, cacheSize: parseSize(argv.cacheSize, '--cache-size'),
        linkRate: argv.linkRate ? parseSize(argv.linkRate, '--link-rate') : undefined,
        holdMs, balloon,
        timeoutMs, timeoutAction: argv.timeoutAction as 'abort' | 'suspend', paused: argv.paused,
        peerVmshift: argv.peerVmshift, peerSocketDir: argv.peerSocketDir, onEvent, signal: ac.signal,
        // The guest is stopped on the source: every disk's peer must hold every acknowledged write before it resumes on the peer.
        ...(disks ? { beforeCommit: () => disks!.inSync(settleTimeoutMs(holdMs)) } : {}),
      }).catch(async (e) => {
        // In doubt the guest may run on the peer's disks: keep them there (never remove data
        // a guest may be using); the source jobs roll back when this process exits.
        if (disks && e instanceof MigrateError && e.inDoubt) await disks.keepPeer().catch(() => {});
        else if (disks) await disks.abort((e as Error).message);
        await disks?.close();
        throw e;
      });
      outcome = run;
      run.catch(() => {});
      const done = await run;
      if (disks) {
        await disks.handover();
        const stats = disks.stats;
        await disks.close();
        if (argv.json) printJson({ event: 'disks-moved', link: stats });
        else process.stderr.write(`disks moved: the peer's shims serve them (disk link: ${stats.reconnects} reconnects, ${formatBytes(stats.resentBytes)} resent)\n`);
      }
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
      // Give an abort that is waiting for the outcome a moment to send it.
      await new Promise((r) => setTimeout(r, 100));
      await control.close();
    }
    // The guest runs on the destination and the link is over; a carrier dial still in flight
    // towards a peer whose network is gone (seen: the CLI alive minutes after "done" when
    // the network was cut until the end) must not keep this command from returning.
    process.exit(0);
  },
};
