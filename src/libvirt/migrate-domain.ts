// `vmshift migrate DOMAIN qemu+ssh://HOST/system`: a running libvirt guest moves to another
// host through libvirt's own live migration, with everything that crosses between the hosts
// on vmshift's resumable link (src/link/): QEMU's migration stream and its return path, and
// libvirt's own connection to the peer's libvirtd. A reset or a short cut of the network is
// then hidden from QEMU and from libvirt alike (docs/libvirt-migrate.md, measured there).
//
//   host A (here)                                         host B (the peer)
//   virsh migrate --live --suspend ...                    libvirtd (Prepare/Finish)
//     dest URI qemu+unix:///system?socket=RUN/migrate/ID/libvirt.sock
//        \-- stream libvirt-N ======== link ========> agent -> /run/libvirt/libvirt-sock
//   source QEMU --unix RUN/migrate/ID/mig.sock          destination QEMU listening at the
//        \-- stream memory =========== link ========> agent -> same path on B
//
// Exactly one running copy. libvirt's Finish would resume the destination on its own, and
// its client gives up on Finish's answer when its connection to B breaks, then resumes the
// source (Confirm cancelled): a lost answer would leave two running copies. So libvirt runs
// the migration with --suspend (the destination stays paused after Finish), and the commit is
// ours: once Finish's success answer sits whole in virsh's socket (finish-answer.ts), libvirt
// will never resume the source copy, so B's disks are kept for good and B's agent resumes
// the destination there, while Confirm kills the source. Who wins at each cut point, and the
// argument from libvirt 9.0's source: docs/libvirt-migrate.md.
import { randomBytes } from 'node:crypto';
import { chmodSync, chownSync, closeSync, constants as fsc, mkdirSync, openSync, readFileSync, rmSync, writeSync } from 'node:fs';
import { join } from 'node:path';
import type { Link } from '../link/link.ts';
import { agentLink, peerName as sshPeerName } from '../link/agent-link.ts';
import { forwardUnix, type UnixForward } from '../relay/unix-splice.ts';
import { CONTROL_STREAM, Control } from '../relay/control.ts';
import { MEMORY_STREAM, sourceRelay, type SourceRelay } from '../relay/memory-relay.ts';
import { LIBVIRT_STREAM_PREFIX } from '../relay/libvirt-destination.ts';
import { MigrateError } from '../relay/migrate.ts';
import { Virsh, VirshError } from './virsh.ts';
import { VirshSession, watchLifecycle } from './virsh-session.ts';
import { FinishAnswerWatch } from './finish-answer.ts';
import { faultPoint } from '../util/fault-point.ts';
import type { DestUri } from './dest-uri.ts';
import { HandoverError, SharedStorageHandover, parseDomblklist, type DiskHandover } from './disk-handover.ts';
import { LocalDisksHandover, type LocalDisksOptions } from './local-disk-handover.ts';
import { isEnabled } from './domain-xml.ts';
import type { DiskEvent } from '../hostmove/disks.ts';

export interface DomainMigrateOptions {
  domain: string;
  /** This host's libvirt (default qemu:///system). */
  sourceUri: string;
  dest: DestUri;
  /**
   * How libvirt reaches the peer's libvirtd: over the link (default: a reset or a cut shorter
   * than the hold time is hidden from it), or `direct`, virsh's own connection to `destUri`
   * (kept for measuring the difference: docs/libvirt-migrate.md).
   */
  libvirtVia?: 'link' | 'direct';
  destUri?: string;
  identity: string;
  knownHosts: string;
  sharedDir?: string;
  maxDowntimeMs: number;
  /** Bytes per second; 0 = no limit. */
  bandwidth: number;
  /** Define the domain on the destination (virsh --persistent). */
  persistent: boolean;
  /** Undefine it here once it runs there (virsh --undefinesource). */
  undefineSource: boolean;
  /** vmshift's run directory: the same path on both hosts (the migration socket lives under it). */
  runDir: string;
  peerVmshift: string;
  peerSocketDir: string;
  holdMs?: number;
  connectTimeoutMs: number;
  onEvent: (e: DomainMigrateEvent) => void;
  signal?: AbortSignal;
  /**
   * Where a vmshift-enabled domain's local disks go on the peer (--to-dir, --disk DEV=PATH),
   * the peer's vmshiftd config (its datastores) and libvirt hook config (its vmshiftd socket).
   * A domain without vmshift moves on shared storage (proven by a probe file).
   */
  localDisks?: LocalDisksOptions & { peerConfig?: string; peerHookConfig?: string };
}

