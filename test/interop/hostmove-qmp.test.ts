// `vmshift migrate --qmp ... --disk` between two hosts (namespaces A and B, sshd in B): a
// guest running the sequence writer on a shim over a thin local raw disk on A moves, disk and
// memory, to a QEMU on B. The disk goes first to a new thin file in B's datastore (served by
// a shim the peer starts), over NBD carried by the link, and holds a synchronized mirror
// until the memory phase ends; the carrying connection is reset (ss -K) during the copy.
// One guest boot on each side serves every check.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { join } from 'node:path';
import { existsSync, readdirSync, writeFileSync } from 'node:fs';
import { cleanupAll, onCleanup } from '../helpers/proc.ts';
import { bootGuest, verifyWriterLog, type Guest } from '../helpers/guest.ts';
import { linkState, resetConnections } from '../helpers/hosts.ts';
import { controlCall } from '../../src/control/client.ts';
import { allocated, migrate as migrateTo, MiB, qmpStatus, setupHostMove, sha, WRITER, type Event, type HostMove } from './hostmove-helpers.ts';

let m: HostMove;
const migrate = (extra: string[], during?: (e: Event) => void) => migrateTo(m, extra, during);

test.before(async () => {
  m = await setupHostMove();
});
test.after(cleanupAll);

test('a disk the peer may not create (outside its datastores): refused, nothing changed on either host', async () => {
  writeFileSync(join(m.hosts.dir, 'b-config.json'), JSON.stringify({ datastores: [join(m.hosts.dir, 'b-images')] }), { mode: 0o600 });
  const outside = join(m.hosts.dir, 'vm-b.raw');
  const r = await migrate(['--disk', `${m.shim.socket}=${outside}`, '--dest-socket', `${m.shim.socket}=${join(m.hosts.dir, 'b-images', 'vm.sock')}`]);
  assert.is(r.code, 1, JSON.stringify(r.events) + r.stderr);
  const err = r.events.find((e) => 'error' in e) as { error: { code: string; message: string } } | undefined;
  assert.is(err?.error.code, 'forbidden', JSON.stringify(r.events) + r.stderr);
  assert.match(err!.error.message, /datastore/);
  assert.not.ok(existsSync(outside), 'no file on B');
  assert.equal(readdirSync(join(m.hosts.dir, 'b-images')), [], 'nothing in B\'s datastore');
  assert.is(await qmpStatus(m.qmpA), 'running');
  const st = await controlCall<{ job: string | null; backing: string }>(`${m.shim.socket}.ctl`, 'status');
  assert.is(st.job, null);
  assert.is(st.backing, m.srcDisk);
});

