// `vmshift migrate DOMAIN qemu+ssh://HOST/system` between two libvirt hosts (each a libvirtd,
// virtlogd and sshd in its own network, mount and UTS namespace: test/helpers/libvirt-hosts.ts).
// One guest boot serves every check: the sequence writer moves A -> B (healthy), then B -> A
// with the carrying connection reset mid-memory (and a second migration of the same guest
// refused meanwhile), then the bad inputs are tried against it on A. The disk is one file in a
// directory both hosts see at the same path (shared storage).
// Then a second guest, enabled with vmshift (its disk a thin local raw file behind a shim of
// A's vmshiftd), moves to B disk and all: refused first for a datastore B does not allow,
// then moved with the carrying connection reset during the disk copy.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { createHash } from 'node:crypto';
import { existsSync, mkdirSync, readFileSync, readdirSync, statSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { spawn } from 'node:child_process';
import { cleanupAll, onCleanup, run } from '../helpers/proc.ts';
import { ensureGuest, verifyWriterLog } from '../helpers/guest.ts';
import { jsonLinesInNs, resetConnections, type JsonLinesRun } from '../helpers/hosts.ts';
import { VMSHIFT, domState, libvirtHosts, startVmshiftd, type HostVmshiftd, type LibvirtHosts, type LibvirtTestHost } from '../helpers/libvirt-hosts.ts';
import { enableDomain } from '../../src/libvirt/enable.ts';
import { writerDomainXml } from './libvirt-host.ts';
import { controlCall } from '../../src/control/client.ts';

const NAME = 'lvmig';
const SLOTS = 64;
let hosts: LibvirtHosts;
let disk: string, console_: string;

interface Ev { event: string; error?: { code: string; message: string }; [k: string]: unknown }

function seqs(file = console_, from = 0): number[] {
  const text = existsSync(file) ? readFileSync(file, 'latin1').slice(from) : '';
  if (/VMSHIFT-ERROR/.test(text)) throw new Error(`guest error:\n${text.slice(-2000)}`);
  return [...text.matchAll(/^VMSHIFT-SEQ (\d+)\r?$/gm)].map((m) => Number(m[1]));
}
const lastSeq = (file = console_, from = 0) => Math.max(0, ...seqs(file, from));

async function waitSeq(min: number, timeoutMs = 120_000, file = console_, from = 0): Promise<number> {
  const deadline = Date.now() + timeoutMs;
  while (lastSeq(file, from) < min) {
    if (Date.now() > deadline) throw new Error(`writer did not reach record ${min} (at ${lastSeq(file, from)}); console:\n${existsSync(file) ? readFileSync(file, 'latin1').slice(-1500) : '(none)'}`);
    await new Promise((r) => setTimeout(r, 100));
  }
  return lastSeq(file, from);
}

function assertUnbroken(s: number[]): void {
  for (let i = 1; i < s.length; i++) assert.equal(s[i], s[i - 1] + 1, `the writer's sequence broke at ${s[i - 1]} -> ${s[i]}`);
}

/** `vmshift migrate` run inside host `from`, JSON lines parsed. */
function migrate(from: LibvirtTestHost, domain: string, uri: string, extra: string[] = [], during?: (e: Ev) => void): Promise<JsonLinesRun<Ev>> {
  return jsonLinesInNs<Ev>(from, VMSHIFT, ['migrate', domain, uri, '--json', '--peer-vmshift', VMSHIFT, ...extra], { argv: from.argv, during, timeoutMs: 120_000 });
}

/**
 * leftovers(h) once it is empty, or what is left after 30 s: an agent whose link was aborted or
 * finished exits on its own, at once when the source's ABORT or BYE reached it, else after its
 * hold time (a CLI that exits at once may not flush its ABORT on a loaded machine).
 */
async function settledLeftovers(h: LibvirtTestHost): Promise<string[]> {
  for (let i = 0; i < 300 && leftovers(h).length; i++) await new Promise((r) => setTimeout(r, 100));
  return leftovers(h);
}

function leftovers(h: LibvirtTestHost): string[] {
  const out: string[] = [];
  for (const d of ['run/vmshift/links', 'run/vmshift/migrate']) {
    const p = join(h.dir, d);
    if (existsSync(p)) for (const f of readdirSync(p)) if (!f.endsWith('.log')) out.push(`${d}/${f}`);
  }
  return out;
}

test.before(async () => {
  await ensureGuest();
  hosts = await libvirtHosts();
  disk = join(hosts.shared, 'disk.raw');
  console_ = join(hosts.shared, 'console.log');
  await run('qemu-img', ['create', '-f', 'raw', disk, '1M']);
  // 128 MiB of RAM: half the memory phase of the default, the same code paths.
  await hosts.a.virsh.define(writerDomainXml(NAME, disk, console_, SLOTS, 128));
  await hosts.a.virsh.start(NAME);
  await waitSeq(5);
});
test.after(cleanupAll);

test('migrate moves the running domain to B: the writer goes on there, defined on B, gone from A, same disk file', async () => {
  const { a, b } = hosts;
  const ino = statSync(disk).ino;
  const r = await migrate(a, NAME, b.sshUri);
  assert.equal(r.code, 0, `exit ${r.code}: ${r.stderr}\n${JSON.stringify(r.events.slice(-3))}`);
  const done = r.events.find((e) => e.event === 'done') as Ev & { downtimeMs: number; commitMs: number; pausedMs: number; answeredMs: number | null; goneMs: number | null; peerResumeMs: number | null; relayed: { forward: number } };
  assert.ok(done, 'no done event');
  // B was resumed on Finish's answer reaching virsh, not on Confirm killing A's QEMU.
  assert.ok(done.answeredMs !== null && done.pausedMs !== null, `Finish's answer was seen: ${JSON.stringify(done)}`);
  assert.ok(done.goneMs === null || done.pausedMs <= done.goneMs + 50, `resumed before (or about when) A's copy was killed: ${JSON.stringify(done)}`);
  assert.ok(r.events.some((e) => e.event === 'committed'));
  assert.ok(done.relayed.forward > 1024 * 1024, `only ${done.relayed.forward} bytes of memory relayed`);
  const onB = await domState(b, NAME);
  if (onB !== 'running') {
    const log = (h: LibvirtTestHost) => { const f = join(h.dir, `log/qemu/${NAME}.log`); return existsSync(f) ? readFileSync(f, 'utf8').slice(-1500) : '(no log)'; };
    assert.unreachable(`on B: ${onB}\nevents: ${JSON.stringify(r.events.filter((e) => e.event !== 'progress'))}\nconsole: ${readFileSync(console_, 'latin1').slice(-600)}\nB log: ${log(b)}\nB hooks: ${b.hookCalls().join(', ')}`);
  }
  assert.equal(await domState(a, NAME), null, 'still defined on A');
  assert.match(await b.virsh.run(['dominfo', NAME]), /Persistent:\s+yes/);
  const at = lastSeq();
  await waitSeq(at + 10);
  const s = seqs();
  for (let i = 1; i < s.length; i++) assert.equal(s[i], s[i - 1] + 1, `the writer's sequence broke at ${s[i - 1]} -> ${s[i]}`);
  assert.equal(statSync(disk).ino, ino, 'the disk file was replaced');
  assert.equal(verifyWriterLog(disk, lastSeq(), SLOTS), []);
  // The hooks saw an incoming migration on B and an outgoing one on A.
  assert.equal(b.hookCalls().filter((l) => l.startsWith(`${NAME} `)), [`${NAME} migrate begin`, `${NAME} prepare begin`, `${NAME} start begin`, `${NAME} started begin`]);
  assert.ok(a.hookCalls().includes(`${NAME} stopped end`) && a.hookCalls().includes(`${NAME} release end`), a.hookCalls().join('\n'));
  assert.equal(leftovers(a), []);
  assert.equal(leftovers(b), []);
  console.log(`  healthy A->B: ${(Number(done.ms) / 1000).toFixed(1)} s, paused ${done.pausedMs} ms (libvirt's downtime ${done.downtimeMs} ms; Finish answered at ${done.answeredMs} ms, A stopped at ${done.goneMs} ms, commit ${done.commitMs} ms, of which B's own resume ${done.peerResumeMs} ms)`);
});

test('a connection reset during the memory phase is ridden out (libvirt\'s connection rides the link); a second migration meanwhile is refused', async () => {
  const { a, b } = hosts;
  let reset = false;
  let second: Promise<JsonLinesRun<Ev>> | null = null;
  const r = await migrate(b, NAME, a.sshUri, ['--bandwidth', '8M'], (e) => {
    if (e.event === 'progress' && !reset && Number(e.processed) > 4 * 1024 * 1024) {
      reset = true;
      void resetConnections(b, a);
      second = migrate(b, NAME, a.sshUri);
    }
  });
  assert.equal(r.code, 0, `exit ${r.code}: ${r.stderr}\n${JSON.stringify(r.events.slice(-3))}`);
  assert.ok(reset, 'the migration ended before the reset');
  const done = r.events.find((e) => e.event === 'done') as Ev & { link: { reconnects: number }; downtimeMs: number; commitMs: number; pausedMs: number };
  assert.ok(done.link.reconnects >= 1, `no reconnect: ${JSON.stringify(done.link)}`);
  assert.equal(await domState(a, NAME), 'running');
  assert.equal(await domState(b, NAME), null);
  const s2 = await second!;
  assert.equal(s2.code, 1);
  assert.match(s2.events.at(-1)?.error?.message ?? '', /a migration of 'lvmig' is already running/);
  const at = lastSeq();
  await waitSeq(at + 10);
  const s = seqs();
  for (let i = 1; i < s.length; i++) assert.equal(s[i], s[i - 1] + 1, `the writer's sequence broke at ${s[i - 1]} -> ${s[i]}`);
  console.log(`  B->A with a reset: ${(Number(done.ms) / 1000).toFixed(1)} s, ${done.link.reconnects} reconnect(s), paused ${done.pausedMs} ms (libvirt's downtime ${done.downtimeMs} ms, commit ${done.commitMs} ms)`);
});

test('bad input: unknown domain, untrusted host key, unreachable peer: clear errors, nothing changed on either host', async () => {
  const { a, b } = hosts;
  const unknown = await migrate(a, 'nosuch', b.sshUri);
  assert.equal(unknown.code, 1);
  assert.match(unknown.events.at(-1)?.error?.message ?? '', /domain 'nosuch' is not defined on this host/);

  // B's address with A's host key: what a host impersonating B would offer.
  const wrong = join(hosts.shared, 'wrong_known_hosts');
  writeFileSync(wrong, readFileSync(b.sshd.knownHosts, 'utf8').replace(b.sshd.hostKey, a.sshd.hostKey));
  const untrusted = await migrate(a, NAME, b.sshUri.replace(encodeURIComponent(b.sshd.knownHosts), encodeURIComponent(wrong)));
  assert.equal(untrusted.code, 1, untrusted.stderr);
  assert.match(untrusted.events.at(-1)?.error?.message ?? '', /HOST KEY MISMATCH/);

  const closed = b.sshUri.replace(`:${b.sshd.port}/`, ':1/');
  const unreachable = await migrate(a, NAME, closed, ['--connect-timeout', '2s']);
  assert.equal(unreachable.code, 1);
  assert.match(unreachable.events.at(-1)?.error?.message ?? '', /cannot reach root@10\.213\.7\.2:1 within 2 s .*nothing was changed/);

  assert.equal(await domState(a, NAME), 'running');
  assert.equal(await domState(b, NAME), null);
  assert.equal(leftovers(a), []);
  assert.equal(leftovers(b), []);
  const at = lastSeq();
  await waitSeq(at + 3);
});


// ---- a vmshift-enabled domain with a local thin disk -------------------------------------

const LOCAL = 'lvloc';
const MiB = 1024 * 1024;
const allocated = (path: string) => statSync(path).blocks * 512;
const sha = (path: string) => createHash('sha256').update(readFileSync(path)).digest('hex');
let vmA: HostVmshiftd, vmB: HostVmshiftd;
let aImages: string, bImages: string, aDisk: string, console2: string;

test('local disk, bad input: a --to-dir outside B\'s datastores, an unknown --disk: clear errors, nothing changed on either host', async () => {
  const { a, b } = hosts;
  aImages = join(hosts.shared, 'a-images');
  bImages = join(hosts.shared, 'b-images');
  mkdirSync(aImages, { mode: 0o700 });
  mkdirSync(bImages, { mode: 0o700 });
  [vmA, vmB] = await Promise.all([startVmshiftd(a, aImages), startVmshiftd(b, bImages)]);
  aDisk = join(aImages, 'loc.raw');
  console2 = join(hosts.shared, 'console-loc.log');
  // Thin: 64 MiB virtual, 32 MiB of data past the writer's slots, the rest holes: 2 s of copy at --bandwidth 16M.
  await run('qemu-img', ['create', '-q', '-f', 'raw', aDisk, String(64 * MiB)]);
  await run('qemu-io', ['-f', 'raw', '-c', `write -P 0x5a ${8 * MiB} ${32 * MiB}`, aDisk]);
  await a.virsh.define(writerDomainXml(LOCAL, aDisk, console2, SLOTS, 128));
  await enableDomain(a.virsh, LOCAL, { disks: ['vda'], runDir: '/run/vmshift' });
  await a.virsh.start(LOCAL);
  await waitSeq(5, 120_000, console2);
  assert.equal(vmA.shims().map((r) => r.source), [aDisk], 'A\'s vmshiftd serves the disk');

  const outside = join(hosts.shared, 'not-a-datastore');
  mkdirSync(outside, { mode: 0o700 });
  const refusing = ['--peer-config', vmB.config, '--peer-hook-config', vmB.hookConfig, '--hold-time', '10s'];
  const r = await migrate(a, LOCAL, b.sshUri, ['--to-dir', outside, ...refusing]);
  assert.equal(r.code, 1, r.stderr);
  assert.match(r.events.at(-1)?.error?.message ?? '', /disk vda: .*datastore.*nothing was changed/);
  const unknown = await migrate(a, LOCAL, b.sshUri, ['--to-dir', bImages, '--disk', 'vdz=/x.raw', ...refusing]);
  assert.equal(unknown.code, 1, unknown.stderr);
  assert.match(unknown.events.at(-1)?.error?.message ?? '', /--disk vdz=\.\.\.: lvloc has no disk vdz served by a shim .*nothing was changed/);

  assert.equal(readdirSync(outside), []);
  assert.equal(readdirSync(bImages), []);
  assert.equal(vmB.shims(), []);
  assert.equal(await domState(a, LOCAL), 'running');
  assert.equal(await domState(b, LOCAL), null);
  assert.equal(await settledLeftovers(a), []);
  assert.equal(await settledLeftovers(b), []);
  const st = await controlCall<{ job: string | null }>(`${vmA.shims()[0]!.socket.replace('/run/', `${a.dir}/run/`)}.ctl`, 'status');
  assert.equal(st.job, null, 'no job left on A\'s shim');
  await waitSeq(lastSeq(console2) + 3, 60_000, console2);
});

test('local disk: the domain moves to B with its disk (a reset mid-copy resumes without recopying): writer unbroken, every record on B\'s thin file, A\'s file untouched, virsh start on B uses B\'s file', async () => {
  const { a, b } = hosts;
  const bDisk = join(bImages, 'loc.raw');
  let reset = false;
  const r = await migrate(a, LOCAL, b.sshUri, ['--to-dir', bImages, '--peer-config', vmB.config, '--peer-hook-config', vmB.hookConfig, '--bandwidth', '16M'], (e) => {
    if (!reset && e.event === 'disk-progress' && Number(e.bytesCopied) > 4 * MiB) {
      reset = true;
      void resetConnections(a, b);
    }
  });
  const summary = `${JSON.stringify(r.events.filter((e) => e.event !== 'progress' && e.event !== 'disk-progress'))}\n${r.stderr}`;
  assert.equal(r.code, 0, summary);
  assert.ok(reset, `the connection was reset during the disk copy: ${summary}`);
  const done = r.events.find((e) => e.event === 'done') as Ev & { link: { reconnects: number; resentBytes: number }; pausedMs: number; downtimeMs: number; answeredMs: number | null; goneMs: number | null; peerResumeMs: number | null; commitMs: number };
  assert.ok(done.link.reconnects >= 1, `the link reconnected: ${JSON.stringify(done.link)}`);
  const aHash = sha(aDisk);
  assert.equal(await domState(b, LOCAL), 'running', summary);
  assert.equal(await domState(a, LOCAL), null, 'still defined on A');
  // B's definition names B's file; B's vmshiftd serves it, A's serves nothing any more.
  const inactive = await b.virsh.dumpxml(LOCAL, { inactive: true });
  assert.ok(inactive.includes(`file='${bDisk}'`) || inactive.includes(`file="${bDisk}"`), inactive);
  assert.equal(vmB.shims().map((s) => s.source), [bDisk]);
  // A's release hook stopped A's shim (Confirm killed the source QEMU).
  for (let i = 0; i < 100 && vmA.shims().length; i++) await new Promise((res) => setTimeout(res, 100));
  const aLog = () => { const f = join(a.dir, `log/qemu/${LOCAL}.log`); return existsSync(f) ? readFileSync(f, 'utf8').slice(-2000) : '(no log)'; };
  assert.equal(vmA.shims(), [], `A's shim stopped; hooks on A: ${a.hookCalls().filter((l) => l.startsWith(LOCAL)).join(', ')}\nA's log: ${aLog()}`);
  // Bytes: the copy of the allocated data once, the resend after the reset on top.
  const progress = r.events.filter((e) => e.event === 'disk-progress');
  const copied = Math.max(...progress.map((e) => Number(e.bytesCopied)));
  const alloc = allocated(aDisk);
  process.stderr.write(`  local disk: allocated ${alloc}, copied ${copied}, resent ${done.link.resentBytes}: ${((copied + done.link.resentBytes) / alloc).toFixed(3)}x\n`);
  assert.ok(copied + done.link.resentBytes <= 1.05 * alloc, `bytes sent ${copied} + ${done.link.resentBytes} <= 1.05 x allocated ${alloc}`);
  // The writer goes on on B without a gap; then every acknowledged record is on B's file.
  await waitSeq(lastSeq(console2) + 10, 120_000, console2);
  assertUnbroken(seqs(console2));
  await b.virsh.run(['destroy', LOCAL]);
  const last = lastSeq(console2);
  assert.equal(verifyWriterLog(bDisk, last, SLOTS), [], 'every acknowledged record is on B\'s file');
  assert.ok(allocated(bDisk) <= alloc + 4 * MiB, `B's file stayed thin: ${allocated(bDisk)} allocated, A has ${alloc}`);
  assert.equal(sha(aDisk), aHash, 'A\'s file untouched after the move');
  assert.equal(await settledLeftovers(a), []);
  assert.equal(await settledLeftovers(b), []);
  // After a shutdown, a start on B serves B's file: its hook had B's vmshiftd start the shim
  // QEMU's disk connects to, on the path B's definition records.
  for (let i = 0; i < 100 && vmB.shims().length; i++) await new Promise((res) => setTimeout(res, 100));
  assert.equal(vmB.shims(), [], 'the shutdown stopped B\'s shim');
  await b.virsh.start(LOCAL);
  assert.equal(vmB.shims().map((s) => [s.source, s.desired]), [[bDisk, 'running']]);
  assert.equal(await domState(b, LOCAL), 'running');
  await b.virsh.run(['destroy', LOCAL]);
  assert.equal(sha(aDisk), aHash, 'A\'s file untouched by the start on B');
  console.log(`  local disk A->B with a reset: ${(Number(done.ms) / 1000).toFixed(1)} s, ${done.link.reconnects} reconnect(s), paused ${done.pausedMs} ms (libvirt's downtime ${done.downtimeMs} ms; Finish answered at ${done.answeredMs} ms, A stopped at ${done.goneMs} ms, commit ${done.commitMs} ms, of which B's own resume ${done.peerResumeMs} ms)`);
});

test('vmshift migrate killed -9 once Finish\'s answer reached virsh, before it resumed B: A\'s copy never runs again (libvirt confirms or leaves it paused), B holds it paused; resumed by hand, the writer goes on unbroken', async () => {
  const { a, b } = hosts;
  const fault = join(hosts.shared, 'fault-point');
  writeFileSync(fault, 'libvirt-finish-answered');
  const [cmd, argv] = a.argv(VMSHIFT, ['migrate', NAME, b.sshUri, '--json', '--peer-vmshift', VMSHIFT, '--hold-time', '5s']);
  const p = spawn(cmd, argv, { stdio: ['ignore', 'pipe', 'pipe'], env: { ...process.env, VMSHIFT_FAULT_FILE: fault } });
  onCleanup(() => { if (p.exitCode === null) p.kill('SIGKILL'); });
  let err = '';
  p.stdout!.resume();
  const reached = new Promise<void>((resolve, reject) => {
    p.stderr!.on('data', (d: Buffer) => { err += d; if (err.includes('fault point libvirt-finish-answered reached')) resolve(); });
    p.once('close', (code) => reject(new Error(`vmshift migrate exited (${code}) before the fault point: ${err}`)));
  });
  const t = setTimeout(() => p.kill('SIGKILL'), 120_000);
  await reached.finally(() => clearTimeout(t));
  p.kill('SIGKILL');
  // virsh goes on without vmshift: its Confirm kills A's copy. A must never run again meanwhile.
  let onA: string | null = 'paused';
  for (let i = 0; i < 600 && onA !== null && onA !== 'shut off'; i++) {
    onA = await domState(a, NAME);
    assert.ok(onA !== 'running', 'the guest runs on A again after Finish had succeeded');
    await new Promise((r) => setTimeout(r, 100));
  }
  assert.ok(onA === null || onA === 'shut off', `A's copy is gone: ${onA}`);
  assert.equal(await domState(b, NAME), 'paused', 'B holds the guest, paused (nobody resumed it)');
  const at = lastSeq();
  await new Promise((r) => setTimeout(r, 1000));
  assert.equal(lastSeq(), at, 'no copy writes while B is paused and A is gone');
  await b.virsh.run(['resume', NAME]);
  await waitSeq(at + 10);
  assertUnbroken(seqs());
  assert.equal(verifyWriterLog(disk, lastSeq(), SLOTS), []);
  assert.equal(await domState(a, NAME), null, 'undefined on A (--undefinesource)');
});

test.run();
