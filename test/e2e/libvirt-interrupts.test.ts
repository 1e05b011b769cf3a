// Nothing lost when a domain-form `vmshift migrate-storage` is interrupted (issue 10, part 1).
// One real libvirtd, one vmshiftd, one guest running the sequence writer, shared by every case:
// at each phase of a move (copying; switched over, before the XML records it) the CLI gets
// SIGINT or SIGKILL, or vmshiftd or libvirtd restarts. After each case: no job runs, the
// domain's persistent XML names the disk the shim serves (the shim's state file, the truth),
// and that disk holds every write the guest saw acknowledged. Between cases the domain is
// destroyed and started again (also with vmshiftd down at the destroy, and with an XML left
// naming an old path): it always boots on the disk that holds every acknowledged write.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { existsSync, mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { cleanupAll, runStatus, startDaemon, type Daemon } from '../helpers/proc.ts';
import { ensureGuest, verifyWriterLog } from '../helpers/guest.ts';
import { controlCall } from '../../src/control/client.ts';
import { mapPaths } from '../../src/libvirt/domain-xml.ts';
import { planShims } from '../../src/libvirt/shim-plan.ts';
import { VMSHIFT, libvirtHost, vmshiftHost, writerDomainXml, type LibvirtHost, type VmshiftHost } from './libvirt-host.ts';

test.after(cleanupAll);

const SLOTS = 256;
const NAME = 'vmsh-intr';
const SHIM = `${NAME}-vda`;
let vm: VmshiftHost, lv: LibvirtHost, daemon: Daemon, consolePath: string, first: string;
let moves = 0;

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

async function until<T>(what: string, fn: () => Promise<T | undefined | false> | T | undefined | false, timeoutMs = 60_000): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const v = await fn();
    if (v) return v;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await sleep(100);
  }
}

function lastSeq(): number {
  if (!existsSync(consolePath)) return 0;
  const text = readFileSync(consolePath, 'latin1');
  if (/VMSHIFT-ERROR/.test(text)) throw new Error(`guest error:\n${text.slice(-2000)}`);
  let last = 0;
  for (const m of text.matchAll(/^VMSHIFT-SEQ (\d+)\r?$/gm)) last = Math.max(last, Number(m[1]));
  return last;
}

const writerPasses = (n: number) => until(`writer record ${n}`, () => lastSeq() >= n, 120_000);
const api = <T>(method: string, params: Record<string, unknown> = {}) => controlCall<T>(vm.api, method, params, { timeoutMs: 30_000 });
/** The shim's state file: where the disk lives. */
const truth = (): string => JSON.parse(readFileSync(join(vm.stateDir, 'shims', `${SHIM}.state.json`), 'utf8')).backing;
const recordedPath = async () => planShims(await lv.virsh.dumpxml(NAME, { inactive: true }))?.disks[0]?.source;

/** No job runs, and the XML records where the disk lives; returns that path. */
async function settled(): Promise<string> {
  await until('the job to end', async () => !(await api<{ running: boolean }>('job.status', { name: SHIM }).then((s) => s.running, () => true)));
  const backing = truth();
  await until(`the XML to record ${backing}`, async () => (await recordedPath()) === backing, 90_000);
  assert.is(vm.shims().find((s) => s.name === SHIM)?.backing, backing, 'vmshift list follows the state file');
  return backing;
}

/** Pause the guest, check every acknowledged record is on `disk`, let it go on. */
async function writesIntact(disk: string): Promise<void> {
  await lv.virsh.run(['suspend', '--domain', NAME]);
  try {
    const seq = lastSeq();
    assert.ok(seq > 0);
    assert.equal(verifyWriterLog(disk, seq, SLOTS), [], `records on ${disk}`);
  } finally {
    await lv.virsh.run(['resume', '--domain', NAME]);
  }
  await writerPasses(lastSeq() + 10);
}