export interface JobInfo {
  type: string;
  operation?: string;
  processed: number;
  remaining: number;
  total: number;
  downtimeMs: number | null;
}

export type DomainMigrateEvent =
  | { event: 'connected'; peer: string }
  | { event: 'prepared'; handover: string; disks: string[] }
  | { event: 'progress'; processed: number; remaining: number; total: number; pct: number; relayed: number }
  | { event: 'carrier'; state: string; why: string }
  | { event: 'warning'; message: string }
  | { event: 'committed'; commitMs: number }
  | Exclude<DiskEvent, { event: 'carrier' }>
  | DomainMigrateDone;

export interface DomainMigrateDone {
  event: 'done';
  ms: number;
  /** libvirt's figure (the destination's completed job): until the destination had everything. */
  downtimeMs: number | null;
  /** From the word that the source copy will not run again (Finish's answer in virsh's socket, else its Stopped event or virsh's end) to the destination running. */
  commitMs: number;
  /** From the source's pause for the switch-over (its Suspended event) to the destination running: the guest's pause. */
  pausedMs: number | null;
  /** From the source's pause to Finish's success answer delivered to virsh (null: not seen). */
  answeredMs: number | null;
  /** How long the resume took on the peer (its own libvirtd; null: resumed from here). */
  peerResumeMs: number | null;
  /** From the source's pause to its Stopped Migrated event (Confirm killed its QEMU; null: not seen by then). */
  goneMs: number | null;
  relayed: { forward: number; back: number };
  link: ReturnType<Link['stats']>;
  persistent: boolean;
  undefinedSource: boolean;
}

const SIZE_UNITS: Record<string, number> = { B: 1, KiB: 1024, MiB: 1024 ** 2, GiB: 1024 ** 3, TiB: 1024 ** 4 };

/** `virsh domjobinfo [--completed]` (its human form: the one every libvirt version prints). */
export function parseJobInfo(text: string): JobInfo {
  const f = new Map<string, string>();
  for (const line of text.split('\n')) {
    const i = line.indexOf(':');
    if (i > 0) f.set(line.slice(0, i).trim(), line.slice(i + 1).trim());
  }
  const size = (k: string) => {
    const m = /^([\d.]+)\s*(B|KiB|MiB|GiB|TiB)$/.exec(f.get(k) ?? '');
    return m ? Math.round(Number(m[1]) * SIZE_UNITS[m[2]]) : 0;
  };
  const dt = /^(\d+)\s*ms$/.exec(f.get('Total downtime') ?? '');
  return { type: f.get('Job type') ?? '', operation: f.get('Operation'), processed: size('Data processed'), remaining: size('Data remaining'), total: size('Data total'), downtimeMs: dt ? Number(dt[1]) : null };
}

/** One `vmshift migrate` per domain on this host: a lock file naming the process. */
function takeLock(runDir: string, domain: string): () => void {
  const dir = join(runDir, 'migrations');
  mkdirSync(dir, { recursive: true, mode: 0o700 });
  const path = join(dir, `${encodeURIComponent(domain)}.lock`);
  for (let attempt = 0; attempt < 2; attempt++) {
    try {
      const fd = openSync(path, fsc.O_WRONLY | fsc.O_CREAT | fsc.O_EXCL | fsc.O_NOFOLLOW, 0o600);
      writeSync(fd, JSON.stringify({ pid: process.pid, started: new Date().toISOString() }));
      closeSync(fd);
      return () => rmSync(path, { force: true });
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code !== 'EEXIST') throw e;
      let holder: { pid?: number; started?: string } = {};
      try { holder = JSON.parse(readFileSync(path, 'utf8')); } catch { /* torn: treat as stale */ }
      if (holder.pid && isAlive(holder.pid)) throw new MigrateError('usage', `a migration of '${domain}' is already running (vmshift pid ${holder.pid}, since ${holder.started}); nothing was changed`);
      rmSync(path, { force: true }); // its process is gone
    }
  }
  throw new MigrateError('usage', `cannot take the migration lock ${path}`);
}

