// `vmshift migrate DOMAIN qemu+ssh://[USER@]HOST[:PORT]/system`: move a running libvirt
// guest to another host through libvirt's own live migration, its streams on vmshift's link
// (src/libvirt/migrate-domain.ts). The `migrate` verb (src/cli/migrate-memory.ts) comes here
// when it is given a domain. A progress bar on a terminal (stderr), JSON lines with --json.
// Exit 0: the guest runs on the destination; 1: it failed and runs here; 3: in doubt.
import cliProgress from 'cli-progress';
import { homedir } from 'node:os';
import { join, resolve } from 'node:path';
import { formatBytes, parseDuration, parseSize } from '../util/size.ts';
import { printJson, UsageError } from './output.ts';
import { exitIfInDoubt } from './migrate-memory.ts';
import { DestUriError, parseDestUri } from '../libvirt/dest-uri.ts';
import { migrateDomain, type DomainMigrateEvent } from '../libvirt/migrate-domain.ts';

export interface DomainArgs {
  domain: string;
  desturi?: string;
  connect: string;
  identity?: string;
  knownHosts?: string;
  sharedDir?: string;
  maxDowntime: string;
  bandwidth?: string;
  holdTime: string;
  connectTimeout: string;
  persistent: boolean;
  undefineSource: boolean;
  runDir: string;
  peerVmshift: string;
  peerSocketDir: string;
  libvirtVia: 'link' | 'direct';
  disk?: string[];
  toDir?: string;
  peerConfig?: string;
  peerHookConfig?: string;
  json: boolean;
}

/** `--disk DEV=PATH` (with DOMAIN): the new file on the peer of each disk target. */
export function parseDomainDisks(specs: string[] = []): Record<string, string> {
  const paths: Record<string, string> = {};
  for (const d of specs) {
    const m = /^([A-Za-z0-9_.-]{1,64})=(\/.+)$/.exec(d);
    if (!m) throw new UsageError(`--disk ${d}: with a DOMAIN, expected DEV=/PATH/ON/PEER (e.g. vda=/srv/images/web.raw)`);
    if (Object.hasOwn(paths, m[1]!)) throw new UsageError(`--disk ${m[1]}: given twice`);
    paths[m[1]!] = m[2]!;
  }
  return paths;
}

