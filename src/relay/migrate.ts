// The source half of `vmshift migrate` (memory): a running guest whose disks both hosts
// reach moves to a destination QEMU on the peer (started there with `-incoming defer -S`).
// Over one link to the peer's agent (src/link/, SSH carrier, optional shared directory):
// `prepare` on the control stream (the agent sets the destination up and listens), the
// source's capabilities and parameters, the relay socket, `migrate`, then `query-migrate`
// followed until the source is in postmigrate. Only then the commit record goes to the
// destination, which resumes the guest. Before the commit any failure rolls back: the
// source runs on (resumed if it was paused), the destination QEMU is quit, relays stop.
// After the commit the source never resumes: the destination owns the guest.
// With `balloon` (src/balloon/): refused before anything starts unless the guest has a
// balloon that reports statistics; shrunk once the destination is ready, watched during the
// migration, given back by the destination after `cont` (by the source after a rollback).
import { randomBytes } from 'node:crypto';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { QmpClient } from '../qemu/qmp.ts';
import { Link } from '../link/link.ts';
import { agentDialer, peerName as sshPeerName } from '../link/agent-link.ts';
import { tlsDialer } from '../link/tls-carrier.ts';
import { CONTROL_STREAM, Control } from './control.ts';
import { MEMORY_STREAM, cpuMsSince, sourceRelay, type RelayCounts, type SourceRelay } from './memory-relay.ts';
import { chooseParameters, type Compress } from '../policy/qemu-params.ts';
import type { CacheStats } from './cache/encoder.ts';
import { giveBack, probeBalloon, shrink, watch, type BalloonRun, type ShrinkResult } from '../balloon/shrink.ts';
import type { BalloonDecision, BalloonSettings } from '../balloon/policy.ts';

/** The peer and how to reach it: SSH (the agent is started there per migration) or TLS (a `vmshift link-agent --listen` runs there). */
export type Peer =
  | { scheme: 'ssh'; host: string; port: number; user: string; identity: string; knownHosts: string }
  | { scheme: 'tls'; host: string; port: number; ca: string; cert: string; key: string };

export interface MemoryMigrateOptions {
  qmp: string;
  peer: Peer;
  destQmp: string;
  sharedDir?: string;
  maxDowntimeMs: number;
  /** Bytes per second; 0 = QEMU's default. */
  bandwidth: number;
  /** vmshift's memory cache between the relays, QEMU's XBZRLE, or neither (default). */
  compress?: Compress;
  /** Bytes of page copies for the cache (or QEMU's XBZRLE cache); default 256 MiB. */
  cacheSize?: number;
  /** The link's rate in bytes per second when known: with it the guest's dirty rate is measured and auto-converge decided. */
  linkRate?: number;
  /** The vmshift command on the peer. */
  peerVmshift: string;
  /** Where the peer's agent puts its sockets (a 0700 directory is made). */
  peerSocketDir: string;
  holdMs?: number;
  /** Once the migration has run this long without completing: 0 = never. */
  timeoutMs?: number;
  /** At the timeout: roll back (`abort`), or pause the guest so that the migration completes (`suspend`). */
  timeoutAction?: 'abort' | 'suspend';
  /** Leave the guest paused on the destination after the move (virsh migrate --suspend). */
  paused?: boolean;
  /** Shrink the guest on its statistics before the move (src/balloon/); settings override the defaults. */
  balloon?: Partial<BalloonSettings>;
  onEvent: (e: MigrateEvent) => void;
  /** Aborts the migration (before the commit) when it fires. */
  signal?: AbortSignal;
  /**
   * Runs once the source is in postmigrate (the guest stopped there) and before the commit
   * lets the destination resume: moved disks whose mirror degraded catch up here
   * (PeerDisks.inSync). A failure rolls the migration back.
   */
  beforeCommit?: () => Promise<void>;
}