function isAlive(pid: number): boolean {
  try { process.kill(pid, 0); return true; } catch (e) { return (e as NodeJS.ErrnoException).code === 'EPERM'; }
}

/** The gid of `libvirt-qemu`, whom the source QEMU runs as on a stock host; null when absent. */
function qemuGid(): number | null {
  try {
    const line = readFileSync('/etc/group', 'utf8').split('\n').find((l) => l.startsWith('libvirt-qemu:'));
    return line ? Number(line.split(':')[2]) : null;
  } catch {
    return null;
  }
}

// unref'd: a wait for the link to wind down must not hold the command after its result.
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms).unref());

interface VirshLike { run(args: string[]): Promise<string> }

async function stateOf(v: VirshLike, domain: string): Promise<string | null> {
  try {
    return (await v.run(['domstate', '--domain', domain])).trim();
  } catch (e) {
    if (e instanceof VirshError && e.kind === 'no-domain') return null;
    throw e;
  }
}

export async function migrateDomain(o: DomainMigrateOptions): Promise<DomainMigrateDone> {
  const t0 = performance.now();
  const src = new Virsh({ uri: o.sourceUri, timeoutMs: 60_000 });
  const peerName = sshPeerName(o.dest);
  const state0 = await stateOf(src, o.domain).catch((e: Error) => { throw new MigrateError('source', `cannot ask libvirt (${o.sourceUri}) about '${o.domain}': ${e.message}`); });
  if (state0 === null) throw new MigrateError('usage', `domain '${o.domain}' is not defined on this host (${o.sourceUri}); nothing was changed`);
  if (state0 !== 'running' && state0 !== 'paused') throw new MigrateError('usage', `domain '${o.domain}' is ${state0}: only a running or paused guest migrates live; nothing was changed`);
  const wasRunning = state0 === 'running';
  const unlock = takeLock(o.runDir, o.domain);
  const id = randomBytes(6).toString('hex');
  const dir = join(o.runDir, 'migrate', id);
  let link: Link | null = null;
  let relay: SourceRelay | null = null;
  let fwd: UnixForward | null = null;
  let ctl: Control | null = null;
  let handover: DiskHandover | null = null;
  let committed = false;
  let session: VirshSession | null = null;
  let watcher: { close(): void } | null = null;
  try {
    const job0 = parseJobInfo(await src.run(['domjobinfo', o.domain]));
    if (job0.type && job0.type !== 'None') throw new MigrateError('usage', `libvirt already runs a job on '${o.domain}' (${job0.type}${job0.operation ? `, ${job0.operation}` : ''}); nothing was changed`);
    const xml = await src.dumpxml(o.domain);
    const disks = parseDomblklist(await src.run(['domblklist', o.domain, '--details']));

    // The link: the agent on the peer carries libvirt's connection and the migration stream,
    // and for a vmshift-enabled domain its disks (src/hostmove/peer.ts) too.
    const local = isEnabled(xml);
    const ld = o.localDisks;
    const target = { host: o.dest.host, port: o.dest.port, user: o.dest.user, identity: o.identity, knownHosts: o.knownHosts, peerVmshift: o.peerVmshift, peerSocketDir: o.peerSocketDir, sharedDir: o.sharedDir, holdMs: o.holdMs, peerConfig: ld?.peerConfig };
    const l = agentLink(target, 'dom', 'link', ['--libvirt-socket', o.dest.socket,
      ...(local ? ['--disks', ...(ld?.peerConfig ? ['--disks-config', ld.peerConfig] : []), ...(ld?.peerHookConfig ? ['--hook-config', ld.peerHookConfig] : [])] : [])]);
    link = l;
    l.on('carrier', (state: string, why: string) => o.onEvent({ event: 'carrier', state, why }));
    l.on('warning', (m: string) => o.onEvent({ event: 'warning', message: m }));
    await new Promise<void>((resolve, reject) => {
      let lastWhy = 'no answer';
      const t = setTimeout(() => reject(new MigrateError('link', `cannot reach ${peerName} within ${Math.round(o.connectTimeoutMs / 1000)} s (${lastWhy}); nothing was changed`)), o.connectTimeoutMs);
      l.on('carrier', (state: string, why: string) => { if (state === 'up') { clearTimeout(t); resolve(); } else lastWhy = why; });
      l.once('failed', (e: Error) => { clearTimeout(t); reject(new MigrateError('link', `${e.message}; nothing was changed`)); });
      o.signal?.addEventListener('abort', () => { clearTimeout(t); reject(new MigrateError('source', 'interrupted; nothing was changed')); }, { once: true });
    });
    o.onEvent({ event: 'connected', peer: peerName });

    mkdirSync(dir, { recursive: true, mode: 0o700 });
    const migrateSocket = join(dir, 'mig.sock');
    const fwdPath = join(dir, 'libvirt.sock');
    // Every connection virsh makes to this socket is a link stream to the peer's libvirtd;
    // what comes back is watched for Finish's success answer reaching virsh (finish-answer.ts).
    let finishAnswered!: () => void;
    const answered = new Promise<void>((r) => { finishAnswered = r; });
    let tAnswered: number | null = null;
    const watches = new Map<number, FinishAnswerWatch>();
    fwd = await forwardUnix(fwdPath, (n) => l.stream(`${LIBVIRT_STREAM_PREFIX}${n}`), (n, chunk, delivered) => {
      let w = watches.get(n);
      if (!w) watches.set(n, w = new FinishAnswerWatch());
      if (w.feed(chunk)) void delivered.then((ok) => { if (ok) { tAnswered ??= performance.now(); finishAnswered(); } });
    });
    const dst = new Virsh({ uri: o.libvirtVia === 'direct' && o.destUri ? o.destUri : `qemu+unix:///system?socket=${fwdPath}`, timeoutMs: 60_000 });
    const c = new Control(l.stream(CONTROL_STREAM), peerName);
    ctl = c;
    let prepared = false;
    const peerPrepare = async (probes: string[]): Promise<Array<string | null>> => {
      c.send({ op: 'libvirt-prepare', migrateSocket, probes });
      const r = await c.next(30_000);
      if (r.op === 'error') throw new MigrateError('destination', r.message);
      if (r.op !== 'libvirt-ready') throw new MigrateError('destination', `unexpected answer "${r.op}" to libvirt-prepare`);
      prepared = true;
      return r.probes;
    };

    // Nothing is changed on either host before these checks pass.
    session = new VirshSession(dst.uri);
    const destState = await stateOf(session, o.domain).catch((e: Error) => { throw new MigrateError('destination', `cannot reach libvirt on ${peerName} (${o.dest.socket}): ${e.message}`); });
    if (destState === 'running' || destState === 'paused') throw new MigrateError('destination', `${peerName} already runs a domain named '${o.domain}' (${destState}); nothing was changed`);
    const definedOnDest = destState !== null;
    handover = local
      ? new LocalDisksHandover({
        domain: o.domain, disks, xml, persistent: o.persistent, link: l, target, workDir: dir, onEvent: o.onEvent,
        migratableXml: await src.run(['dumpxml', '--migratable', '--domain', o.domain]),
        inactiveXml: await src.run(['dumpxml', '--inactive', '--migratable', '--domain', o.domain]),
      }, { paths: ld?.paths ?? {}, toDir: ld?.toDir, bandwidth: ld?.bandwidth })
      : new SharedStorageHandover(o.domain, disks, xml, peerName);
    try {
      await handover.prepare({ readFiles: peerPrepare });
    } catch (e) {
      if (e instanceof HandoverError) throw new MigrateError('usage', `${e.message}; nothing was changed`);
      throw e;
    }
    if (!prepared) await peerPrepare([]);
    o.onEvent({ event: 'prepared', handover: handover.kind, disks: disks.map((d) => d.target) });
    await handover.copy();
    await handover.sync();

    relay = await sourceRelay(migrateSocket, () => l.stream(MEMORY_STREAM));
    relay.done.catch(() => {});
    // The source QEMU connects as libvirt's QEMU user on a stock host: the directory is
    // searchable, the socket its group's; its path holds a random id nobody else knows.
    const gid = qemuGid();
    if (gid !== null) { chmodSync(dir, 0o711); chownSync(migrateSocket, 0, gid); chmodSync(migrateSocket, 0o660); }

    await src.run(['migrate-setmaxdowntime', o.domain, String(o.maxDowntimeMs)]);
    const args = ['migrate', '--live', '--suspend', ...(o.persistent ? ['--persistent'] : []), ...(o.undefineSource ? ['--undefinesource'] : []),
      ...handover.virshFlags(), ...(o.bandwidth ? ['--bandwidth', String(Math.max(1, Math.round(o.bandwidth / 1024 ** 2)))] : []),
      '--migrateuri', `unix://${migrateSocket}`, o.domain, dst.uri];
    // The commit: at the earliest, virsh holds Finish's success answer (tAnswered, above): the
    // source copy then never runs again. Without that word (--libvirt-via direct), Confirm
    // killing the source QEMU ("Stopped Migrated") or virsh's end tells.
    let goneSeen = false;
    let tGone: number | null = null;
    let sourceGone!: () => void;
    const gone = new Promise<void>((r) => { sourceGone = r; });
    // "Suspended Migrated": the source paused for the switch-over; the guest's pause runs from there.
    let tSuspended: number | null = null;
    watcher = watchLifecycle(o.sourceUri, o.domain, (line) => {
      if (/Suspended Migrated/i.test(line)) tSuspended ??= performance.now();
      if (/Stopped Migrated/i.test(line)) { goneSeen = true; tGone ??= performance.now(); sourceGone(); }
    });
    let migrateError: Error | null = null;
    let finished = false;
    const migrating = src.run(args, { timeoutMs: 24 * 3600_000 }).then(() => {}, (e: Error) => { migrateError = e; }).finally(() => { finished = true; });
    const onAbort = () => { if (!finished) void src.run(['domjobabort', o.domain]).catch(() => {}); };
    o.signal?.addEventListener('abort', onAbort, { once: true });
    while (!finished && !goneSeen && tAnswered === null) {
      await Promise.race([migrating, gone, answered, sleep(1000)]);
      if (finished || goneSeen || tAnswered !== null) break;
      const j = parseJobInfo(await src.run(['domjobinfo', o.domain]).catch(() => ''));
      if (j.type && j.type !== 'None') o.onEvent({ event: 'progress', processed: j.processed, remaining: j.remaining, total: j.total, pct: j.total ? Math.round((100 * (j.total - j.remaining)) / j.total) : 0, relayed: relay.counts.forward });
    }
    o.signal?.removeEventListener('abort', onAbort);
    const tVirsh = performance.now();

    // Where the guest is now decides who wins (docs/libvirt-migrate.md, "Exactly one running copy").
    const early = tAnswered !== null;
    const here = goneSeen || early ? 'shut off' : await stateOf(src, o.domain).catch(() => 'unknown');
    const hereActive = here === 'running' || here === 'paused' || here === 'unknown';
    if (early) {
      // virsh has Finish's answer: it confirms the migration (the source QEMU is killed) or, if
      // it or its connection here dies first, the source stays paused. B's copy is the guest.
    } else if (!goneSeen && !hereActive && migrateError) {
      // virsh failed, but this host's copy is gone (the event was missed): the destination's
      // paused copy is all there is, so it must run; destroying it would lose the guest.
      const there = await stateOf(dst, o.domain).catch(() => null);
      if (there !== 'paused') throw new MigrateError('destination', `libvirt's migration failed (${(migrateError as Error).message}) and '${o.domain}' is ${here ?? 'not defined'} here and ${there ?? 'not defined'} on ${peerName}: check both hosts`, true);
      o.onEvent({ event: 'warning', message: `virsh migrate failed (${(migrateError as Error).message}), but '${o.domain}' is gone from here and paused on ${peerName}: resuming it there` });
    } else if (!goneSeen && (migrateError || hereActive)) {
      const why = migrateError ? (migrateError as Error).message : `virsh reported success but '${o.domain}' is still ${here} here`;
      // The destination's copy first (it never ran: --suspend), then the source runs on.
      await dropDestCopy(dst, o.domain, definedOnDest, (m) => o.onEvent({ event: 'warning', message: m }));
      if (here === 'paused' && wasRunning && migrateError) await src.run(['resume', o.domain]).catch(() => {});
      throw new MigrateError('source', `libvirt's migration failed: ${why}; '${o.domain}' runs on here${here === 'unknown' ? ' (check it: this host\'s libvirt did not answer)' : ''}`);
    }
    if (early) await faultPoint('libvirt-finish-answered');
    // The destination's paused copy is the guest: its disks stay there for good, then it runs.
    committed = true;
    await handover.keep().catch((e: Error) => {
      throw new MigrateError('link', `'${o.domain}' will not run here again (libvirt's Finish succeeded) and is paused on ${peerName}, but its disks there could not be kept for good (${e.message}): check its disks there before resuming it (virsh resume ${o.domain})`, true);
    });
    let peerResumeMs: number | null = null;
    await resumeOnPeer(c, o.domain, (m) => o.onEvent({ event: 'warning', message: m })).then((ms) => { peerResumeMs = ms; return ms !== null ? undefined : resumeDest(session!, dst, o.domain, l, o.holdMs ?? 60_000); }).catch((e: Error) => {
      throw new MigrateError('link', `'${o.domain}' will not run here again (libvirt's Finish succeeded) and is paused on ${peerName}, but resuming it there failed (${e.message}): resume it there (virsh -c ${o.dest.host} resume ${o.domain})`, true);
    });
    const tResumed = performance.now();
    const commitMs = Math.round(tResumed - tVirsh);
    const sinceSuspended = (t: number | null) => (tSuspended !== null && t !== null ? Math.round(t - tSuspended) : null);
    const pausedMs = sinceSuspended(tResumed);
    o.onEvent({ event: 'committed', commitMs });
    await migrating;
    if (migrateError) o.onEvent({ event: 'warning', message: `virsh migrate reported, after Finish had succeeded: ${(migrateError as Error).message}` });
    if (early && !goneSeen) await dropSourceCopy(src, o.domain, peerName, (m) => o.onEvent({ event: 'warning', message: m }));
    await handover.commit();
    const done = parseJobInfo(await session.run(['domjobinfo', '--completed', '--keep-completed', '--domain', o.domain]).catch(() => ''));
    // Every stream ends before the link can finish: libvirt's connections first.
    session.close();
    session = null;
    c.end();
    fwd.close();
    await Promise.race([Promise.all([relay.done.catch(() => {}), l.finish()]), sleep(10_000)]);
    return {
      event: 'done', ms: Math.round(performance.now() - t0), downtimeMs: done.downtimeMs, commitMs, pausedMs,
      answeredMs: sinceSuspended(tAnswered), goneMs: sinceSuspended(tGone), peerResumeMs, relayed: relay.counts, link: l.stats(),
      persistent: o.persistent, undefinedSource: o.undefineSource,
    };
  } catch (e) {
    if (!committed) await handover?.rollback().catch(() => {});
    throw e instanceof MigrateError ? e : new MigrateError('source', (e as Error).message);
  } finally {
    relay?.close();
    fwd?.close();
    watcher?.close();
    session?.close();
    if (link && link.state === 'running') {
      if (ctl && !committed) {
        ctl.send({ op: 'abort', reason: 'the migration ended on the source' });
        await Promise.race([ctl.next().catch(() => {}), sleep(3000)]);
      }
      link.abort(committed ? 'finished: the guest runs on the destination' : 'the migration was rolled back');
    }
    rmSync(dir, { recursive: true, force: true });
    unlock();
  }
}

