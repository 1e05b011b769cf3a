// The demo's second act: a whole running guest, its local disk and its memory, moved from
// host A to host B (two network namespaces joined by a veth pair, sshd in B, a directory
// both mount as shared storage) by `vmshift migrate --qmp ... --disk ... --shared-dir`:
//   - the disk (a thin raw file on A, under a shim) goes first, to a new thin file on B, over
//     NBD carried by the link; the carrying connection is reset (ss -K) during the copy, and
//     the copy resumes where it was instead of from zero;
//   - then the memory; half-way the network is cut for good, and the move completes through
//     the shared file (the disk's synchronized mirror and the commit too);
//   - the guest's writer goes on on B, and every record it saw acknowledged is on B's disk.
// Everything it starts (namespaces, sshd, QEMUs, shims, link agents) is stopped or removed on
// every exit path by the caller's cleanupAll().
import { join } from 'node:path';
import { mkdirSync, readdirSync, statSync, writeFileSync } from 'node:fs';
import { bootGuest, verifyWriterLog, type Guest } from '../test/helpers/guest.ts';
import { onCleanup, run, waitForSocket } from '../test/helpers/proc.ts';
import { jsonLinesInNs, linkState, resetConnections, startSshd, twoHosts } from '../test/helpers/hosts.ts';
import { startShim } from '../test/interop/migrate-helpers.ts';

const root = new URL('..', import.meta.url).pathname;
const vmshift = join(root, 'bin/vmshift');
const MiB = 1024 * 1024;
const SIZE = 64 * MiB;
const WRITER = { start: 256, blocks: 64, delay: 20 };
/** The guest's 256 MiB are mostly zero pages, which QEMU sends as a few bytes each: about 100 MiB go, so half-way is ~40 MiB. */
const CUT_AT = 40 * MiB;

interface Event { event: string; [k: string]: unknown }
const mib = (n: number) => `${(n / MiB).toFixed(1)} MiB`;