/** Destroy and start: the disk the new start serves holds every record acknowledged before. */
async function rebootKeepsWrites(): Promise<void> {
  const before = lastSeq();
  await lv.virsh.destroy(NAME);
  await until('the shim to stop', () => !vm.shims().some((s) => s.name === SHIM));
  const disk = truth();
  assert.equal(verifyWriterLog(disk, before, SLOTS), [], `after destroy, on ${disk}`);
  await lv.virsh.start(NAME);
  assert.is(vm.shims().find((s) => s.name === SHIM)?.backing, disk, 'the start serves where the disk lives');
  await writerPasses(20);
}

interface Move {
  daemon: Daemon;
  to: string;
  events(): Array<{ event?: string; data?: { phase?: string; message?: string }; error?: { code: string; message: string } }>;
}

function startMove(extra: string[] = []): Move {
  const to = join(vm.dir, `ds/m${++moves}.raw`);
  const d = startDaemon(VMSHIFT, ['migrate-storage', NAME, '--to', to, '-c', lv.uri, '--daemon-socket', vm.api, '--max-downtime', '200ms', '--json', ...extra], { env: vm.env });
  const events = () => d.output().split('\n').filter((l) => l.startsWith('{')).map((l) => JSON.parse(l));
  return { daemon: d, to, events };
}

const copying = (m: Move) => until('the copy phase', () => m.events().some((e) => e.data?.phase === 'precopy'), 60_000);
const switched = (m: Move) => until('the switch-over to commit', () => m.events().some((e) => e.event === 'note' && /waiting for vmshiftd to record/.test(e.data?.message ?? '')), 60_000);

test('setup: vmshiftd, libvirtd, an enabled domain with one disk, running its writer', async () => {
  await ensureGuest();
  vm = vmshiftHost('vli-');
  daemon = await vm.start();
  lv = libvirtHost(vm);
  await lv.start();
  mkdirSync(join(vm.dir, 'ds'));
  first = join(vm.dir, 'ds/m0.raw');
  writeFileSync(first, Buffer.alloc(8 * 1024 * 1024));
  consolePath = join(vm.dir, 'console.log');
  await lv.virsh.define(writerDomainXml(NAME, first, consolePath, SLOTS));
  const en = await runStatus(VMSHIFT, ['enable', NAME, '-c', lv.uri, '--run-dir', vm.runDir], { env: vm.env });
  assert.is(en.code, 0, en.stderr);
  await lv.virsh.start(NAME);
  await writerPasses(30);
});

// ---- interrupted while copying: the job is aborted, the disk stays where it was ----------

test('Ctrl-C while copying: exit 130, aborted, the disk stays on its source', async () => {
  const from = truth();
  const m = startMove(['--bandwidth', '2M']);
  await copying(m);
  m.daemon.proc.kill('SIGINT');
  assert.is(await m.daemon.exited, 130, m.daemon.output());
  const last = m.events().pop();
  assert.is(last?.error?.code, 'interrupted');
  assert.match(last!.error!.message, new RegExp(`aborted; the disk stays on ${from}`));
  assert.is(await settled(), from);
  assert.not.ok(existsSync(m.to), 'the aborted job removed the file it created');
  await writesIntact(from);
});

test('SIGKILL of the CLI while copying: the shim aborts the job', async () => {
  const from = truth();
  const m = startMove(['--bandwidth', '2M']);
  await copying(m);
  m.daemon.proc.kill('SIGKILL');
  await m.daemon.exited;
  assert.is(await settled(), from);
  await until('the destination to be removed', () => !existsSync(m.to));
  await writesIntact(from);
});

test('vmshiftd restarted while copying: the CLI says the move was aborted and where the disk is', async () => {
  const from = truth();
  const m = startMove(['--bandwidth', '2M']);
  await copying(m);
  await daemon.stop();
  daemon = await vm.start();
  assert.is(await m.daemon.exited, 1, m.daemon.output());
  assert.match(m.events().pop()?.error?.message ?? '', new RegExp(`vmshiftd went away before the switch-over: .* stays on ${from}`));
  assert.is(await settled(), from);
  await writesIntact(from);
});

// ---- interrupted after the switch-over: the move stands and is recorded anyway ----------