/**
 * The commit's fast path: the agent on the peer resumes the domain through its own libvirtd
 * (one message on the link, no virsh round trips over it): how long its resume took there, or
 * null: it could not (the caller falls back to resuming it from here; the reason is warned).
 */
async function resumeOnPeer(c: Control, domain: string, warn: (m: string) => void): Promise<number | null> {
  c.send({ op: 'libvirt-resume', domain });
  // An agent of an older vmshift ignores the message: it then gets resumed from here.
  const r = await c.next(5000).catch((e: Error) => ({ op: 'error' as const, message: e.message }));
  if (r.op === 'libvirt-resumed') return r.ms;
  warn(`the peer did not resume '${domain}' itself (${r.op === 'error' ? r.message : `answer ${r.op}`}): resuming it from here`);
  return null;
}

/** Resume the paused destination, through the link; a reset in between is retried. */
async function resumeDest(session: VirshSession, dst: Virsh, domain: string, link: Link, holdMs: number): Promise<void> {
  const deadline = Date.now() + holdMs;
  // The session's connection is open already; should it have broken, a fresh one is made.
  for (let v: VirshLike = session; ; v = dst) {
    try {
      await v.run(['resume', '--domain', domain]);
      return;
    } catch (e) {
      const st = await stateOf(dst, domain).catch(() => null);
      if (st === 'running') return;
      if (link.state !== 'running' || Date.now() > deadline) throw e;
      await sleep(500);
    }
  }
}

