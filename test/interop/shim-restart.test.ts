// A shim that dies or is restarted under a running guest is a stall, never an I/O error.
// One real guest (the sequence writer, on a raw file) is live-attached through a real
// vmshiftd, which asks QEMU to reconnect; then, under its writes:
//   kill -9 of the shim: vmshiftd restarts it, QEMU reconnects, the writer goes on;
//   `vmshift restart NAME`: old process flushed and gone before the new one, stall reported;
//   a restart during a migration is refused; kill -9 mid-migration: the restarted shim
//   serves the source and the job's file is gone; restart --abort-job rolls the job back first;
//   kill -9 inside the switch-over stall, before and after its commit: the restarted shim
//   serves the source, resp. the destination, and every acknowledged record is there;
//   a restart whose old process cannot flush is reported as not clean;
//   a shim that never comes back (daemon down) with a 2 s delay: the guest gets an I/O
//   error within seconds, not a hang.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { existsSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { cleanupAll, onCleanup, runStatus, startDaemon, tempDir, waitForSocket, type Daemon } from '../helpers/proc.ts';
import { bootGuest, ensureGuest, verifyWriterLog, type Guest } from '../helpers/guest.ts';
import { controlCall } from '../../src/control/client.ts';
import { isShimProcess, sleep } from '../../src/daemon/processes.ts';
import type { ShimRecord } from '../../src/daemon/registry.ts';
import type { RestartResult } from '../../src/daemon/supervisor.ts';
import { holdUntilConnected } from './migrate-helpers.ts';

const VMSHIFT = new URL('../../bin/vmshift', import.meta.url).pathname;
const VMSHIFTD = new URL('../../bin/vmshiftd', import.meta.url).pathname;
const MiB = 1024 * 1024;
const SLOTS = 64;
const LABEL = 'rs';
const SHIM = 'rs-vd0';

test.after(cleanupAll);

const dir = tempDir('vrs-');
const api = join(dir, 'api.sock'), stateDir = join(dir, 'state'), runDir = join(dir, 'run');
const qmp = join(dir, 'qmp.sock'), faults = join(dir, 'fault');
const env = { ...process.env, VMSHIFT_SOCKET: api, VMSHIFT_RUN_DIR: runDir, VMSHIFT_FAULT_FILE: faults };
const src = join(dir, 'src.raw');
let daemon: Daemon, guest: Guest;

function shim(): ShimRecord {
  const rec = JSON.parse(readFileSync(join(stateDir, 'vmshiftd.json'), 'utf8')).shims.find((s: ShimRecord) => s.name === SHIM);
  if (!rec) throw new Error(`no shim ${SHIM} in the registry`);
  return rec;
}

// Shims outlive the daemon by design: kill every PID the registry named, at cleanup.
const seen = new Map<number, string>();
const remember = () => {
  try {
    const r = shim();
    if (r.pid) seen.set(r.pid, r.socket);
  } catch { /* not yet */ }
};
onCleanup(async () => {
  remember();
  for (const [pid, socket] of seen) if (await isShimProcess(pid, socket)) process.kill(pid, 'SIGKILL');
});

const cli = (args: string[]) => runStatus(VMSHIFT, [...args, '--daemon-socket', api], { env });

async function startVmshiftd(): Promise<Daemon> {
  // The test's dir is the only datastore; one test serves an nbdkit export.
  const d = startDaemon(VMSHIFTD, ['--socket', api, '--state-dir', stateDir, '--run-dir', runDir, '--config', join(dir, 'no-vmshiftd.json'), '--datastore', dir, '--allow-nbd-sources'], { env });
  await waitForSocket(api, d, 60_000);
  return d;
}

/** Wait until the registry names a live shim process other than `oldPid`. */
async function restartedFrom(oldPid: number | null, timeoutMs = 30_000): Promise<ShimRecord> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const r = shim();
    if (r.pid !== oldPid && (await isShimProcess(r.pid, r.socket))) {
      remember();
      return r;
    }
    if (Date.now() > deadline) throw new Error(`shim not restarted:\n${daemon.output().slice(-3000)}`);
    await sleep(50);
  }
}