test('libvirtd down from the copy until after the switch-over: moved, recorded once it is back', async () => {
  const m = startMove(['--bandwidth', '4M']);
  await copying(m);
  await lv.stop();
  await switched(m);
  assert.is(truth(), m.to, 'the move committed while libvirtd was away');
  await sleep(1500); // vmshiftd tries to record and fails meanwhile
  assert.match(vm.shims().find((s) => s.name === SHIM)?.recorded ?? 'null', /^(null|.*m[0-9]+\.raw)$/);
  assert.is.not(vm.shims().find((s) => s.name === SHIM)?.recorded, m.to);
  await lv.start();
  assert.is(await m.daemon.exited, 0, m.daemon.output());
  const r = m.events().pop() as unknown as { from: string; to: string; recorded: boolean };
  assert.is(r.to, m.to);
  assert.is(r.recorded, true);
  assert.is(await settled(), m.to);
  await writesIntact(m.to);
});

test('SIGKILL of the CLI right after the switch-over: vmshiftd records the move; a restart boots on it', async () => {
  const from = truth();
  const m = startMove();
  await switched(m);
  m.daemon.proc.kill('SIGKILL');
  assert.is(await settled(), m.to);
  assert.is.not(m.to, from);
  await writesIntact(m.to);
  await rebootKeepsWrites();
});

test('Ctrl-C after the switch-over: exit 0, the move stands', async () => {
  const m = startMove();
  await switched(m);
  m.daemon.proc.kill('SIGINT');
  assert.is(await m.daemon.exited, 0, m.daemon.output());
  assert.is(await settled(), m.to);
  await writesIntact(m.to);
});

test('vmshiftd restarted after the switch-over: the restarted daemon records the move', async () => {
  const m = startMove();
  await switched(m);
  await daemon.stop('SIGKILL');
  daemon = await vm.start();
  await m.daemon.exited;
  assert.is(await settled(), m.to);
  await writesIntact(m.to);
});

// ---- stops and starts with the record out of reach -------------------------------------

test('vmshiftd down at destroy: the warning is in libvirt\'s log; the daemon stops the leftover shim when back', async () => {
  const disk = truth();
  const before = lastSeq();
  await daemon.stop();
  await lv.virsh.destroy(NAME);
  const log = readFileSync(join(lv.dir, `log/qemu/${NAME}.log`), 'utf8');
  assert.match(log, /vmshift hook: release: warning: vmshiftd is not running .*vmshiftd stops the domain's shims when it is back/);
  daemon = await vm.start();
  await until('the orphaned shim to be stopped', () => !vm.shims().some((s) => s.name === SHIM), 60_000);
  assert.equal(verifyWriterLog(disk, before, SLOTS), []);
});

test('an XML naming an old path (a record lost before this fix): the start serves where the disk lives and repairs the XML', async () => {
  const disk = truth();
  assert.is.not(disk, first);
  await lv.virsh.define(mapPaths(await lv.virsh.dumpxml(NAME, { inactive: true }), { [disk]: first }));
  assert.is(await recordedPath(), first);
  await lv.virsh.start(NAME);
  assert.is(vm.shims().find((s) => s.name === SHIM)?.backing, disk);
  const log = readFileSync(join(lv.dir, `log/qemu/${NAME}.log`), 'utf8');
  assert.ok(log.includes(`shim '${SHIM}' serves ${disk} on`) && log.includes(`the domain's XML still records ${first}`), log.slice(-1500));
  await writerPasses(20);
  assert.is(await settled(), disk);
  await writesIntact(disk);
});

test('disable puts back the path the disk lives at', async () => {
  await lv.virsh.destroy(NAME);
  const disk = truth();
  const r = await runStatus(VMSHIFT, ['disable', NAME, '-c', lv.uri], { env: vm.env });
  assert.is(r.code, 0, r.stderr);
  const xml = await lv.virsh.dumpxml(NAME, { inactive: true });
  assert.ok(xml.includes(`<source file='${disk}'/>`), xml);
});

test.run();
