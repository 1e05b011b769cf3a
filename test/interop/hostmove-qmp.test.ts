// `vmshift migrate --qmp ... --disk` between two hosts (namespaces A and B, sshd in B): a
// guest running the sequence writer on a shim over a thin local raw disk on A moves, disk and
// memory, to a QEMU on B. The disk goes first to a new thin file in B's datastore (served by
// a shim the peer starts), over NBD carried by the link, and holds a synchronized mirror
// until the memory phase ends; the carrying connection is reset (ss -K) during the copy.
// One guest boot on each side serves every check.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { join } from 'node:path';
import { createHash } from 'node:crypto';
import { existsSync, readdirSync, readFileSync, statSync, writeFileSync, mkdirSync } from 'node:fs';
import { cleanupAll, onCleanup, run } from '../helpers/proc.ts';
import { bootGuest, ensureGuest, verifyWriterLog, type Guest } from '../helpers/guest.ts';
import { jsonLinesInNs, resetConnections, startSshd, twoHosts, type Sshd, type TwoHosts } from '../helpers/hosts.ts';
import { controlCall } from '../../src/control/client.ts';
import { QmpClient } from '../../src/qemu/qmp.ts';
import { startShim, type ShimProc } from './migrate-helpers.ts';

const root = new URL('../..', import.meta.url).pathname;
const MiB = 1024 * 1024;
const SIZE = 64 * MiB;
const WRITER = { start: 256, blocks: 64, delay: 20 };
let hosts: TwoHosts;
let sshd: Sshd;
let shim: ShimProc;
let srcGuest: Guest;
let srcDisk: string;
const qmpA = () => join(hosts.dir, 'qa.qmp');

test.before(async () => {
  await ensureGuest();
  hosts = await twoHosts();
  sshd = await startSshd(hosts.b, hosts.dir);
  mkdirSync(join(hosts.dir, 'a'), { mode: 0o700 });
  mkdirSync(join(hosts.dir, 'b-images'), { mode: 0o700 });
  srcDisk = join(hosts.dir, 'a', 'vm.raw');
  // Thin: 64 MiB virtual, 16 MiB of data past the writer's slots, the rest holes.
  await run('qemu-img', ['create', '-q', '-f', 'raw', srcDisk, String(SIZE)]);
  await run('qemu-io', ['-f', 'raw', '-c', `write -P 0x5a ${8 * MiB} ${16 * MiB}`, srcDisk]);
  shim = await startShim(srcDisk, join(hosts.dir, 'a', 'vm.sock'));
  srcGuest = bootGuest({ mode: 'writer', params: WRITER, disk: { nbdSocket: shim.socket, exportName: 'disk' }, qmpSocket: qmpA() });
  await srcGuest.waitFor(/^VMSHIFT-SEQ 20$/, 120_000);
});
test.after(cleanupAll);

interface Event { event: string; [k: string]: unknown }

function migrate(extra: string[], during?: (e: Event) => void) {
  return jsonLinesInNs<Event>(hosts.a, join(root, 'bin/vmshift'), ['migrate', '--json', '--qmp', qmpA(), '--peer', `ssh://root@${hosts.b.addr}:${sshd.port}`,
    '--dest-qmp', join(hosts.dir, 'qb.qmp'), '--identity', sshd.identity, '--known-hosts', sshd.knownHosts, '--peer-vmshift', join(root, 'bin/vmshift'),
    '--peer-socket-dir', join(hosts.dir, 'agent'), '--hold-time', '20s', '--peer-config', join(hosts.dir, 'b-config.json'), ...extra], { cwd: root, during, timeoutMs: 240_000 });
}

const allocated = (path: string) => statSync(path).blocks * 512;
const sha = (path: string) => createHash('sha256').update(readFileSync(path)).digest('hex');
async function qmpStatus(path: string): Promise<string> {
  const q = await QmpClient.connect(path);
  try { return (await q.execute<{ status: string }>('query-status')).status; } finally { await q.close(); }
}