/**
 * Watch the writer's progress every 20 ms: `longestGapMs` is the longest time without a new
 * acknowledged record, the stall as the guest saw it.
 */
function watchWriter(g: Guest) {
  let last = g.lastSeq(), since = Date.now(), longest = 0;
  const t = setInterval(() => {
    const now = g.lastSeq();
    if (now !== last) {
      longest = Math.max(longest, Date.now() - since);
      last = now;
      since = Date.now();
    }
  }, 20);
  return { stop: () => { clearInterval(t); return longest; } };
}

/** The writer goes on: `n` more acknowledged records, and no error on the console. */
async function writesMore(n: number, timeoutMs = 60_000): Promise<number> {
  const target = guest.lastSeq() + n;
  await guest.waitFor(new RegExp(`^VMSHIFT-SEQ ${target}$`), timeoutMs);
  return target;
}

const shimLog = () => readFileSync(join(stateDir, 'logs', `${SHIM}.log`), 'utf8');
async function logShows(re: RegExp, timeoutMs = 60_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!re.test(shimLog().slice(shimLog().lastIndexOf('--- vmshiftd: starting shim')))) {
    if (Date.now() > deadline) throw new Error(`shim log never showed ${re}:\n${shimLog().slice(-2000)}`);
    await sleep(50);
  }
}

const backing = async () => (await controlCall<{ backing: string }>(`${shim().socket}.ctl`, 'status', {}, { timeoutMs: 10_000 })).backing;

test('setup: a writer guest on a raw file, live-attached through vmshiftd with a reconnect delay', async () => {
  await ensureGuest();
  // Data everywhere: a copy limited by --bandwidth then takes a while (holes it would skip).
  writeFileSync(src, Buffer.alloc(32 * MiB, 0x5a));
  daemon = await startVmshiftd();
  guest = bootGuest({ mode: 'writer', params: { blocks: SLOTS }, disk: { file: src }, qmpSocket: qmp });
  await guest.waitFor(/^VMSHIFT-SEQ 20$/, 120_000);
  const r = await cli(['attach', LABEL, '--qmp', qmp, '--reconnect-delay', '30', '--json']);
  assert.is(r.code, 0, r.stderr);
  assert.is(JSON.parse(r.stdout).disks[0].status, 'attached', r.stdout);
  remember();
  await writesMore(20);
});

test('kill -9 of the shim under writes: vmshiftd restarts it, the guest sees no error', async () => {
  const old = shim();
  const w = watchWriter(guest);
  process.kill(old.pid!, 'SIGKILL');
  await restartedFrom(old.pid);
  await writesMore(30);
  const gap = w.stop();
  console.log(`  kill -9 -> writer stalled ${gap} ms`);
  assert.ok(gap < 20_000, `stall ${gap} ms`);
  assert.is(await backing(), src);
});