test('disk and memory move to B; a reset mid-copy resumes without recopying; a 5 s cut of B during the synchronized mirror does not stall the guest; every acknowledged record is on B\'s thin file; A\'s file untouched after', async () => {
  const destPath = join(m.hosts.dir, 'b-images', 'vm.raw'), destSock = join(m.hosts.dir, 'b-images', 'vm.sock');
  let dest: Guest | null = null;
  let cut = false;
  // B's network down for 5 s once the disk is a synchronized mirror: the guest's writes are
  // answered by A alone after 2 s (the mirror degrades), and B catches up before the commit.
  let down: Promise<{ before: number; after: number }> | null = null;
  const r = await migrate(['--disk', `${m.shim.socket}=${destPath}`, '--dest-socket', `${m.shim.socket}=${destSock}`, '--bandwidth', '8M'], (e) => {
    if (e.event === 'disks-prepared') {
      for (const d of e.disks as Array<{ pid: number }>) onCleanup(() => { try { process.kill(d.pid, 'SIGTERM'); } catch { /* gone */ } });
      dest = bootGuest({ mode: 'writer', params: WRITER, disk: { nbdSocket: destSock, exportName: 'disk' }, qmpSocket: join(m.hosts.dir, 'qb.qmp'), extraArgs: ['-incoming', 'defer', '-S'] });
    }
    if (!cut && e.event === 'disk-progress' && (e.bytesCopied as number) > 4 * MiB) {
      cut = true;
      void resetConnections(m.hosts.a, m.hosts.b);
    }
    if (!down && e.event === 'disks-synchronized') {
      down = (async () => {
        const before = m.srcGuest.lastSeq();
        await linkState(m.hosts.b, false);
        try {
          await new Promise((res) => setTimeout(res, 5000));
          return { before, after: m.srcGuest.lastSeq() };
        } finally {
          await linkState(m.hosts.b, true);
        }
      })();
    }
  });
  const during = await (down as Promise<{ before: number; after: number }> | null);
  const summary = `${JSON.stringify(r.events.filter((e) => e.event !== 'progress' && e.event !== 'disk-progress'))}\n${r.stderr}`;
  assert.ok(cut, `the connection was reset during the copy: ${summary}`);
  assert.is(r.code, 0, summary);
  assert.ok(during, `B was cut during the synchronized mirror: ${summary}`);
  // The writer writes a record every 20 ms; waiting for the whole cut it would write one.
  assert.ok(during!.after - during!.before >= 20, `the guest kept writing while B was cut: records ${during!.before} -> ${during!.after}`);
  assert.ok(dest, 'the destination QEMU was started');
  const b = dest as unknown as Guest;
  assert.is(await qmpStatus(m.qmpA), 'postmigrate');
  assert.is(await qmpStatus(join(m.hosts.dir, 'qb.qmp')), 'running');
  // The source shim no longer serves the disk; the job reports what it sent.
  const st = await controlCall<{ stack: string[]; backing: string }>(`${m.shim.socket}.ctl`, 'status');
  assert.match(st.stack.at(-1)!, /^moved to root@/);
  const job = (await controlCall<{ job: { ok: boolean; bytesCopied: number; mirroredBytes: number; writes: { degradedWrites: number; p99Ms: number; maxMs: number } | null } }>(`${m.shim.socket}.ctl`, 'migrate.status')).job;
  assert.ok(job.ok, JSON.stringify(job));
  assert.ok((job.writes?.degradedWrites ?? 0) > 0, `writes answered by A alone during the cut: ${JSON.stringify(job.writes)}`);
  const moved = r.events.find((e) => e.event === 'disks-moved') as Event & { link: { reconnects: number; resentBytes: number } };
  assert.ok(moved.link.reconnects >= 1, `the disk link reconnected: ${JSON.stringify(moved.link)}`);
  const alloc = allocated(m.srcDisk);
  const sent = job.bytesCopied + moved.link.resentBytes;
  process.stderr.write(`hostmove: allocated ${alloc}, copied ${job.bytesCopied}, resent ${moved.link.resentBytes}, mirrored ${job.mirroredBytes}: ${(sent / alloc).toFixed(3)}x; guest writes p99 ${job.writes?.p99Ms} ms, max ${job.writes?.maxMs} ms, ${job.writes?.degradedWrites} answered by A alone; records during the 5 s cut ${during!.after - during!.before}\n`);
  assert.ok(sent <= 1.05 * alloc, `bytes sent ${sent} <= 1.05 x allocated ${alloc}`);
  const aHash = sha(m.srcDisk);
  // The writer goes on on B.
  const atSwitch = m.srcGuest.lastSeq();
  await b.waitFor(new RegExp(`^VMSHIFT-SEQ ${atSwitch + 30}$`), 120_000).catch((e) => {
    writeFileSync(join(m.hosts.dir, '..', `hostmove-b-console-${process.pid}.txt`), b.lines().join('\n'));
    throw e;
  });
  await b.stop();
  const last = b.lastSeq();
  assert.equal(verifyWriterLog(destPath, last, WRITER.blocks, { start: WRITER.start }), [], 'every acknowledged record is on B');
  assert.ok(allocated(destPath) <= alloc + 4 * MiB, `B's file stayed thin: ${allocated(destPath)} allocated, A has ${alloc}`);
  assert.is(sha(m.srcDisk), aHash, "A's file untouched after the move");
});

test.run();
