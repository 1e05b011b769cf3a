// vmshiftd as an operator runs it: real daemon and shim processes, QEMU's qemu-io writing
// through the shim, the daemon killed -9 and restarted (the shim is adopted, same PID, data
// intact), a shim killed while the daemon is down (restarted, same backing), shim-stop,
// permissions, bad input, a corrupt registry, and a migration job forwarded by the daemon.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { join } from 'node:path';
import { existsSync, readFileSync, statSync, symlinkSync, writeFileSync } from 'node:fs';
import { tempDir, startDaemon, waitForSocket, run, runStatus, cleanupAll, onCleanup, type Daemon } from '../helpers/proc.ts';
import { controlCall } from '../../src/control/client.ts';
import { isShimProcess, processAlive, resolveGroup, sleep } from '../../src/daemon/processes.ts';
import type { ShimRecord } from '../../src/daemon/registry.ts';

const vmshift = new URL('../../bin/vmshift', import.meta.url).pathname;
const vmshiftd = new URL('../../bin/vmshiftd', import.meta.url).pathname;
const MiB = 1024 * 1024;
test.after(cleanupAll);

interface Host {
  dir: string;
  api: string;
  stateDir: string;
  runDir: string;
  env: NodeJS.ProcessEnv;
}

/** Temp dirs for one "host", and a cleanup that kills every shim its registry ever named. */
function host(): Host {
  const dir = tempDir('vsd-');
  const h = { dir, api: join(dir, 'api.sock'), stateDir: join(dir, 'state'), runDir: join(dir, 'run'), env: { ...process.env, VMSHIFT_SOCKET: join(dir, 'api.sock') } };
  const seen = new Map<number, string>();
  const remember = () => {
    for (const r of records(h)) if (r.pid) seen.set(r.pid, r.socket);
  };
  trackers.push(remember);
  onCleanup(async () => {
    remember();
    // Shims are detached from the daemon: kill them by PID, checking the PID is still that shim.
    for (const [pid, socket] of seen) if (await isShimProcess(pid, socket)) process.kill(pid, 'SIGKILL');
  });
  return h;
}
const trackers: Array<() => void> = [];

function records(h: Host): ShimRecord[] {
  const file = join(h.stateDir, 'vmshiftd.json');
  if (!existsSync(file)) return [];
  try {
    return JSON.parse(readFileSync(file, 'utf8')).shims;
  } catch {
    return [];
  }
}

/** The test's own dir is its only datastore (and no host config file is read). */
function daemonArgs(h: Host, over: { stateDir?: string } = {}): string[] {
  return ['--socket', h.api, '--state-dir', over.stateDir ?? h.stateDir, '--run-dir', h.runDir, '--config', join(h.dir, 'no-vmshiftd.json'), '--datastore', h.dir];
}

async function startVmshiftd(h: Host): Promise<Daemon> {
  const d = startDaemon(vmshiftd, daemonArgs(h));
  await waitForSocket(h.api, d, 60_000);
  return d;
}

async function cli(h: Host, args: string[]) {
  const r = await runStatus(vmshift, args, { env: h.env });
  for (const t of trackers) t();
  return r;
}

async function shimStart(h: Host, name: string, source: string, extra: string[] = []): Promise<ShimRecord> {
  const r = await cli(h, ['shim-start', name, source, '--json', ...extra]);
  assert.is(r.code, 0, r.stderr);
  return JSON.parse(r.stdout).shim;
}

function qemuIo(sock: string, ...cmds: string[]) {
  return run('qemu-io', ['--image-opts', `driver=nbd,server.type=unix,server.path=${sock},export=disk`, ...cmds.flatMap((c) => ['-c', c])]);
}

function disk(h: Host, name: string, size = 16 * MiB): string {
  const file = join(h.dir, name);
  writeFileSync(file, Buffer.alloc(size));
  return file;
}