test('vmshift restart NAME under writes: the old process stops cleanly first, the stall is reported', async () => {
  const old = shim();
  const w = watchWriter(guest);
  const r = await cli(['restart', SHIM, '--json']);
  assert.is(r.code, 0, r.stderr);
  const res = JSON.parse(r.stdout) as RestartResult;
  remember();
  await writesMore(30);
  const gap = w.stop();
  console.log(`  vmshift restart -> ${JSON.stringify({ stopMs: res.stopMs, downMs: res.downMs, stallMs: res.stallMs })}, writer stalled ${gap} ms`);
  assert.is(res.oldPid, old.pid);
  assert.is.not(res.pid, old.pid);
  assert.ok(res.clean, JSON.stringify(res));
  assert.is(res.clientsBefore, 1);
  assert.is(res.clientsAfter, 1);
  assert.ok(res.stallMs !== null && res.stallMs >= res.downMs, JSON.stringify(res));
  // The daemon's figure and the guest's agree to within the writer's own pace.
  assert.ok(gap < res.stallMs! + 1000, `guest gap ${gap} ms vs reported ${res.stallMs} ms`);
  const human = await cli(['restart', SHIM]);
  assert.is(human.code, 0, human.stderr);
  assert.match(human.stdout, /^shim rs-vd0 restarted: pid \d+ stopped cleanly in \d+ ms, pid \d+ serving after \d+ ms; the guest's I\/O stalled \d+ ms \(1 client reconnected\)\n$/);
  remember();
  await writesMore(10);
  const all = await cli(['restart', '--all', '--json']);
  assert.is(all.code, 0, all.stderr);
  assert.equal(JSON.parse(all.stdout).shims.map((r: RestartResult) => [r.name, r.clean, r.clientsAfter]), [[SHIM, true, 1]]);
  remember();
  await writesMore(10);
});

test('during a migration: restart is refused; kill -9 -> the restarted shim serves the source, the job file is gone', async () => {
  const dst = join(dir, 'mid.raw');
  const job = controlCall(api, 'job.start', { name: SHIM, to: dst, bandwidth: 4 * MiB }, { timeoutMs: 0 }).then(() => null, (e: Error) => e);
  await jobUnderway();
  // The shim is held while each CLI starts (holdUntilConnected), so the job is still running
  // when vmshiftd asks, however slow the CLI's start.
  const refused = await (await heldCli(['restart', SHIM])).done;
  assert.is(refused.code, 1);
  assert.match(refused.stderr, /running a migrate-storage job: a restart would end it and throw its copy away\. Wait for it to finish, or restart with --abort-job/);
  assert.ok(existsSync(dst));
  const old = shim();
  process.kill(old.pid!, 'SIGKILL');
  assert.instance(await job, Error, 'the job call reports the lost shim');
  await restartedFrom(old.pid);
  await writesMore(30);
  assert.is(await backing(), src);
  assert.not.ok(existsSync(dst), 'the restarted shim removed the file of the interrupted job');
  assert.match(shimLog(), /removed .*mid\.raw, created by a migration that did not complete/);

  // --abort-job: the job rolls back first (its file removed), then the process is swapped.
  const dst2 = join(dir, 'mid2.raw');
  const job2 = controlCall(api, 'job.start', { name: SHIM, to: dst2, bandwidth: 4 * MiB }, { timeoutMs: 0 }).then(() => null, (e: Error) => e);
  await jobUnderway();
  const r = await (await heldCli(['restart', SHIM, '--abort-job', '--json'])).done;
  assert.is(r.code, 0, r.stderr);
  const res = JSON.parse(r.stdout) as RestartResult;
  remember();
  assert.is(res.abortedJob, 'migrate-storage');
  assert.ok(res.clean);
  assert.match(String(await job2), /aborted/);
  assert.not.ok(existsSync(dst2));
  await writesMore(30);
  assert.is(await backing(), src);
});

/** `vmshift ARGS` started while the shim is held, until vmshiftd connects to it (migrate-helpers.ts). */
function heldCli(args: string[]) {
  const s = shim();
  return holdUntilConnected(s.pid!, `${s.socket}.ctl`, () => ({ done: cli(args) }));
}

async function jobUnderway(): Promise<void> {
  const deadline = Date.now() + 30_000;
  for (;;) {
    const st = await controlCall<{ running: boolean; job: { passDone: number } | null }>(api, 'job.status', { name: SHIM }).catch(() => null);
    if (st?.running && st.job!.passDone > 4 * MiB) return;
    assert.ok(Date.now() < deadline, 'the job never got going');
    await sleep(50);
  }
}

for (const point of ['switchover-before-commit', 'switchover-after-commit'] as const) {
  test(`kill -9 inside the switch-over stall (${point}): the restarted shim serves the right disk, with every record`, async () => {
    const committed = point === 'switchover-after-commit';
    const dst = join(dir, `${point}.raw`);
    const from = await backing();
    writeFileSync(faults, point);
    const job = controlCall(api, 'job.start', { name: SHIM, to: dst }, { timeoutMs: 0 }).then(() => null, (e: Error) => e);
    await logShows(new RegExp(`fault point ${point} reached`));
    writeFileSync(faults, '');
    // The guest is held right now (the gate is paused); what it saw acknowledged is final.
    const acked = guest.lastSeq();
    const old = shim();
    const w = watchWriter(guest);
    process.kill(old.pid!, 'SIGKILL');
    assert.instance(await job, Error);
    await restartedFrom(old.pid);
    await writesMore(30);
    console.log(`  ${point}: kill -9 -> writer stalled ${w.stop()} ms`);
    const now = committed ? dst : from;
    assert.is(await backing(), now);
    assert.is(existsSync(dst), committed, committed ? 'the destination is the disk now' : 'the uncommitted destination is removed');
    // Every record acknowledged before the kill is on the disk the shim serves now (the guest
    // keeps writing: the newest acknowledged one per slot, or newer).
    assert.equal(verifyWriterLog(now, acked, SLOTS), []);
  });
}

test('restart of a shim whose flush fails: reported as not clean, with the reason, exit 1; the new process serves', async () => {
  // A shim on an NBD export whose server died: its connection is gone, so its last flush fails.
  const nsock = join(dir, 'nbdkit.sock');
  const nbdkit = () => startDaemon('nbdkit', ['-f', '-U', nsock, 'memory', '16M']);
  const k = nbdkit();
  await waitForSocket(nsock, k);
  const started = await cli(['shim-start', 'fl', `nbd+unix:///?socket=${nsock}`, '--json']);
  assert.is(started.code, 0, started.stderr);
  const pids = [JSON.parse(started.stdout).shim.pid as number];
  const socket = JSON.parse(started.stdout).shim.socket as string;
  onCleanup(async () => {
    for (const pid of pids) if (await isShimProcess(pid, socket)) process.kill(pid, 'SIGKILL');
  });
  await k.stop('SIGKILL');
  rmSync(nsock, { force: true });
  await waitForSocket(nsock, nbdkit());
  const r = await cli(['restart', 'fl', '--json']);
  const res = JSON.parse(r.stdout) as RestartResult;
  pids.push(res.pid);
  assert.is(r.code, 1);
  assert.is(res.clean, false);
  assert.match(res.stopFailure ?? '', /^vmshift: stop failed: the flush before stopping failed: nbd\+unix:.*nbdkit\.sock: connection lost/);
  assert.ok(await isShimProcess(res.pid, socket), 'the new process serves');
  assert.is((await cli(['shim-stop', 'fl'])).code, 0);
});

test('a shim that does not come back within a 2 s delay: the guest gets an I/O error, not a hang', async () => {
  const d = await cli(['detach', LABEL, '--qmp', qmp]);
  assert.is(d.code, 0, d.stderr);
  const a = await cli(['attach', LABEL, '--qmp', qmp, '--reconnect-delay', '2']);
  assert.is(a.code, 0, a.stderr);
  remember();
  await writesMore(10);
  await daemon.stop(); // nobody restarts the shim now (SIGTERM leaves shims running)
  const acked = guest.lastSeq();
  const t0 = Date.now();
  process.kill(shim().pid!, 'SIGKILL');
  const err = await guest.waitFor(/^VMSHIFT-ERROR writer record \d+: .*Input\/output error/, 30_000).catch((e: Error) => e);
  // waitFor rejects on a VMSHIFT-ERROR line: that line is what we expect here.
  const message = err instanceof Error ? err.message : err[0];
  assert.match(message, /VMSHIFT-ERROR writer record \d+: .*Input\/output error/);
  const ms = Date.now() - t0;
  console.log(`  shim gone with reconnect-delay 2: guest I/O error after ${ms} ms`);
  assert.ok(ms >= 1500 && ms < 15_000, `error after ${ms} ms`);
  await guest.waitExit(30_000);
  assert.equal(verifyWriterLog(await currentFile(), acked, SLOTS), []);
});

/** The file the attached disk is on now (the last committed destination). */
async function currentFile(): Promise<string> {
  const state = JSON.parse(readFileSync(shim().statePath, 'utf8'));
  return state.backing;
}

test.run();