export async function hostMoveAct(say: (s: string) => void): Promise<void> {
  say('act 2: moving a whole running guest (local disk and memory) to another host');
  const hosts = await twoHosts();
  const sshd = await startSshd(hosts.b, hosts.dir);
  say(`  host A = namespace ${hosts.a.ns} (${hosts.a.addr}), host B = ${hosts.b.ns} (${hosts.b.addr}, sshd on port ${sshd.port}); shared directory ${hosts.shared}`);
  const aDir = join(hosts.dir, 'a-images'), bDir = join(hosts.dir, 'b-images');
  mkdirSync(aDir, { mode: 0o700 });
  mkdirSync(bDir, { mode: 0o700 });
  // B's datastore: the only place its link agent may create disks.
  const peerConfig = join(hosts.dir, 'b-config.json');
  writeFileSync(peerConfig, JSON.stringify({ datastores: [bDir] }), { mode: 0o600 });
  const srcDisk = join(aDir, 'vm.raw');
  await run('qemu-img', ['create', '-q', '-f', 'raw', srcDisk, String(SIZE)]);
  await run('qemu-io', ['-f', 'raw', '-c', `write -P 0x5a ${8 * MiB} ${16 * MiB}`, srcDisk]);
  const shim = await startShim(srcDisk, join(aDir, 'vm.sock'));
  const qmpA = join(hosts.dir, 'qa.qmp'), qmpB = join(hosts.dir, 'qb.qmp');
  const src = bootGuest({ mode: 'writer', params: WRITER, disk: { nbdSocket: shim.socket, exportName: 'disk' }, qmpSocket: qmpA });
  await src.waitFor(/^VMSHIFT-SEQ 20$/, 120_000);
  say(`  the guest runs on A on a thin ${mib(SIZE)} disk (${mib(statSync(srcDisk).blocks * 512)} allocated) served by a shim, writing a numbered record every ${WRITER.delay} ms; it is at record ${src.lastSeq()}`);

  const destPath = join(bDir, 'vm.raw'), destSock = join(bDir, 'vm.sock');
  let dest: Guest | null = null;
  let reset = false, cut = false;
  const r = await jsonLinesInNs<Event>(hosts.a, vmshift, ['migrate', '--json', '--qmp', qmpA, '--peer', `ssh://root@${hosts.b.addr}:${sshd.port}`,
    '--dest-qmp', qmpB, '--identity', sshd.identity, '--known-hosts', sshd.knownHosts, '--shared-dir', hosts.shared,
    '--disk', `${shim.socket}=${destPath}`, '--dest-socket', `${shim.socket}=${destSock}`, '--bandwidth', '16M',
    '--peer-vmshift', vmshift, '--peer-socket-dir', join(hosts.dir, 'agent'), '--peer-config', peerConfig], {
    cwd: root, timeoutMs: 240_000,
    during: (e) => {
      if (e.event === 'disks-prepared') {
        const d = (e.disks as Array<{ path: string; socket: string; pid: number }>)[0]!;
        onCleanup(() => { try { process.kill(d.pid, 'SIGTERM'); } catch { /* gone */ } });
        say(`  B created ${d.path} (thin) and serves it on ${d.socket}; B's QEMU starts on it and waits (-incoming defer -S)`);
        dest = bootGuest({ mode: 'writer', params: WRITER, disk: { nbdSocket: destSock, exportName: 'disk' }, qmpSocket: qmpB, extraArgs: ['-incoming', 'defer', '-S'] });
        void waitForSocket(qmpB, dest.daemon).catch(() => {});
      } else if (e.event === 'disk-progress' && !reset && (e.bytesCopied as number) > 4 * MiB) {
        reset = true;
        say(`  disk copy at ${mib(e.bytesCopied as number)}: resetting the carrying connection (ss -K)`);
        void resetConnections(hosts.a, hosts.b);
      } else if (e.event === 'disks-synchronized') say('  the disk is a synchronized mirror: every guest write is acknowledged once both hosts have it; moving memory');
      else if (e.event === 'progress' && !cut && (e.transferred as number) > CUT_AT) {
        cut = true;
        say(`  memory at ${mib(e.transferred as number)} sent: cutting the network (B's link down, for good)`);
        void linkState(hosts.b, false);
      } else if (e.event === 'carrier') say(`  link ${e.state}: ${e.why}`);
      else if (e.event === 'warning') say(`  warning: ${e.message}`);
      else if (e.event === 'committed') say('  the source is in postmigrate: the commit record went to B (through the shared file)');
    },
  });
  const trail = () => `${JSON.stringify(r.events.filter((e) => e.event !== 'progress' && e.event !== 'disk-progress')).slice(-2000)}\n${r.stderr.slice(-1500)}`;
  if (r.code !== 0) throw new Error(`vmshift migrate failed (exit ${r.code}): ${trail()}`);
  if (!reset || !cut) throw new Error(`the move finished before both faults could be made (reset ${reset}, cut ${cut}): ${trail()}`);
  if (!dest) throw new Error('B\'s QEMU was never started');
  const b: Guest = dest;
  const done = r.events.find((e) => e.event === 'done') as Event & { ms: number; downtimeMs: number; link: { spilledBytes: number } };
  const moved = r.events.find((e) => e.event === 'disks-moved') as Event & { link: { reconnects: number; resentBytes: number } };
  const job = r.events.filter((e) => e.event === 'disk-progress').at(-1) as Event & { bytesCopied: number; mirroredBytes: number } | undefined;
  say(`  done in ${(done.ms / 1000).toFixed(1)} s, downtime ${done.downtimeMs} ms; ${mib(done.link.spilledBytes)} of memory went through the shared file (the network never came back)`);
  say(`  the disk: ${mib(job?.bytesCopied ?? 0)} copied for ${mib(statSync(srcDisk).blocks * 512)} allocated, ${mib(moved.link.resentBytes)} resent after ${moved.link.reconnects} reconnect(s): the copy resumed, it did not start over`);

  const atSwitch = src.lastSeq();
  await b.waitFor(new RegExp(`^VMSHIFT-SEQ ${atSwitch + 50}$`), 120_000);
  say(`  the guest's writer: record ${atSwitch} last on A, then on to ${b.lastSeq()} on B, on B's disk`);
  await b.stop();
  await src.stop();
  const last = b.lastSeq();
  const bad = verifyWriterLog(destPath, last, WRITER.blocks, { start: WRITER.start });
  if (bad.length) throw new Error(`${bad.length} slot(s) wrong on B's disk, first: ${JSON.stringify(bad[0])}`);
  say(`verified: every slot of B's ${destPath} holds the newest of the ${last} records the guest saw acknowledged; it has ${mib(statSync(destPath).blocks * 512)} allocated (thin)`);
  say(`  A's file is left as it was at the switch-over; the shared directory is empty again: ${JSON.stringify(readdirSync(hosts.shared))}`);
}