test('shim survives daemon kill -9: re-adopted with the same PID, data intact, still serving', async () => {
  const h = host();
  const file = disk(h, 'a.raw');
  let d = await startVmshiftd(h);
  assert.is(statSync(h.api).mode & 0o777, 0o600, 'API socket is root only');
  assert.is(statSync(h.runDir).mode & 0o777, 0o755);

  const shim = await shimStart(h, 'vm1', file);
  assert.ok(shim.pid && (await processAlive(shim.pid)));
  assert.is(shim.socket, join(h.runDir, 'vm1', 'nbd.sock'));
  await qemuIo(shim.socket, `write -P 0x5a ${2 * MiB} 256k`);

  // Idempotent for the same name and source.
  const again = JSON.parse((await cli(h, ['shim-start', 'vm1', file, '--json'])).stdout);
  assert.is(again.already, true);
  assert.is(again.shim.pid, shim.pid);

  const st = JSON.parse((await cli(h, ['status', '--json'])).stdout);
  assert.is(st.shims.length, 1);
  assert.is(st.shims[0].state, 'running');
  assert.is(st.shims[0].shim.backing, file);
  assert.ok(st.shims[0].shim.nbd.bytesWritten >= 256 * 1024);
  assert.is(st.shims[0].shim.tracking.dirtyBytes, 4 * 64 * 1024);

  await d.stop('SIGKILL');
  assert.ok(await processAlive(shim.pid!), 'shim outlives the daemon');
  await qemuIo(shim.socket, `read -P 0x5a ${2 * MiB} 256k`, `write -P 0x6b ${4 * MiB} 64k`);

  d = await startVmshiftd(h);
  assert.match(d.output(), /adopted running shim/);
  const list = JSON.parse((await cli(h, ['list', '--json'])).stdout).shims as ShimRecord[];
  assert.is(list.length, 1);
  assert.is(list[0]!.pid, shim.pid, 'same process, adopted');
  assert.is(list[0]!.restarts, 0);
  await qemuIo(shim.socket, `read -P 0x5a ${2 * MiB} 256k`, `read -P 0x6b ${4 * MiB} 64k`);
  // The adopted shim still has its counters: it is the very same process.
  const st2 = JSON.parse((await cli(h, ['status', '--json'])).stdout);
  assert.is(st2.shims[0].shim.tracking.dirtyBytes, 5 * 64 * 1024);

  const stop = await cli(h, ['shim-stop', 'vm1']);
  assert.is(stop.code, 0, stop.stderr);
  assert.match(stop.stdout, new RegExp(`disk is at ${file}`));
  assert.not.ok(await processAlive(shim.pid!), 'shim-stop ends the process');
  assert.equal(records(h), []);
  assert.not.ok(existsSync(join(h.runDir, 'vm1')), 'socket dir removed');
  const data = readFileSync(file);
  assert.ok(data.subarray(2 * MiB, 2 * MiB + 256 * 1024).every((b) => b === 0x5a));
  assert.ok(data.subarray(4 * MiB, 4 * MiB + 64 * 1024).every((b) => b === 0x6b));

  // SIGTERM: clean exit, API socket gone.
  await d.stop('SIGTERM');
  assert.is(d.proc.exitCode, 0, d.output());
  assert.not.ok(existsSync(h.api));
});

test('shim killed while the daemon is down: restarted on daemon start, same backing; SIGTERM of the daemon leaves shims running; an unrecorded PID is found', async () => {
  const h = host();
  const file = disk(h, 'b.raw');
  let d = await startVmshiftd(h);
  const shim = await shimStart(h, 'vm2', file);
  await qemuIo(shim.socket, `write -P 0x77 ${MiB} 128k`);

  await d.stop('SIGKILL');
  process.kill(shim.pid!, 'SIGKILL');
  assert.ok(await waitGone(shim.pid!));

  d = await startVmshiftd(h);
  assert.match(d.output(), /shim process is gone; restarting it/);
  const rec = records(h)[0]!;
  assert.is.not(rec.pid, shim.pid);
  assert.is(rec.restarts, 1);
  assert.ok(await isShimProcess(rec.pid, rec.socket));
  await qemuIo(rec.socket, `read -P 0x77 ${MiB} 128k`);

  // Stopping the daemon does not stop the shim; the next daemon adopts it.
  await d.stop('SIGTERM');
  assert.is(d.proc.exitCode, 0);
  assert.ok(await isShimProcess(rec.pid, rec.socket));
  await qemuIo(rec.socket, `read -P 0x77 ${MiB} 128k`);
  // As if the daemon had died between spawning the shim and recording its PID: it must find
  // the running shim by its socket, not start a second one on the same disk.
  const file2 = join(h.stateDir, 'vmshiftd.json');
  const reg = JSON.parse(readFileSync(file2, 'utf8'));
  reg.shims[0].pid = null;
  writeFileSync(file2, JSON.stringify(reg));
  d = await startVmshiftd(h);
  assert.match(d.output(), /found the shim under an unrecorded PID/);
  assert.is(records(h)[0]!.pid, rec.pid);
  const stop = await cli(h, ['shim-stop', 'vm2', '--json']);
  assert.equal(JSON.parse(stop.stdout), { name: 'vm2', pid: rec.pid, backing: file });
  await d.stop();
});

