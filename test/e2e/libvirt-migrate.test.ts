// `vmshift migrate DOMAIN qemu+ssh://HOST/system` between two libvirt hosts (each a libvirtd,
// virtlogd and sshd in its own network, mount and UTS namespace: test/helpers/libvirt-hosts.ts).
// One guest boot serves every check: the sequence writer moves A -> B (healthy), then B -> A
// with the carrying connection reset mid-memory (and a second migration of the same guest
// refused meanwhile), then the bad inputs are tried against it on A. The disk is one file in a
// directory both hosts see at the same path (shared storage).
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { existsSync, readFileSync, readdirSync, statSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { cleanupAll, run } from '../helpers/proc.ts';
import { ensureGuest, verifyWriterLog } from '../helpers/guest.ts';
import { jsonLinesInNs, resetConnections, type JsonLinesRun } from '../helpers/hosts.ts';
import { VMSHIFT, domState, libvirtHosts, type LibvirtHosts, type LibvirtTestHost } from '../helpers/libvirt-hosts.ts';
import { writerDomainXml } from './libvirt-host.ts';

const NAME = 'lvmig';
const SLOTS = 64;
let hosts: LibvirtHosts;
let disk: string, console_: string;

interface Ev { event: string; error?: { code: string; message: string }; [k: string]: unknown }

function seqs(): number[] {
  const text = existsSync(console_) ? readFileSync(console_, 'latin1') : '';
  if (/VMSHIFT-ERROR/.test(text)) throw new Error(`guest error:\n${text.slice(-2000)}`);
  return [...text.matchAll(/^VMSHIFT-SEQ (\d+)\r?$/gm)].map((m) => Number(m[1]));
}
const lastSeq = () => Math.max(0, ...seqs());

async function waitSeq(min: number, timeoutMs = 120_000): Promise<number> {
  const deadline = Date.now() + timeoutMs;
  while (lastSeq() < min) {
    if (Date.now() > deadline) throw new Error(`writer did not reach record ${min} (at ${lastSeq()}); console:\n${existsSync(console_) ? readFileSync(console_, 'latin1').slice(-1500) : '(none)'}`);
    await new Promise((r) => setTimeout(r, 100));
  }
  return lastSeq();
}

/** `vmshift migrate` run inside host `from`, JSON lines parsed. */
function migrate(from: LibvirtTestHost, domain: string, uri: string, extra: string[] = [], during?: (e: Ev) => void): Promise<JsonLinesRun<Ev>> {
  return jsonLinesInNs<Ev>(from, VMSHIFT, ['migrate', domain, uri, '--json', '--peer-vmshift', VMSHIFT, ...extra], { argv: from.argv, during, timeoutMs: 120_000 });
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
  await hosts.a.virsh.define(writerDomainXml(NAME, disk, console_, SLOTS).replace("<memory unit='MiB'>256</memory>", "<memory unit='MiB'>128</memory>"));
  await hosts.a.virsh.start(NAME);
  await waitSeq(5);
});
test.after(cleanupAll);

test('migrate moves the running domain to B: the writer goes on there, defined on B, gone from A, same disk file', async () => {
  const { a, b } = hosts;
  const ino = statSync(disk).ino;
  const r = await migrate(a, NAME, b.sshUri);
  assert.equal(r.code, 0, `exit ${r.code}: ${r.stderr}\n${JSON.stringify(r.events.slice(-3))}`);
  const done = r.events.find((e) => e.event === 'done') as Ev & { downtimeMs: number; commitMs: number; pausedMs: number; relayed: { forward: number } };
  assert.ok(done, 'no done event');
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
  console.log(`  healthy A->B: ${(Number(done.ms) / 1000).toFixed(1)} s, paused ${done.pausedMs} ms (libvirt's downtime ${done.downtimeMs} ms, commit ${done.commitMs} ms)`);
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

test.run();