export type MigrateEvent =
  | { event: 'connected'; peer: string }
  | { event: 'progress'; status: string; pass: number; transferred: number; remaining: number; total: number; dirtyRate: number; etaS: number | null; mbps: number }
  | { event: 'carrier'; state: string; why: string }
  | { event: 'warning'; message: string }
  | { event: 'parameters'; capabilities: Record<string, boolean>; parameters: Record<string, unknown>; reasons: string[] }
  | { event: 'cache'; stats: Omit<CacheStats, 'history'> }
  | ({ event: 'balloon' } & BalloonDecision)
  | { event: 'committed' }
  | { event: 'done'; ms: number; downtimeMs: number | null; transferred: number; relayed: RelayCounts; link: ReturnType<Link['stats']>; balloon?: BalloonSummary; cache?: CacheStats;
    /** CPU milliseconds (user + system) this process used in the move: the source relay, the link and its carrier, QMP. */
    cpuMs: number;
    /** The destination checked it received the stream the source QEMU sent (bytes and CRC-32) before running the guest. */
    streamVerified: boolean };

export type BalloonSummary = ShrinkResult & { atSwitch: number; restored: { target: number } | { error: string } | null };

export class MigrateError extends Error {
  constructor(readonly where: 'source' | 'destination' | 'link' | 'usage', message: string, readonly inDoubt = false) {
    super(message);
    this.name = 'MigrateError';
  }
  get code(): string { return this.inDoubt ? 'in-doubt' : `${this.where}-failed`; }
}

interface RamInfo { transferred?: number; remaining?: number; total?: number; 'dirty-sync-count'?: number; 'dirty-pages-rate'?: number; 'page-size'?: number; mbps?: number }
interface MigrateInfo { status?: string; ram?: RamInfo; 'error-desc'?: string; downtime?: number; 'total-time'?: number }

const ACTIVE = new Set(['setup', 'active', 'pre-switchover', 'device', 'wait-unplug', 'cancelling']);