/**
 * After a commit on Finish's answer, once virsh ended: Confirm should have killed this host's
 * copy. If it is still here (Confirm failed, or virsh died before it), it is paused and stale:
 * destroyed, as Confirm would have done. It can never be running (libvirt resumes it only on
 * Confirm(cancelled), which virsh sends only without Finish's answer); if it is, both hosts run
 * the guest: said loudly, nothing touched.
 */
async function dropSourceCopy(src: Virsh, domain: string, peerName: string, warn: (m: string) => void): Promise<void> {
  const st = await stateOf(src, domain).catch(() => 'unknown');
  if (st === 'paused') {
    await src.run(['destroy', domain]).then(
      () => warn(`libvirt's Confirm did not stop the copy of '${domain}' here (paused, stale: the guest runs on ${peerName}); destroyed it`),
      (e: Error) => warn(`the stale paused copy of '${domain}' here (the guest runs on ${peerName}) could not be destroyed (${e.message}): destroy it, never resume it (virsh destroy ${domain})`));
  } else if (st === 'running') {
    throw new MigrateError('source', `'${domain}' RUNS here although libvirt's Finish succeeded and it runs on ${peerName}: stop one copy now`, true);
  } else if (st === 'unknown') {
    warn(`cannot ask libvirt here about '${domain}' after the migration: it must not run here (it runs on ${peerName}); if it is paused here, destroy it`);
  }
}

/** After a failure: the destination's copy (paused: it never ran) is destroyed, its definition undone. */
async function dropDestCopy(dst: Virsh, domain: string, definedBefore: boolean, warn: (m: string) => void): Promise<void> {
  try {
    const st = await stateOf(dst, domain);
    if (st === 'running') { warn(`'${domain}' RUNS on the destination although the migration failed; not touching it`); return; }
    if (st === 'paused') await dst.run(['destroy', domain]);
    if (st !== null && !definedBefore) await dst.run(['undefine', domain]).catch(() => {});
  } catch (e) {
    warn(`cannot check the destination for a paused copy of '${domain}' (${(e as Error).message}): it never ran; destroy it there if it exists`);
  }
}