test('a shim that dies while the daemon runs is restarted; a migration job goes through the daemon and a restart serves the new backing', async () => {
  const h = host();
  const file = disk(h, 'c.raw', 8 * MiB);
  const dest = join(h.dir, 'c-moved.raw');
  const d = await startVmshiftd(h);
  const shim = await shimStart(h, 'vm3', file);
  await qemuIo(shim.socket, `write -P 0x33 0 1M`, `write -P 0x44 ${7 * MiB} 1M`);

  const events: string[] = [];
  const result = await controlCall<{ ok: boolean; to: string }>(h.api, 'job.start', { name: 'vm3', to: dest }, { onEvent: (e) => events.push(e), timeoutMs: 120_000 });
  assert.ok(result.ok);
  assert.is(result.to, dest);
  assert.ok(events.includes('end') || events.includes('progress'), `events relayed: ${events.join(',')}`);
  await run('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', file, dest]);

  process.kill(shim.pid!, 'SIGKILL');
  const deadline = Date.now() + 60_000;
  let rec = records(h)[0]!;
  while (rec.pid === shim.pid || !(await isShimProcess(rec.pid, rec.socket))) {
    assert.ok(Date.now() < deadline, `shim not restarted:\n${d.output()}`);
    await sleep(200);
    rec = records(h)[0]!;
  }
  await waitForSocket(`${rec.socket}.ctl`);
  const st = JSON.parse((await cli(h, ['status', '--json'])).stdout);
  assert.is(st.shims[0].state, 'running');
  assert.is(st.shims[0].shim.backing, dest, 'the restarted shim serves where the disk moved');
  await qemuIo(rec.socket, `read -P 0x44 ${7 * MiB} 1M`);
  const human = (await cli(h, ['status'])).stdout;
  assert.match(human, /vm3\s+running/);
  assert.match(human, /moved from/);
  assert.is(records(h)[0]!.backing, dest, 'the registry follows the state file');

  // The state file is the truth after the shim stops too: a start that names where the disk
  // used to be (a domain XML that missed the move) serves where it lives, and says so.
  const stopped = await controlCall<{ backing: string }>(h.api, 'shim.stop', { name: 'vm3' });
  assert.is(stopped.backing, dest);
  const where = await controlCall<{ backing: string; running: boolean }>(h.api, 'shim.locate', { name: 'vm3' });
  assert.equal([where.backing, where.running], [dest, false]);
  const again = await controlCall<{ backing: string; stale: string | null; shim: ShimRecord }>(h.api, 'shim.start', { name: 'vm3', source: file });
  assert.equal([again.backing, again.stale], [dest, file]);
  await qemuIo(again.shim.socket, `read -P 0x44 ${7 * MiB} 1M`);
  const same = await controlCall<{ already: boolean; stale: string | null }>(h.api, 'shim.start', { name: 'vm3', source: dest });
  assert.equal([same.already, same.stale], [true, null]);
  // The same spelled through a symlink (records hold realpaths): still an old path of this disk.
  await controlCall(h.api, 'shim.stop', { name: 'vm3' });
  const link = join(h.dir, 'vm3-link.raw');
  symlinkSync(file, link);
  const viaLink = await controlCall<{ backing: string; stale: string | null }>(h.api, 'shim.start', { name: 'vm3', source: link });
  assert.equal([viaLink.backing, viaLink.stale], [dest, link]);
  // A start naming a disk this shim never had is refused, naming the record; its advice works.
  await controlCall(h.api, 'shim.stop', { name: 'vm3' });
  const other = join(h.dir, 'other.raw');
  writeFileSync(other, Buffer.alloc(MiB));
  const refused = await controlCall(h.api, 'shim.start', { name: 'vm3', source: other }).then(() => null, (e) => e);
  assert.is(refused?.code, 'conflict');
  const statePath = join(h.stateDir, 'shims', 'vm3.state.json');
  assert.is(refused.message, `shim "vm3": its state file ${statePath} records that this disk lives at ${dest} (moved from ${file}), not ${other}; if the disk really is at ${other} now, remove that file and retry`);
  assert.is((await controlCall<{ removed: boolean }>(h.api, 'shim.forget', { name: 'vm3' })).removed, true);
  const fresh = await controlCall<{ backing: string; stale: string | null }>(h.api, 'shim.start', { name: 'vm3', source: other });
  assert.equal([fresh.backing, fresh.stale], [other, null]);
  const busy = await controlCall(h.api, 'shim.forget', { name: 'vm3' }).then(() => null, (e) => e);
  assert.is(busy?.code, 'busy');
});