export async function migrateDomainHandler(argv: DomainArgs): Promise<void> {
  if (!argv.desturi) throw new UsageError('migrate DOMAIN: name the destination, qemu+ssh://[USER@]HOST[:PORT]/system');
  let dest;
  try { dest = parseDestUri(argv.desturi); } catch (e) { if (e instanceof DestUriError) throw new UsageError(e.message); throw e; }
  const paths = parseDomainDisks(argv.disk);
  if (argv.toDir !== undefined && !argv.toDir.startsWith('/')) throw new UsageError(`--to-dir ${argv.toDir}: the directory on the peer must be absolute`);
  const ac = new AbortController();
  const onInt = () => ac.abort();
  process.once('SIGINT', onInt);
  const bar = !argv.json && process.stderr.isTTY
    ? new cliProgress.SingleBar({ format: 'memory [{bar}] {percentage}% {done} of {total_h}, {left} left', stream: process.stderr }, cliProgress.Presets.shades_classic)
    : null;
  let barOn = false;
  let last = 0;
  const say = (s: string) => { if (barOn) { bar!.stop(); barOn = false; } process.stderr.write(`${s}\n`); };
  const onEvent = (e: DomainMigrateEvent) => {
    if (argv.json) { printJson(e); return; }
    if (e.event === 'progress') {
      const payload = { done: formatBytes(e.processed), total_h: formatBytes(e.total), left: formatBytes(e.remaining) };
      if (bar) {
        if (!barOn) { bar.start(100, e.pct, payload); barOn = true; } else bar.update(e.pct, payload);
        return;
      }
      const now = Date.now();
      if (now - last < 1000) return;
      last = now;
      process.stderr.write(`memory: ${e.pct}% (${payload.done} of ${payload.total_h}, ${payload.left} left)\n`);
    } else if (e.event === 'connected') say(`link to ${e.peer} up`);
    else if (e.event === 'prepared') say(`disks: ${e.handover} (${e.disks.join(', ') || 'none'}); libvirt migrates the memory`);
    else if (e.event === 'warning') say(`warning: ${e.message}`);
    else if (e.event === 'carrier') say(`link ${e.state}: ${e.why}`);
    else if (e.event === 'disks-prepared') say(`disks on the peer: ${e.disks.map((d) => `${d.name} ${d.path}`).join(', ')}`);
    else if (e.event === 'disks-synchronized') say('disks: synchronized mirror (every write on both hosts)');
    else if (e.event === 'disk-progress') { if (Date.now() - last >= 1000) { last = Date.now(); say(`disk ${e.disk}: ${e.phase}, ${formatBytes(e.bytesCopied)} of ${formatBytes(e.dataBytes)} copied`); } }
    else if (e.event === 'disks-moved') say(`disks moved: ${e.disks.map((d) => `${d.name} ${formatBytes(d.bytesCopied)} copied, ${formatBytes(d.mirroredBytes)} mirrored${d.writes ? `, guest writes p99 ${d.writes.p99Ms} ms max ${d.writes.maxMs} ms${d.writes.degradedWrites ? ` (${d.writes.degradedWrites} answered here alone during a cut, copied after)` : ''}` : ''}`).join('; ')}`);
    else if (e.event === 'committed') say(`gone from here; resumed on the destination (${e.commitMs} ms after the source stopped)`);
  };
  try {
    const done = await migrateDomain({
      domain: argv.domain, sourceUri: argv.connect, dest, destUri: argv.desturi, libvirtVia: argv.libvirtVia,
      identity: resolve(dest.keyfile ?? argv.identity ?? join(homedir(), '.ssh/id_ed25519')),
      knownHosts: resolve(dest.knownHosts ?? argv.knownHosts ?? join(homedir(), '.ssh/known_hosts')),
      sharedDir: argv.sharedDir ? resolve(argv.sharedDir) : undefined,
      maxDowntimeMs: parseDuration(argv.maxDowntime, '--max-downtime'),
      bandwidth: argv.bandwidth ? parseSize(argv.bandwidth, '--bandwidth') : 0,
      holdMs: parseDuration(argv.holdTime, '--hold-time'),
      connectTimeoutMs: parseDuration(argv.connectTimeout, '--connect-timeout'),
      persistent: argv.persistent, undefineSource: argv.undefineSource,
      runDir: resolve(argv.runDir), peerVmshift: argv.peerVmshift, peerSocketDir: argv.peerSocketDir,
      localDisks: { paths, toDir: argv.toDir, bandwidth: argv.bandwidth ? parseSize(argv.bandwidth, '--bandwidth') : 0, peerConfig: argv.peerConfig, peerHookConfig: argv.peerHookConfig },
      onEvent, signal: ac.signal,
    });
    if (barOn) bar!.stop();
    if (argv.json) printJson(done);
    else process.stderr.write(`done in ${(done.ms / 1000).toFixed(1)} s: '${argv.domain}' runs on ${dest.host}${done.persistent ? ' (defined there)' : ''}${done.undefinedSource ? ', undefined here' : ''}; paused ${done.pausedMs ?? '?'} ms (libvirt's downtime ${done.downtimeMs} ms, commit ${done.commitMs} ms); link: ${done.link.reconnects} reconnects, ${formatBytes(done.link.resentBytes)} resent\n`);
  } catch (e) {
    if (barOn) bar!.stop();
    exitIfInDoubt(e, argv.json);
    throw e;
  } finally {
    process.off('SIGINT', onInt);
  }
}