export async function migrateMemory(o: MemoryMigrateOptions): Promise<MigrateEvent & { event: 'done' }> {
  const t0 = performance.now();
  const cpu0 = process.cpuUsage();
  const src = await QmpClient.connect(o.qmp, { connectTimeoutMs: 5000 }).catch((e: Error) => { throw new MigrateError('source', `cannot reach the source QEMU at ${o.qmp}: ${e.message}`); });
  const st0 = await src.execute<{ status: string }>('query-status');
  if (st0.status !== 'running' && st0.status !== 'paused') { await src.close(); throw new MigrateError('source', `the source guest is "${st0.status}"; only a running or paused guest can migrate`); }
  const mi0 = await src.execute<MigrateInfo>('query-migrate');
  if (mi0.status && ACTIVE.has(mi0.status)) { await src.close(); throw new MigrateError('source', `the source QEMU already has a migration "${mi0.status}"`); }
  const wasRunning = st0.status === 'running';
  // Said before anything starts: no link, no destination touched.
  let balloon: BalloonRun | null = null;
  if (o.balloon) {
    balloon = await probeBalloon(src, 'the source guest', o.balloon).catch(async (e: Error) => {
      await src.close();
      throw new MigrateError('source', `--balloon: ${e.message}`);
    });
  }
  const onBalloon = (d: BalloonDecision) => o.onEvent({ event: 'balloon', ...d });
  let shrunk: ShrinkResult | null = null;

  const id = randomBytes(6).toString('hex');
  const p = o.peer;
  const peerName = p.scheme === 'ssh' ? sshPeerName(p) : `tls://${p.host}:${p.port}`;
  const dial = p.scheme === 'ssh'
    ? agentDialer({ ...p, peerVmshift: o.peerVmshift, peerSocketDir: o.peerSocketDir, sharedDir: o.sharedDir, holdMs: o.holdMs }, id, `mem-${id}`, 'link', ['--dest-qmp', o.destQmp])
    : tlsDialer(p);
  const link = new Link({ link: id, migration: `mem-${id}`, role: 'a', peer: peerName, sharedDir: o.sharedDir, holdMs: o.holdMs, dial });
  link.on('carrier', (state: string, why: string) => o.onEvent({ event: 'carrier', state, why }));
  link.on('warning', (m: string) => o.onEvent({ event: 'warning', message: m }));
  const dir = mkdtempSync(join(tmpdir(), 'vmshift-mem-'));
  let relay: SourceRelay | null = null;
  let committed = false;
  /** Where the guest runs is settled (rolled back, or the destination answered `running`). */
  let decided = false;
  let ctl: Control | null = null;
  const linkFailed = new Promise<never>((_, reject) => link.once('failed', (e: Error) => reject(new MigrateError('link', e.message))));
  linkFailed.catch(() => {});
  const aborted = new Promise<never>((_, reject) => o.signal?.addEventListener('abort', () => {
    const why = o.signal?.reason instanceof Error ? o.signal.reason.message : 'interrupted';
    reject(new MigrateError('source', `${why}: migration cancelled`));
  }, { once: true }));
  aborted.catch(() => {});
  const race = <T>(p: Promise<T>) => Promise.race([p, linkFailed, aborted]);

  try {
    await race(new Promise((r) => link.once('carrier', r)));
    o.onEvent({ event: 'connected', peer: peerName });
    ctl = new Control(link.stream(CONTROL_STREAM), peerName);
    // The return path: the source waits for the destination's word that it loaded everything
    // (QEMU's SHUT) before completing, as libvirt runs every non-tunnelled migration.
    const compress = o.compress ?? 'none';
    const cacheSize = o.cacheSize ?? 256 * 1024 * 1024;
    const dirtyRate = o.linkRate ? await measureDirtyRate(src) : null;
    const choice = chooseParameters({ compress, cacheSize, maxDowntimeMs: o.maxDowntimeMs, bandwidth: o.bandwidth, linkRate: o.linkRate ?? null, dirtyRate });
    o.onEvent({ event: 'parameters', ...choice });
    const capabilities: Record<string, boolean> = { 'return-path': true, ...choice.capabilities };
    const parameters = choice.parameters;
    // The destination needs the stream's capabilities (xbzrle), not the source's pacing (auto-converge).
    const destCaps = Object.fromEntries(Object.entries(capabilities).filter(([k]) => k !== 'auto-converge'));
    ctl.send({ op: 'prepare', capabilities: destCaps, cache: compress === 'cache', destQmp: o.destQmp, ...(balloon ? { balloon: { restore: balloon.policy.original } } : {}) });
    const r = await race(ctl.next());
    if (r.op !== 'ready') throw new MigrateError('destination', r.op === 'error' ? r.message : `unexpected answer "${r.op}" to prepare`);
    if ((r.sharedDir ?? undefined) !== o.sharedDir) {
      o.onEvent({ event: 'warning', message: `the peer's link uses ${r.sharedDir ? `shared directory ${r.sharedDir}` : 'no shared directory'}, this side ${o.sharedDir ?? 'none'}: the stream goes on only while the network is up` });
    }
    if (balloon) {
      if (balloon.warning) o.onEvent({ event: 'warning', message: balloon.warning });
      shrunk = await race(shrink(balloon, onBalloon));
    }
    await src.execute('migrate-set-capabilities', { capabilities: Object.entries(capabilities).map(([capability, state]) => ({ capability, state })) });
    await src.execute('migrate-set-parameters', parameters);
    relay = await sourceRelay(join(dir, 'src.mig'), () => link.stream(MEMORY_STREAM), compress === 'cache' ? { budget: cacheSize } : undefined);
    relay.done.catch(() => {});
    await src.execute('migrate', { uri: `unix:${relay.path}` });

    let info: MigrateInfo;
    const startedAt = performance.now();
    let suspended = false;
    let watched = 0;
    for (;;) {
      info = await race(src.execute<MigrateInfo>('query-migrate'));
      const ram = info.ram ?? {};
      const mbps = ram.mbps ?? 0;
      const remaining = ram.remaining ?? 0;
      o.onEvent({
        event: 'progress', status: info.status ?? '?', pass: ram['dirty-sync-count'] ?? 0, transferred: ram.transferred ?? 0, remaining, total: ram.total ?? 0,
        dirtyRate: (ram['dirty-pages-rate'] ?? 0) * (ram['page-size'] ?? 4096), mbps, etaS: mbps > 0 ? Math.round((remaining * 8) / (mbps * 1e6) * 10) / 10 : null,
      });
      const cs = relay.cache?.stats();
      if (cs) { const { history: _h, ...rest } = cs; o.onEvent({ event: 'cache', stats: rest }); }
      if (info.status === 'completed') break;
      if (info.status === 'failed' || info.status === 'cancelled') throw new MigrateError('source', `the source QEMU's migration ${info.status}${info['error-desc'] ? `: ${info['error-desc']}` : ''}`);
      if (o.timeoutMs && !suspended && performance.now() - startedAt > o.timeoutMs) {
        const after = `not completed after ${o.timeoutMs / 1000} s (pass ${ram['dirty-sync-count'] ?? 0}, ${remaining} bytes left, the guest dirties ${(ram['dirty-pages-rate'] ?? 0) * (ram['page-size'] ?? 4096)} bytes/s)`;
        if (o.timeoutAction !== 'suspend') throw new MigrateError('source', `${after}; rolled back (--timeout-action suspend pauses the guest to finish instead)`);
        // As virsh migrate --timeout-suspend: a paused guest dirties nothing, so the rest goes in one pass.
        o.onEvent({ event: 'warning', message: `${after}; pausing the guest so that the migration completes` });
        await src.execute('stop');
        suspended = true;
      }
      if (balloon && performance.now() - watched >= 1000) {
        watched = performance.now();
        await race(watch(balloon, onBalloon)).catch((e: Error) => { if (e instanceof MigrateError) throw e; o.onEvent({ event: 'warning', message: `balloon: ${e.message}` }); });
      }
      await race(new Promise((res) => setTimeout(res, 200)));
    }
    const st = await src.execute<{ status: string }>('query-status');
    if (st.status !== 'postmigrate') throw new MigrateError('source', `the migration completed but the source guest is "${st.status}", not postmigrate; not committing`);

    // The stream's count and CRC are final once the source QEMU closed its side (it does
    // right after completing); the destination runs the guest only if it got the same bytes.
    const ended = await Promise.race([relay.forwardEnded.then(() => true), new Promise<false>((res) => setTimeout(() => res(false), 10_000).unref())]);
    if (!ended) o.onEvent({ event: 'warning', message: 'the source QEMU kept its migration socket open after completing: the destination cannot check the stream it received' });
    const stream = ended ? { bytes: relay.counts.forward, crc: relay.counts.forwardCrc } : undefined;

    if (o.beforeCommit) await o.beforeCommit().catch((e: Error) => { throw new MigrateError('source', `before the commit: ${e.message}`); });

    // The point of no return: from here the destination owns the guest.
    committed = true;
    ctl.send({ op: 'commit', ...(stream ? { stream } : {}), ...(o.paused ? { paused: true } : {}) });
    o.onEvent({ event: 'committed' });
    const ans = await Promise.race([ctl.next(), linkFailed]).catch((e: Error) => {
      throw new MigrateError('link', `the commit was sent but the destination's answer never came (${e.message}); the source stays in postmigrate: check the destination QEMU (it resumes on the commit)`, true);
    });
    if (ans.op === 'refused') {
      // The destination never ran its copy and has quit it: the guest is certainly here.
      committed = false;
      throw new MigrateError('destination', `${ans.message}; the guest runs on here`);
    }
    if (ans.op !== 'running') throw new MigrateError('destination', `after the commit the destination answered "${ans.op}"${ans.op === 'error' ? `: ${ans.message}` : ''}; the source stays in postmigrate`, true);
    decided = true;
    ctl.end();
    // Both directions of the memory stream end once both QEMUs closed it; then the link.
    const finish = Promise.all([relay.done.catch(() => {}), link.finish()]);
    // unref: the timer must not keep `vmshift migrate` alive; it held every run 10 s after its result.
    await Promise.race([finish, new Promise((res) => setTimeout(res, 10_000).unref())]);
    if (link.state === 'running') await link.abort('finished: the guest runs on the destination');
    const balloonSummary = balloon && shrunk ? { ...shrunk, atSwitch: await balloon.balloon.actual().catch(() => shrunk!.actual), restored: ans.op === 'running' ? ans.balloon ?? null : null } : undefined;
    return {
      event: 'done', ms: Math.round(performance.now() - t0), downtimeMs: info.downtime ?? null, transferred: info.ram?.transferred ?? 0, relayed: relay.counts, link: link.stats(), streamVerified: stream !== undefined, cpuMs: cpuMsSince(cpu0),
      ...(balloonSummary ? { balloon: balloonSummary } : {}),
      ...(relay.cache ? { cache: relay.cache.stats() } : {}),
    };
  } catch (e) {
    if (!committed) {
      await rollback(src, wasRunning, ctl, link);
      decided = true;
      if (balloon) await giveBack(balloon).catch((g: Error) => o.onEvent({ event: 'warning', message: `balloon: cannot give the guest its memory back: ${g.message}` }));
    }
    throw e instanceof MigrateError ? e : new MigrateError('source', (e as Error).message);
  } finally {
    // The shared-dir files are kept (renamed .failed) only while the outcome is in doubt:
    // then the commit record in them may still be what the destination needs to read.
    if (decided) link.discardFiles();
    relay?.close();
    rmSync(dir, { recursive: true, force: true });
    await src.close().catch(() => {});
  }
}

