// vmshift under a real libvirtd (private mount namespace, hook installed before it starts)
// with a real vmshiftd and the tiny guest running its continuous writer:
// enable -> start (hook starts the shim) -> libvirtd restart (reconnect) -> vmshiftd restart
// -> migrate-storage by domain name -> destroy (hook stops the shim) -> the writer log is
// complete on the new path -> start again on the new path -> disable gives back the
// original XML with only the disk's path changed. Plus the refusals.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { createHash } from 'node:crypto';
import { existsSync, mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { cleanupAll, runStatus, type Daemon } from '../helpers/proc.ts';
import { ensureGuest, verifyWriterLog } from '../helpers/guest.ts';
import { migrateDomainStorage } from '../../src/libvirt/enable.ts';
import { isEnabled } from '../../src/libvirt/domain-xml.ts';
import { planShims } from '../../src/libvirt/shim-plan.ts';
import { VirshMonitor } from '../../src/qemu/virsh-monitor.ts';
import { VMSHIFT, libvirtHost, vmshiftHost, writerDomainXml, type LibvirtHost, type VmshiftHost } from './libvirt-host.ts';

test.after(cleanupAll);

const SLOTS = 256;
const NAME = 'vmsh-e2e';
let vm: VmshiftHost, lv: LibvirtHost, daemon: Daemon, disk: string, console_: string;

const cli = (args: string[]) => runStatus(VMSHIFT, [...args, '-c', lv.uri], { env: vm.env });
const sha = (f: string) => createHash('sha256').update(readFileSync(f)).digest('hex');

/** Highest acknowledged writer record in this run's console (libvirt truncates it at start). */
function lastSeq(): number {
  if (!existsSync(console_)) return 0;
  let last = 0;
  for (const m of readFileSync(console_, 'latin1').matchAll(/^VMSHIFT-SEQ (\d+)\r?$/gm)) last = Math.max(last, Number(m[1]));
  if (/VMSHIFT-ERROR/.test(readFileSync(console_, 'latin1'))) throw new Error(`guest error:\n${readFileSync(console_, 'latin1').slice(-2000)}`);
  return last;
}

async function writerPasses(seq: number, timeoutMs = 120_000): Promise<number> {
  const deadline = Date.now() + timeoutMs;
  while (lastSeq() < seq) {
    if (Date.now() > deadline) throw new Error(`writer did not reach record ${seq} (at ${lastSeq()}); console:\n${existsSync(console_) ? readFileSync(console_, 'latin1').slice(-2000) : '(none)'}`);
    await new Promise((r) => setTimeout(r, 200));
  }
  return lastSeq();
}

const shimOf = () => vm.shims().find((s) => s.name === `${NAME}-vda`);

test('setup: vmshiftd, libvirtd with the hook, a defined domain on a raw file', async () => {
  await ensureGuest();
  vm = vmshiftHost();
  daemon = await vm.start();
  lv = libvirtHost(vm);
  await lv.start();
  mkdirSync(join(vm.dir, 'ds1'));
  disk = join(vm.dir, 'ds1/disk.raw');
  writeFileSync(disk, Buffer.alloc(16 * 1024 * 1024));
  console_ = join(vm.dir, 'console.log');
  await lv.virsh.define(writerDomainXml(NAME, disk, console_, SLOTS));
});

test('bad input: unknown domain, unknown disk, not enabled: clear errors, XML unchanged', async () => {
  const before = await lv.virsh.dumpxml(NAME, { inactive: true });
  let r = await cli(['enable', 'no-such-domain']);
  assert.is(r.code, 1);
  assert.match(r.stderr, /no-such-domain/);
  r = await cli(['enable', NAME, '--disk', 'vdz']);
  assert.is(r.code, 1);
  assert.match(r.stderr, /no disk with target 'vdz'/);
  r = await cli(['disable', NAME]);
  assert.is(r.code, 1);
  assert.match(r.stderr, /not enabled/);
  const err = await migrateDomainStorage(lv.virsh, NAME, { disk: 'vda', to: join(vm.dir, 'x.raw'), daemonSocket: vm.api }).catch((e: Error) => e);
  assert.match(String(err), /not enabled in domain 'vmsh-e2e'/);
  assert.is(await lv.virsh.dumpxml(NAME, { inactive: true }), before);
});

let original: string, oldSum: string, beforeDestroy = Infinity;
test('enable rewrites the persistent XML; start runs the shim through the hook', async () => {
  original = await lv.virsh.dumpxml(NAME, { inactive: true });
  const r = await cli(['enable', NAME, '--disk', 'vda', '--run-dir', vm.runDir]);
  assert.is(r.code, 0, r.stderr);
  const xml = await lv.virsh.dumpxml(NAME, { inactive: true });
  assert.ok(isEnabled(xml));
  assert.ok(xml.includes(`socket='${join(vm.runDir, `${NAME}-vda`, 'nbd.sock')}'`), xml);
  // <reconnect delay> is asked for; libvirt 9.0 drops it silently, and enable says so.
  const kept = xml.includes(`<reconnect delay='30'/>`);
  if (!kept) assert.match(r.stderr, /note: libvirt dropped <reconnect delay='30'\/> from vmsh-e2e's disks \(libvirt 9\.0 does not know it\): vmshiftd gives QEMU the delay through libvirt's monitor after each start instead/);
  await lv.virsh.start(NAME);
  assert.is(shimOf()?.source, disk);
  // What QEMU got: the delay reaches its -blockdev exactly when libvirt kept the element.
  const qemuPid = readFileSync(join(lv.dir, 'run/libvirt/qemu', `${NAME}.pid`), 'utf8').trim();
  assert.is(readFileSync(`/proc/${qemuPid}/cmdline`, 'utf8').includes('"reconnect-delay":30'), kept);
  await writerPasses(50);
  // Enabling again names the domain and says the shim serves already (not "at its next start").
  const again = await cli(['enable', NAME, '--run-dir', vm.runDir]);
  assert.is(again.code, 1);
  assert.match(again.stderr, new RegExp(`vmshift is already enabled in domain '${NAME}': vda \\(shim '${NAME}-vda' serves it now\\)`));
});

/** QMP through libvirt, as vmshiftd sends it. */
const monitor = async <T>(cmd: string, args?: Record<string, unknown>) => (await new VirshMonitor(NAME, lv.virsh).execute<T>(cmd, args));
const storageNodes = async () => (await monitor<Array<{ 'node-name': string; drv: string }>>('query-named-block-nodes', { flat: true })).filter((n) => n.drv === 'nbd').map((n) => n['node-name']);

/** vmshiftd's log says it gave QEMU the delay (the `started` hook asked for it). */
async function heldIoGiven(count: number, timeoutMs = 60_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  const seen = () => daemon.output().split('\n').filter((l) => l.includes('reconnect-delay set through the monitor')).length;
  while (seen() < count) {
    if (Date.now() > deadline) throw new Error(`vmshiftd never set the reconnect delay:\n${daemon.output().slice(-3000)}`);
    await new Promise((r) => setTimeout(r, 100));
  }
  const line = daemon.output().split('\n').filter((l) => l.includes('reconnect-delay set through the monitor')).pop()!;
  console.log(`  reconnect-delay ${JSON.parse(line).reconnectDelay} s set through the monitor in ${JSON.parse(line).ms} ms`);
}

test('libvirt 9.0: kill -9 of the shim under writes is a stall: vmshiftd set the delay through the monitor', async () => {
  assert.ok(lv.hookCalls().includes(`${NAME} started begin`), lv.hookCalls().join('\n'));
  await heldIoGiven(1);
  // libvirt's own view is unchanged: same node names, the disk, no job, stats readable.
  assert.equal(await storageNodes(), ['libvirt-1-storage']);
  assert.match(await lv.virsh.run(['domblklist', NAME]), new RegExp(`vda +vda`));
  assert.match(await lv.virsh.run(['blockjob', NAME, 'vda', '--info']), /No current block job/);
  const stats = await lv.virsh.run(['domblkstat', NAME, 'vda']);
  assert.ok(Number(/wr_req (\d+)/.exec(stats)?.[1]) > 0, stats);
  const old = shimOf()!;
  const seq = lastSeq();
  process.kill(old.pid!, 'SIGKILL');
  const deadline = Date.now() + 30_000;
  while (!(shimOf()?.pid && shimOf()!.pid !== old.pid)) {
    assert.ok(Date.now() < deadline, 'vmshiftd did not restart the shim');
    await new Promise((r) => setTimeout(r, 50));
  }
  // lastSeq() throws on a VMSHIFT-ERROR line: the guest saw no I/O error.
  const t0 = Date.now();
  await writerPasses(seq + 40);
  console.log(`  kill -9 of the shim: 40 more records ${Date.now() - t0} ms after the kill`);
  assert.is(await lv.virsh.domstate(NAME), 'running');
});

test('a libvirtd restart (reconnect) and a vmshiftd restart lose nothing', async () => {
  const pid = shimOf()?.pid;
  await lv.stop();
  await lv.start();
  // libvirtd reconnects to its guests in a thread after its socket is up.
  for (let i = 0; i < 300 && !lv.hookCalls().includes(`${NAME} reconnect begin`); i++) await new Promise((r) => setTimeout(r, 100));
  assert.ok(lv.hookCalls().includes(`${NAME} reconnect begin`), lv.hookCalls().join('\n'));
  assert.is(await lv.virsh.domstate(NAME), 'running');
  let seq = await writerPasses(lastSeq() + 30);
  // The daemon's restart re-adopts the running shim (same process); the guest never notices.
  await daemon.stop();
  daemon = await vm.start();
  assert.is(shimOf()?.pid, pid);
  seq = await writerPasses(seq + 30);
  assert.ok(seq > 0);
});

test('migrate-storage by domain name moves the disk and records the new path', async () => {
  const to = join(vm.dir, 'ds2/disk.raw');
  mkdirSync(join(vm.dir, 'ds2'));
  // As an operator runs it: the CLI verb by domain name (one shimmed disk: no --disk needed).
  const cli = await runStatus(VMSHIFT, ['migrate-storage', NAME, '--to', to, '-c', lv.uri, '--daemon-socket', vm.api, '--max-downtime', '200ms', '--json']);
  assert.is(cli.code, 0, cli.stderr + cli.stdout);
  const r = JSON.parse(cli.stdout.trim().split('\n').pop()!);
  assert.is(r.from, disk);
  assert.is(r.to, to);
  assert.is(r.recorded, true);
  // vmshift list shows where the disk is now.
  const list = await runStatus(VMSHIFT, ['list'], { env: vm.env });
  assert.match(list.stdout, new RegExp(`${NAME}-vda .*${to} \\(moved from ${disk}\\)`));
  const xml = await lv.virsh.dumpxml(NAME, { inactive: true });
  assert.is(planShims(xml)?.disks[0]?.source, to);
  assert.not.ok(xml.includes(disk), xml);
  beforeDestroy = await writerPasses(lastSeq() + 30);
});

test('destroy stops the shim; every acknowledged record is on the new path', async () => {
  await lv.virsh.destroy(NAME);
  assert.ok(lv.hookCalls().includes(`${NAME} release end`));
  assert.is(shimOf(), undefined);
  const last = lastSeq();
  assert.ok(last >= beforeDestroy, `only ${last} records`);
  assert.equal(verifyWriterLog(join(vm.dir, 'ds2/disk.raw'), last, SLOTS), []);
  oldSum = sha(disk);
});

test('start again serves the new path; the old file is not touched', async () => {
  await lv.virsh.start(NAME);
  assert.is(shimOf()?.backing, join(vm.dir, 'ds2/disk.raw'));
  await writerPasses(40);
  await lv.virsh.destroy(NAME);
  assert.equal(verifyWriterLog(join(vm.dir, 'ds2/disk.raw'), lastSeq(), SLOTS), []);
  assert.is(sha(disk), oldSum);
});

test('disable restores the original XML except for the disk path', async () => {
  const r = await cli(['disable', NAME]);
  assert.is(r.code, 0, r.stderr);
  const xml = await lv.virsh.dumpxml(NAME, { inactive: true });
  assert.is(xml, original.replace(`file='${disk}'`, `file='${join(vm.dir, 'ds2/disk.raw')}'`));
});

test('an enabled domain does not start while vmshiftd is down, with the reason', async () => {
  const en = await cli(['enable', NAME, '--run-dir', vm.runDir]);
  assert.is(en.code, 0, en.stderr);
  // The domain is off, so no shim runs: stop the daemon, then try to start the domain.
  assert.is(vm.shims().length, 0);
  await daemon.stop();
  const err = await lv.virsh.start(NAME).catch((e: Error) => e);
  assert.instance(err, Error);
  assert.match(String(err), /vmshiftd is not running/);
  assert.is(await lv.virsh.domstate(NAME), 'shut off');
  // disable needs the daemon (it holds where the disk lives); its advice works.
  const refused = await cli(['disable', NAME]);
  assert.is(refused.code, 1);
  assert.match(refused.stderr, /cannot ask vmshiftd where disk vda of 'vmsh-e2e' lives now .*start vmshiftd and retry/);
  daemon = await vm.start();
  const r = await cli(['disable', NAME]);
  assert.is(r.code, 0, r.stderr);
  assert.match(r.stdout, new RegExp(`vda: back on ${join(vm.dir, 'ds2/disk.raw')}`));
});

test('libvirt 9.0: a shim that never comes back within the delay gives the guest an I/O error, not a hang', async () => {
  const en = await cli(['enable', NAME, '--run-dir', vm.runDir, '--reconnect-delay', '3']);
  assert.is(en.code, 0, en.stderr);
  await lv.virsh.start(NAME);
  await heldIoGiven(1);
  await writerPasses(20);
  await daemon.stop(); // nobody restarts the shim now (its process outlives the daemon)
  const acked = lastSeq();
  const t0 = Date.now();
  process.kill(shimOf()!.pid!, 'SIGKILL');
  let ms = -1;
  while (ms < 0 && Date.now() - t0 < 30_000) {
    if (/VMSHIFT-ERROR writer record \d+: .*Input\/output error/.test(readFileSync(console_, 'latin1'))) ms = Date.now() - t0;
    else await new Promise((r) => setTimeout(r, 50));
  }
  console.log(`  shim gone with reconnect-delay 3 (set through the monitor): guest I/O error after ${ms} ms`);
  assert.ok(ms >= 2500 && ms < 15_000, `error after ${ms} ms`);
  const file = join(vm.dir, 'ds2/disk.raw');
  await lv.virsh.destroy(NAME).catch(() => {});
  assert.equal(verifyWriterLog(file, acked, SLOTS), []);
  daemon = await vm.start();
});

test.run();
