// `vmshift migrate` (memory) between two hosts (network namespaces A and B, sshd in B, the
// link agent started on B over SSH): the tiny guest in mode=dirty moves to a destination
// QEMU started with `-incoming defer -S`, its VMSHIFT-DIRTY counter continues there, the
// source ends in postmigrate. One guest boot serves every check: it moves on from QEMU to
// QEMU (the QEMUs themselves need no namespace: QMP and migration sockets are unix sockets).
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { join } from 'node:path';
import { createReadStream, existsSync, mkdirSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { createHash } from 'node:crypto';
import { cleanupAll, onCleanup, run, runStatus, waitForSocket } from '../helpers/proc.ts';
import { bootGuest, ensureGuest, type Guest } from '../helpers/guest.ts';
import { daemonInNs, jsonLinesInNs, linkState, makeCerts, resetConnections, startSshd, twoHosts, type Sshd, type TwoHosts } from '../helpers/hosts.ts';
import { QmpClient } from '../../src/qemu/qmp.ts';
import { RecordWriter, encodeRecord, linkSeed, Rec } from '../../src/link/record-file.ts';

const root = new URL('../..', import.meta.url).pathname;
const PARAMS = { mib: 16, delay: 200 };
let hosts: TwoHosts;
let sshd: Sshd;
let current: { guest: Guest; qmp: string };
let n = 0;

test.before(async () => {
  await ensureGuest();
  hosts = await twoHosts();
  sshd = await startSshd(hosts.b, hosts.dir);
  const qmp = join(hosts.dir, 'q0.qmp');
  current = { guest: bootGuest({ mode: 'dirty', params: PARAMS, qmpSocket: qmp }), qmp };
  await current.guest.waitFor(/^VMSHIFT-DIRTY 2$/, 120_000);
});
test.after(cleanupAll);

/** A destination QEMU for the same guest, waiting for a migration. */
function destination(): { guest: Guest; qmp: string } {
  const qmp = join(hosts.dir, `q${++n}.qmp`);
  return { guest: bootGuest({ mode: 'dirty', params: PARAMS, qmpSocket: qmp, extraArgs: ['-incoming', 'defer', '-S'] }), qmp };
}

async function waitDestination(d: { guest: Guest; qmp: string }) {
  await waitForSocket(d.qmp, d.guest.daemon);
  return d;
}

interface Event { event: string; [k: string]: unknown }

const runDir = () => join(hosts.dir, 'run');

/** `vmshift migrate --json` run inside A (over SSH unless `extra` names a --peer); `during` sees each event as it comes. */
async function migrate(srcQmp: string, destQmp: string, extra: string[] = [], during?: (e: Event) => void, timeoutMs = 180_000) {
  const peer = extra.includes('--peer') ? [] : ['--peer', `ssh://root@${hosts.b.addr}:${sshd.port}`, '--identity', sshd.identity, '--known-hosts', sshd.knownHosts];
  const r = await jsonLinesInNs<Event>(hosts.a, join(root, 'bin/vmshift'), ['migrate', '--json', '--qmp', srcQmp, ...peer,
    '--dest-qmp', destQmp, '--peer-vmshift', join(root, 'bin/vmshift'), '--run-dir', runDir(),
    '--peer-socket-dir', join(hosts.dir, 'agent'), ...(extra.includes('--hold-time') ? [] : ['--hold-time', '20s']), ...extra], { cwd: root, during, timeoutMs });
  // Every move that completes was checked by the destination: the bytes its QEMU got are the
  // bytes the source QEMU sent (count and CRC-32), before the guest ran there.
  const done = r.events.find((e) => e.event === 'done');
  if (done) assert.is(done.streamVerified, true, `stream verified: ${JSON.stringify(done)}`);
  return r;
}

async function qmpStatus(path: string): Promise<string> {
  const q = await QmpClient.connect(path);
  try { return (await q.execute<{ status: string }>('query-status')).status; } finally { await q.close(); }
}

const lastDirty = (g: Guest) => Math.max(0, ...g.lines().map((l) => /^VMSHIFT-DIRTY (\d+)$/.exec(l)).filter(Boolean).map((m) => Number(m![1])));
const agentLogs = () => (existsSync(join(hosts.dir, 'agent')) ? readdirSync(join(hosts.dir, 'agent')) : []).filter((f) => f.endsWith('.log')).map((f) => `${f}:\n${readFileSync(join(hosts.dir, 'agent', f), 'utf8')}`).join('\n');
const summary = (r: { events: Event[]; stderr: string }) => `${JSON.stringify(r.events.filter((e) => e.event !== 'progress').concat(r.events.filter((e) => e.event === 'progress').slice(-3)))}\n${r.stderr}\n${agentLogs()}`;

/** SHA-256 of the guest's RAM (its first 256 MiB of physical memory, as QEMU reads it). */
async function ramDigest(qmpPath: string, name: string): Promise<string> {
  const file = join(hosts.dir, `ram-${name}-${++n}.bin`);
  const q = await QmpClient.connect(qmpPath);
  try {
    await q.execute('pmemsave', { val: 0, size: 256 * 1024 * 1024, filename: file });
  } finally { await q.close(); }
  const h = createHash('sha256');
  for await (const chunk of createReadStream(file)) h.update(chunk as Buffer);
  rmSync(file);
  return h.digest('hex');
}

/**
 * The guest moved from `from` to `to`: the counter goes on there, the source stays in
 * postmigrate. Moved with --paused, the destination's RAM is first compared with the source's
 * (both frozen at the switch-over), then it is resumed.
 */
async function checkMoved(from: { guest: Guest; qmp: string }, to: { guest: Guest; qmp: string }) {
  assert.is(await qmpStatus(from.qmp), 'postmigrate');
  if (await qmpStatus(to.qmp) === 'paused') {
    const [a, b] = await Promise.all([ramDigest(from.qmp, 'src'), ramDigest(to.qmp, 'dst')]);
    assert.is(b, a, 'the destination holds the RAM the source had at the switch-over');
    const q = await QmpClient.connect(to.qmp);
    try { await q.execute('cont'); } finally { await q.close(); }
  }
  assert.is(await qmpStatus(to.qmp), 'running');
  const atSwitch = lastDirty(from.guest);
  await to.guest.waitFor(new RegExp(`^VMSHIFT-DIRTY ${atSwitch + 2}$`), 60_000);
  // The counter continued, it did not restart: no line on B before the one after the switch.
  const onB = to.guest.lines().map((l) => /^VMSHIFT-DIRTY (\d+)$/.exec(l)).filter(Boolean).map((m) => Number(m![1]));
  assert.ok(onB[0] >= atSwitch && onB[0] <= atSwitch + 1, `counter on B starts at ${onB[0]}, the source printed up to ${atSwitch}`);
  assert.not.ok(to.guest.lines().includes('VMSHIFT-READY'), 'the destination did not boot a guest of its own');
  await new Promise((r) => setTimeout(r, 300));
  assert.is(lastDirty(from.guest), atSwitch, 'the source never ran again');
  assert.equal(readdirSync(hosts.shared), [], 'nothing left in the shared directory');
  assert.equal(readdirSync(join(hosts.dir, 'agent')).filter((f) => !f.endsWith('.log')), [], 'no agent socket left');
}

test('a destination that is not waiting for a migration: refused, the source runs on, the destination untouched', async () => {
  const other = join(hosts.dir, 'not-incoming.qmp');
  const g = bootGuest({ mode: 'idle', qmpSocket: other, extraArgs: ['-S'] });
  await waitForSocket(other, g.daemon);
  const before = lastDirty(current.guest);
  const r = await migrate(current.qmp, other);
  assert.is(r.code, 1, summary(r));
  const err = r.events.find((e) => 'error' in e) as { error: { code: string; message: string } } | undefined;
  assert.ok(err, summary(r));
  assert.match(err!.error.message, /is "prelaunch", not waiting for a migration/);
  assert.is(await qmpStatus(current.qmp), 'running');
  assert.is(await qmpStatus(other), 'prelaunch', 'a QEMU that was not ours to take is not quit');
  await current.guest.waitFor(new RegExp(`^VMSHIFT-DIRTY ${before + 1}$`), 30_000);
  // The agent on B heard the source's ABORT before `vmshift migrate` exited: it ends on it,
  // rather than after its hold time (20 s) with nothing heard.
  const log = () => agentLogs().split(/\n(?=\S+\.log:\n)/).find((l) => l.includes('is "prelaunch", not waiting')) ?? '';
  await until('the agent on B ends', () => /\bfailed: /.test(log()), 30_000);
  assert.match(log(), /failed: link: peer .* aborted: the migration was rolled back/, log());
});

test('healthy: the guest moves to B, its counter continues there, the source is in postmigrate; a link file another migration wrote is never read', async () => {
  const dest = await waitDestination(destination());
  // Where B's return-path file of this link would go, a file another migration wrote (same
  // link id, as a stale file of an id reused would be): refused at its header, with a warning.
  let planted = '';
  const r = await migrate(current.qmp, dest.qmp, ['--shared-dir', hosts.shared, '--paused'], (e) => {
    if (planted || e.event !== 'connected') return;
    const id = readdirSync(hosts.shared).map((f) => /^vmshift-link-([0-9a-f]+)\.a\.ack$/.exec(f)?.[1]).find(Boolean)!;
    planted = join(hosts.shared, `vmshift-link-${id}.b.s2.data`);
    const w = new RecordWriter(planted, linkSeed(id, 'mem-other'), { link: id, migration: 'mem-other', from: 'b', kind: 'data', stream: 2, name: 'memory' });
    w.append([encodeRecord(linkSeed(id, 'mem-other'), Rec.DATA, 2, 0, Buffer.alloc(4096, 0x55))], true);
    w.close();
  });
  const from = current;
  if (r.events.some((e) => e.event === 'done')) current = dest; // the guest lives there now: later tests go on from it
  assert.is(r.code, 0, summary(r));
  assert.ok(planted, 'a file was planted');
  assert.ok(r.events.some((e) => e.event === 'warning' && (e.message as string).includes(planted) && /another link or migration|was written by link/.test(e.message as string)), summary(r));
  rmSync(planted);
  const done = r.events.find((e) => e.event === 'done') as Event & { relayed: { forward: number; back: number }; link: Record<string, number> };
  assert.ok(done, summary(r));
  assert.ok(r.events.some((e) => e.event === 'progress' && (e.transferred as number) > 0), 'progress was reported');
  assert.ok(done.relayed.forward > 16 * 1024 * 1024, `the stream went through the relay: ${JSON.stringify(done.relayed)}`);
  assert.ok(done.relayed.back > 0, 'the return path was relayed back');
  const i = r.events.findIndex((e) => e.event === 'committed');
  assert.ok(i > 0 && r.events.slice(0, i).some((e) => e.event === 'progress' && e.status === 'completed'), 'the commit came after the source completed');
  await checkMoved(from, dest);
  await from.guest.stop();
});

test('the carrying connection reset mid-stream (ss -K in A): completes, the resent bytes are reported', async () => {
  const dest = await waitDestination(destination());
  let cut = false;
  const r = await migrate(current.qmp, dest.qmp, ['--bandwidth', '64M', '--paused'], (e) => {
    if (!cut && e.event === 'progress' && (e.transferred as number) > 4 * 1024 * 1024) {
      cut = true;
      void resetConnections(hosts.a, hosts.b);
    }
  });
  assert.ok(cut, `the connection was reset: ${summary(r)}`);
  const from = current;
  if (r.events.some((e) => e.event === 'done')) current = dest; // the guest lives there now: later tests go on from it
  assert.is(r.code, 0, summary(r));
  const done = r.events.find((e) => e.event === 'done') as Event & { link: Record<string, number> };
  assert.ok(done.link.reconnects >= 1, `reconnected: ${JSON.stringify(done.link)}`);
  // Reported; not necessarily > 0: on a loaded machine everything sent may have been
  // acknowledged by the instant of the reset (seen). The stream's CRC, checked above, is what
  // proves nothing was lost or doubled.
  assert.type(done.link.resentBytes, 'number', `resent bytes reported: ${JSON.stringify(done.link)}`);
  await checkMoved(from, dest);
  await from.guest.stop();
});

// ---- failures, aborts and cuts (the guest moves on only where a test says it completes) ----

const leftovers = (dir = hosts.shared) => (existsSync(dir) ? readdirSync(dir).filter((f) => f.startsWith('vmshift-link-')) : []);
const errorOf = (r: { events: Event[] }) => (r.events.find((e) => 'error' in e) as unknown as { error: { code: string; message: string } } | undefined)?.error;

async function until(what: string, ok: () => boolean | Promise<boolean>, ms = 10_000): Promise<void> {
  for (const end = Date.now() + ms; !(await ok());) {
    if (Date.now() > end) throw new Error(`${what}: not within ${ms} ms\n${agentLogs()}`);
    await new Promise((r) => setTimeout(r, 100));
  }
}

/** Rolled back: the guest runs on here (its counter goes on), the destination QEMU quit, no link files, no agent socket. */
async function checkRolledBack(r: { code: number | null; events: Event[]; stderr: string }, dest: { guest: Guest; qmp: string }, message: RegExp, sharedDir = hosts.shared) {
  assert.is(r.code, 1, summary(r));
  assert.match(errorOf(r)?.message ?? '', message, summary(r));
  assert.is(await qmpStatus(current.qmp), 'running');
  const before = lastDirty(current.guest);
  await current.guest.waitFor(new RegExp(`^VMSHIFT-DIRTY ${before + 1}$`), 30_000);
  await until('the destination QEMU quits', () => dest.guest.daemon.proc.exitCode !== null || dest.guest.daemon.proc.signalCode !== null, 30_000);
  await until('no link files left in the shared directory', () => leftovers(sharedDir).length === 0);
  await until('no agent socket left', () => readdirSync(join(hosts.dir, 'agent')).filter((f) => !f.endsWith('.log')).length === 0);
}

/** Until the migration has sent `bytes`, then `act` once. */
const after = (bytes: number, act: () => void) => {
  let done = false;
  return (e: Event) => { if (!done && e.event === 'progress' && (e.transferred as number) > bytes) { done = true; act(); } };
};

let spare: { guest: Guest; qmp: string } | null = null;

test('security: a wrong host key refuses before anything is touched: the source runs on, the destination still waits', async () => {
  const dest = await waitDestination(destination());
  const wrong = join(hosts.dir, 'wrong_known_hosts');
  writeFileSync(wrong, `[${hosts.b.addr}]:${sshd.port} ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl\n`);
  const r = await migrate(current.qmp, dest.qmp, ['--peer', `ssh://root@${hosts.b.addr}:${sshd.port}`, '--identity', sshd.identity, '--known-hosts', wrong]);
  assert.is(r.code, 1, summary(r));
  assert.match(errorOf(r)!.message, `HOST KEY MISMATCH for [${hosts.b.addr}]:${sshd.port}`);
  assert.match(errorOf(r)!.message, sshd.fingerprint);
  assert.is(await qmpStatus(current.qmp), 'running');
  assert.is(await qmpStatus(dest.qmp), 'inmigrate', 'the destination was never touched');
  spare = dest; // still waiting: the next test takes it
});

test('vmshift abort in flight: rolled back like a failure (source runs, destination quit, files removed); a second migrate of the guest is refused', async () => {
  const dest = spare ?? await waitDestination(destination());
  spare = null;
  let abort = null as Promise<{ code: number; stdout: string; stderr: string }> | null;
  let second = null as ReturnType<typeof migrate> | null;
  const r = await migrate(current.qmp, dest.qmp, ['--shared-dir', hosts.shared, '--bandwidth', '2M'], after(1024 * 1024, () => {
    second = migrate(current.qmp, dest.qmp);
    void second.then(() => {
      abort = runStatus(join(root, 'bin/vmshift'), ['abort', '--json', '--qmp', current.qmp, '--run-dir', runDir()], { cwd: root });
    });
  }));
  assert.ok(second, summary(r));
  const s = await second!;
  assert.is(s.code, 1, summary(s));
  assert.match(errorOf(s)!.message, /already running .*vmshift abort --qmp/);
  const a = await abort!;
  assert.is(a.code, 0, `${a.stdout}${a.stderr}`);
  assert.is(JSON.parse(a.stdout).result.aborted, true, a.stdout);
  await checkRolledBack(r, dest, /aborted by vmshift abort: migration cancelled/);
  const again = await runStatus(join(root, 'bin/vmshift'), ['abort', '--qmp', current.qmp, '--run-dir', runDir()], { cwd: root });
  assert.is(again.code, 1);
  assert.match(again.stderr, /no memory migration of .* is running here/);
});

test('--timeout: a guest dirtying faster than the link rolls back after the timeout; with suspend it is paused and completes', async () => {
  const dest = await waitDestination(destination());
  let t0 = 0;
  const r = await migrate(current.qmp, dest.qmp, ['--bandwidth', '1M', '--timeout', '2s'], (e) => { if (!t0 && e.event === 'progress') t0 = Date.now(); });
  // From the migration's start (its first progress) to the rollback's end, not the CLI's start-up.
  assert.ok(t0 && Date.now() - t0 < 20_000, `bounded: ${Date.now() - t0} ms ${summary(r)}`);
  await checkRolledBack(r, dest, /not completed after 2 s .*rolled back/);

  // Suspend, and the shared directory missing: the network carries it all, with a warning.
  const dest2 = await waitDestination(destination());
  const missing = join(hosts.dir, 'no-such-dir');
  const s = await migrate(current.qmp, dest2.qmp, ['--bandwidth', '16M', '--timeout', '1s', '--timeout-action', 'suspend', '--shared-dir', missing]);
  const from = current;
  if (s.events.some((e) => e.event === 'done')) current = dest2; // the guest lives there now: later tests go on from it
  assert.is(s.code, 0, summary(s));
  assert.ok(s.events.some((e) => e.event === 'warning' && /pausing the guest/.test(e.message as string)), summary(s));
  assert.ok(s.events.some((e) => e.event === 'warning' && (e.message as string).includes(`shared directory ${missing} cannot be written`)), summary(s));
  await checkMoved(from, dest2);
  await from.guest.stop();
});

test('B\'s network down for 40 s, the shared directory full: the link rides it out over the network and completes', async () => {
  const full = join(hosts.dir, 'full');
  mkdirSync(full, { mode: 0o700 });
  await run('mount', ['-t', 'tmpfs', '-o', 'size=64k,mode=0700', 'tmpfs', full]);
  onCleanup(() => runStatus('umount', ['-l', full]).then(() => {}));
  await runStatus('dd', ['if=/dev/zero', `of=${join(full, 'filler')}`, 'bs=4k']); // until ENOSPC
  const dest = await waitDestination(destination());
  const t0 = Date.now();
  let cutAt = 0;
  // --timeout: a quiet machine's guest dirties more than 16M/s, a loaded one's link carries less.
  const r = await migrate(current.qmp, dest.qmp, ['--bandwidth', '16M', '--hold-time', '60s', '--shared-dir', full, '--timeout', '60s', '--timeout-action', 'suspend', '--paused'], after(4 * 1024 * 1024, () => {
    cutAt = Date.now();
    void linkState(hosts.b, false).then(() => new Promise((res) => setTimeout(res, 40_000))).then(() => linkState(hosts.b, true));
  }), 120_000);
  await runStatus('umount', [full]);
  const from = current;
  if (r.events.some((e) => e.event === 'done')) current = dest; // the guest lives there now: later tests go on from it
  assert.is(r.code, 0, summary(r));
  assert.ok(cutAt > 0 && Date.now() - cutAt >= 40_000, `the cut lasted 40 s: ${Date.now() - cutAt} ms (whole run ${Date.now() - t0} ms)`);
  assert.ok(r.events.some((e) => e.event === 'warning' && /cannot be written \(ENOSPC/.test(e.message as string)), summary(r));
  const done = r.events.find((e) => e.event === 'done') as Event & { link: Record<string, number> };
  assert.ok(done.link.reconnects >= 1, JSON.stringify(done.link));
  await checkMoved(from, dest);
  await from.guest.stop();
});

test('the network cut until the end: the migration completes through the shared file, nothing left in it', async () => {
  const dest = await waitDestination(destination());
  // The file on this machine's disk carries ~4 MB/s under a loaded machine, about what the
  // guest dirties: the timeout pauses the guest so that the move converges in bounded time.
  const r = await migrate(current.qmp, dest.qmp, ['--bandwidth', '16M', '--shared-dir', hosts.shared, '--timeout', '25s', '--timeout-action', 'suspend', '--paused'],
    after(4 * 1024 * 1024, () => void linkState(hosts.b, false)), 180_000);
  await linkState(hosts.b, true);
  const from = current;
  if (r.events.some((e) => e.event === 'done')) current = dest; // the guest lives there now: later tests go on from it
  assert.is(r.code, 0, summary(r));
  const done = r.events.find((e) => e.event === 'done') as Event & { link: Record<string, number> };
  assert.ok(done.link.fromFileBytes > 0 || done.link.spilledBytes > 0, JSON.stringify(done.link));
  await checkMoved(from, dest);
  await from.guest.stop();
});

test('both carriers gone (network down, shared directory missing): fails cleanly after the hold time on both hosts', async () => {
  const dest = await waitDestination(destination());
  const missing = join(hosts.dir, 'no-such-dir');
  const r = await migrate(current.qmp, dest.qmp, ['--bandwidth', '4M', '--hold-time', '6s', '--shared-dir', missing],
    after(2 * 1024 * 1024, () => void linkState(hosts.b, false)));
  await linkState(hosts.b, true);
  await checkRolledBack(r, dest, /nothing heard from .* for 6 s over any carrier/, missing);
  assert.ok(r.events.some((e) => e.event === 'warning' && /cannot be written/.test(e.message as string)), summary(r));
});

test('tls: the guest moves to a link-agent --listen on B; a client certificate from another CA is refused, the guest untouched', async () => {
  const certs = await makeCerts(join(hosts.dir, 'certs'), hosts.b.addr);
  const other = await makeCerts(join(hosts.dir, 'other-ca'), hosts.b.addr);
  const port = 30000 + Math.floor(Math.random() * 20000);
  const listener = daemonInNs(hosts.b, join(root, 'bin/vmshift'), ['link-agent', '--listen', `${hosts.b.addr}:${port}`, '--tls-dir', certs,
    '--socket-dir', join(hosts.dir, 'tls-agent'), '--shared-dir', hosts.shared, '--hold-ms', '20000']);
  await until('the listener starts', () => listener.output().includes('listening for TLS links'), 30_000);
  const tls = ['--peer', `tls://${hosts.b.addr}:${port}`];

  const dest = await waitDestination(destination());
  const bad = await migrate(current.qmp, dest.qmp, [...tls, '--tls-dir', other, '--tls-ca', join(certs, 'ca-cert.pem')]);
  assert.is(bad.code, 1, summary(bad));
  assert.match(errorOf(bad)!.message, /certificate/, summary(bad));
  assert.match(listener.output(), /refused: tls: .*certificate/);
  assert.is(await qmpStatus(current.qmp), 'running');
  assert.is(await qmpStatus(dest.qmp), 'inmigrate', 'the destination was never touched');

  // (--timeout: on a loaded machine the link may carry less than the guest dirties.)
  const r = await migrate(current.qmp, dest.qmp, [...tls, '--tls-dir', certs, '--shared-dir', hosts.shared, '--timeout', '30s', '--timeout-action', 'suspend']);
  const from = current;
  if (r.events.some((e) => e.event === 'done')) current = dest; // the guest lives there now: later tests go on from it
  assert.is(r.code, 0, `${summary(r)}\n${listener.output()}`);
  await checkMoved(from, dest);
  await from.guest.stop();
  await until('the listener forgets the link', () => /finished: /.test(listener.output()));
  await listener.stop();
});

test('--compress cache: the stream goes through the cache both ways and the guest moves; stats and parameters reported', async () => {
  const dest = await waitDestination(destination());
  const r = await migrate(current.qmp, dest.qmp, ['--compress', 'cache', '--cache-size', '64M']);
  assert.is(r.code, 0, summary(r));
  const params = r.events.find((e) => e.event === 'parameters') as Event & { parameters: Record<string, unknown>; reasons: string[] };
  assert.ok(params && params.parameters['max-bandwidth'] === 4 * 1024 ** 3, `QEMU's limit raised for the cache: ${JSON.stringify(params)}`);
  assert.ok(params.reasons.some((x) => x.startsWith('downtime-limit 300 ms')), JSON.stringify(params.reasons));
  const done = r.events.find((e) => e.event === 'done') as Event & { relayed: { forward: number; link: number }; cache: { bytesIn: number; bytesOut: number; pages: number; bypassedPages: number; hits: number; budgetEntries: number; passThrough: string | null } };
  assert.ok(done?.cache, summary(r));
  assert.is(done.cache.bytesIn, done.relayed.forward, 'every byte from QEMU went through the encoder');
  assert.is(done.cache.bytesOut, done.relayed.link, 'and its frames went on the link');
  assert.is(done.cache.budgetEntries, 64 * 256);
  assert.is(done.cache.passThrough, null, 'the reader followed the stream to the device state');
  assert.ok(done.cache.pages > 1000, JSON.stringify(done.cache));
  assert.ok(r.events.some((e) => e.event === 'cache'), 'cache stats during the run');
  await checkMoved(current, dest);
  await current.guest.stop();
  current = dest;
});

test.run();