/** The guest's dirty rate in bytes per second (QEMU's calc-dirty-rate over one second), null when QEMU cannot tell. */
async function measureDirtyRate(src: QmpClient): Promise<number | null> {
  try {
    await src.execute('calc-dirty-rate', { 'calc-time': 1 });
    for (let i = 0; i < 50; i++) {
      await new Promise((r) => setTimeout(r, 100));
      const r = await src.execute<{ status: string; 'dirty-rate'?: number }>('query-dirty-rate');
      if (r.status === 'measured') return r['dirty-rate'] !== undefined ? r['dirty-rate'] * 1024 * 1024 : null;
    }
  } catch { /* an older QEMU: not measured */ }
  return null;
}

/** Before the commit: the source runs on, the destination QEMU is quit, the link ends. */
async function rollback(src: QmpClient, wasRunning: boolean, ctl: Control | null, link: Link): Promise<void> {
  await src.execute('migrate_cancel').catch(() => {});
  for (let i = 0; i < 100; i++) {
    const m = await src.execute<MigrateInfo>('query-migrate').catch(() => ({} as MigrateInfo));
    if (!m.status || !ACTIVE.has(m.status)) break;
    await new Promise((r) => setTimeout(r, 50));
  }
  const st = await src.execute<{ status: string }>('query-status').catch(() => null);
  if (wasRunning && st && st.status !== 'running') await src.execute('cont').catch(() => {});
  if (ctl && link.state === 'running') {
    ctl.send({ op: 'abort', reason: 'the source rolled back' });
    await Promise.race([ctl.next().catch(() => {}), new Promise((r) => setTimeout(r, 5000))]);
  }
  // Awaited (bounded): the CLI exits right after, and the agent must hear it, not wait out its hold time.
  if (link.state === 'running') await link.abort('the migration was rolled back');
}