test('a disk the peer may not create (outside its datastores): refused, nothing changed on either host', async () => {
  writeFileSync(join(hosts.dir, 'b-config.json'), JSON.stringify({ datastores: [join(hosts.dir, 'b-images')] }), { mode: 0o600 });
  const outside = join(hosts.dir, 'vm-b.raw');
  const r = await migrate(['--disk', `${shim.socket}=${outside}`, '--dest-socket', `${shim.socket}=${join(hosts.dir, 'b-images', 'vm.sock')}`]);
  assert.is(r.code, 1, JSON.stringify(r.events) + r.stderr);
  const err = r.events.find((e) => 'error' in e) as { error: { code: string; message: string } } | undefined;
  assert.is(err?.error.code, 'forbidden', JSON.stringify(r.events) + r.stderr);
  assert.match(err!.error.message, /datastore/);
  assert.not.ok(existsSync(outside), 'no file on B');
  assert.equal(readdirSync(join(hosts.dir, 'b-images')), [], 'nothing in B\'s datastore');
  assert.is(await qmpStatus(qmpA()), 'running');
  const st = await controlCall<{ job: string | null; backing: string }>(`${shim.socket}.ctl`, 'status');
  assert.is(st.job, null);
  assert.is(st.backing, srcDisk);
});

test('disk and memory move to B; a reset mid-copy resumes without recopying; every acknowledged record is on B\'s thin file; A\'s file untouched after', async () => {
  const destPath = join(hosts.dir, 'b-images', 'vm.raw'), destSock = join(hosts.dir, 'b-images', 'vm.sock');
  let dest: Guest | null = null;
  let cut = false;
  const r = await migrate(['--disk', `${shim.socket}=${destPath}`, '--dest-socket', `${shim.socket}=${destSock}`, '--bandwidth', '8M'], (e) => {
    if (e.event === 'disks-prepared') {
      for (const d of e.disks as Array<{ pid: number }>) onCleanup(() => { try { process.kill(d.pid, 'SIGTERM'); } catch { /* gone */ } });
      dest = bootGuest({ mode: 'writer', params: WRITER, disk: { nbdSocket: destSock, exportName: 'disk' }, qmpSocket: join(hosts.dir, 'qb.qmp'), extraArgs: ['-incoming', 'defer', '-S'] });
    }
    if (!cut && e.event === 'disk-progress' && (e.bytesCopied as number) > 4 * MiB) {
      cut = true;
      void resetConnections(hosts.a, hosts.b);
    }
  });
  const summary = `${JSON.stringify(r.events.filter((e) => e.event !== 'progress' && e.event !== 'disk-progress'))}\n${r.stderr}`;
  assert.ok(cut, `the connection was reset during the copy: ${summary}`);
  assert.is(r.code, 0, summary);
  assert.ok(dest, 'the destination QEMU was started');
  const b = dest as unknown as Guest;
  assert.is(await qmpStatus(qmpA()), 'postmigrate');
  assert.is(await qmpStatus(join(hosts.dir, 'qb.qmp')), 'running');
  // The source shim no longer serves the disk; the job reports what it sent.
  const st = await controlCall<{ stack: string[]; backing: string }>(`${shim.socket}.ctl`, 'status');
  assert.match(st.stack.at(-1)!, /^moved to root@/);
  const job = (await controlCall<{ job: { ok: boolean; bytesCopied: number; mirroredBytes: number } }>(`${shim.socket}.ctl`, 'migrate.status')).job;
  assert.ok(job.ok, JSON.stringify(job));
  const moved = r.events.find((e) => e.event === 'disks-moved') as Event & { link: { reconnects: number; resentBytes: number } };
  assert.ok(moved.link.reconnects >= 1, `the disk link reconnected: ${JSON.stringify(moved.link)}`);
  const alloc = allocated(srcDisk);
  const sent = job.bytesCopied + moved.link.resentBytes;
  process.stderr.write(`hostmove: allocated ${alloc}, copied ${job.bytesCopied}, resent ${moved.link.resentBytes}, mirrored ${job.mirroredBytes}: ${(sent / alloc).toFixed(3)}x\n`);
  assert.ok(sent <= 1.05 * alloc, `bytes sent ${sent} <= 1.05 x allocated ${alloc}`);
  const aHash = sha(srcDisk);
  // The writer goes on on B.
  const atSwitch = srcGuest.lastSeq();
  await b.waitFor(new RegExp(`^VMSHIFT-SEQ ${atSwitch + 30}$`), 120_000).catch((e) => {
    writeFileSync(join(hosts.dir, '..', `hostmove-b-console-${process.pid}.txt`), b.lines().join('\n'));
    throw e;
  });
  await b.stop();
  const last = b.lastSeq();
  assert.equal(verifyWriterLog(destPath, last, WRITER.blocks, { start: WRITER.start }), [], 'every acknowledged record is on B');
  assert.ok(allocated(destPath) <= alloc + 4 * MiB, `B's file stayed thin: ${allocated(destPath)} allocated, A has ${alloc}`);
  assert.is(sha(srcDisk), aHash, "A's file untouched after the move");
});

test.run();