test('permissions: with --group the socket dir is 2750 and the NBD socket 0660 of that group; control socket stays 0600', async () => {
  const h = host();
  const file = disk(h, 'g.raw', MiB);
  await startVmshiftd(h);
  const gid = await resolveGroup('daemon');
  const shim = await shimStart(h, 'vmg', file, ['--group', 'daemon']);
  const dir = statSync(join(h.runDir, 'vmg'));
  assert.is(dir.mode & 0o7777, 0o2750);
  assert.is(dir.gid, gid);
  const sock = statSync(shim.socket);
  assert.is(sock.mode & 0o777, 0o660);
  assert.is(sock.gid, gid);
  assert.is(statSync(`${shim.socket}.ctl`).mode & 0o777, 0o600);
  // Without a group: root only.
  const plain = await shimStart(h, 'vmp', disk(h, 'p.raw', MiB));
  assert.is(statSync(join(h.runDir, 'vmp')).mode & 0o777, 0o700);
  assert.is(statSync(plain.socket).mode & 0o777, 0o600);
});

test('bad input: clear errors, nothing recorded', async () => {
  const h = host();
  const file = disk(h, 'x.raw', MiB);
  const down = await cli(h, ['list']);
  assert.is(down.code, 1);
  assert.match(down.stderr, new RegExp(`vmshiftd is not running \\(socket ${h.api}\\)`));

  await startVmshiftd(h);
  for (const bad of ['../evil', '-x', 'a'.repeat(65), 'a/b']) {
    const r = await controlCall(h.api, 'shim.start', { name: bad, source: file }).then(() => null, (e) => e);
    assert.is(r?.code, 'bad-request', bad);
    assert.match(r.message, /invalid shim name/);
  }
  const rel = await cli(h, ['shim-start', 'vmr', 'x.raw']);
  assert.is(rel.code, 1);
  assert.match(rel.stderr, /invalid source "x.raw": give an absolute path or an nbd/);

  const missing = await cli(h, ['shim-start', 'vmm', join(h.dir, 'nope.raw')]);
  assert.is(missing.code, 1);
  assert.match(missing.stderr, /source .*nope\.raw: no such file/);
  assert.not.ok(records(h).some((r) => r.name === 'vmm'), 'nothing recorded');

  const unknown = await cli(h, ['shim-stop', 'ghost', '--json']);
  assert.is(unknown.code, 1);
  assert.equal(JSON.parse(unknown.stdout).error, { code: 'unknown-shim', message: 'no shim named "ghost"' });

  const noGroup = await controlCall(h.api, 'shim.start', { name: 'vmq', source: file, group: 'no-such-group-here' }).then(() => null, (e) => e);
  assert.match(noGroup?.message ?? '', /unknown group "no-such-group-here"/);

  await shimStart(h, 'vmx', file);
  writeFileSync(join(h.dir, 'other.raw'), Buffer.alloc(MiB)); // another disk that exists: the name is what conflicts
  const other = await cli(h, ['shim-start', 'vmx', join(h.dir, 'other.raw')]);
  assert.is(other.code, 1);
  assert.match(other.stderr, /shim "vmx" already serves .*x\.raw, not .*other\.raw/);
  const twice = await cli(h, ['shim-start', 'vmy', file]);
  assert.is(twice.code, 1);
  assert.match(twice.stderr, /already served by shim "vmx"/);
  const job = await controlCall(h.api, 'job.start', { name: 'vmx', to: 'relative.raw' }).then(() => null, (e) => e);
  assert.is(job?.code, 'bad-request');
  const noJob = await controlCall(h.api, 'job.abort', { name: 'ghost' }).then(() => null, (e) => e);
  assert.is(noJob?.code, 'unknown-shim');
  assert.equal(records(h).map((r) => r.name), ['vmx']);
});

test('corrupt registry: the daemon refuses to start and names the file; a second daemon on the same socket is refused', async () => {
  const h = host();
  const d = await startVmshiftd(h);
  const second = await runStatus(vmshiftd, daemonArgs(h, { stateDir: join(h.dir, 'other') }));
  assert.is(second.code, 1);
  assert.match(second.stderr, new RegExp(`another vmshiftd \\(pid ${d.pid}\\) already answers on ${h.api}`));
  await d.stop();

  writeFileSync(join(h.stateDir, 'vmshiftd.json'), '{"version":1,"shims":[{"name":"vm1"');
  const r = await runStatus(vmshiftd, daemonArgs(h));
  assert.is(r.code, 1);
  assert.match(r.stderr, new RegExp(`${h.stateDir}/vmshiftd.json: corrupt registry .*will not start`));
  assert.not.ok(existsSync(h.api), 'nothing listens');
});

async function waitGone(pid: number): Promise<boolean> {
  for (let i = 0; i < 200; i++) {
    if (!(await processAlive(pid))) return true;
    await sleep(50);
  }
  return false;
}

test.run();
