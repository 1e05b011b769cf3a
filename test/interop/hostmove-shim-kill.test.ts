// `vmshift migrate --qmp ... --disk`: the source shim is killed (SIGKILL) in the middle of the
// disk copy and started again the way vmshiftd restarts it (the same command: socket, state
// file). The guest's NBD client holds its requests (reconnect-delay); the mover notices the
// shim went away and came back and has it resume the job from the state it persisted, against
// the peer's shim that kept running on B: the move completes, every acknowledged record is on
// B's disk, and what was copied again is at most what the last persist interval held.
// The mover is held (SIGSTOP) from the kill until the guest has written through the restarted
// shim, and the test writes a block of its own there too: writes served between the restart
// and the resume reach B only through the restarted shim's own tracker.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { join } from 'node:path';
import { existsSync, readFileSync, writeFileSync } from 'node:fs';
import { cleanupAll, onCleanup, run } from '../helpers/proc.ts';
import { bootGuest, verifyWriterLog, type Guest } from '../helpers/guest.ts';
import { controlCall } from '../../src/control/client.ts';
import { startShim } from './migrate-helpers.ts';
import { allocated, migrate, MiB, qmpStatus, setupHostMove, sha, WRITER, type Event, type HostMove } from './hostmove-helpers.ts';

let m: HostMove;
const BANDWIDTH = 4 * MiB;

test.before(async () => {
  m = await setupHostMove({ reconnectDelay: 30 });
  writeFileSync(join(m.hosts.dir, 'b-config.json'), JSON.stringify({ datastores: [join(m.hosts.dir, 'b-images')] }), { mode: 0o600 });
});
test.after(cleanupAll);

test('the source shim killed mid-copy and restarted: the move resumes from its persisted state, every acknowledged record is on B, little is copied again', async () => {
  const destPath = join(m.hosts.dir, 'b-images', 'vm.raw'), destSock = join(m.hosts.dir, 'b-images', 'vm.sock');
  const resumeFile = `${m.shim.socket}.state.json.resume.json`;
  let dest: Guest | null = null;
  let restarted: Promise<unknown> | null = null;
  let persistedAtKill = false;
  let cli = 0;
  const MARK = { offset: 4 * MiB, length: 64 * 1024, byte: 0xa5 };
  const r = await migrate(m, ['--disk', `${m.shim.socket}=${destPath}`, '--dest-socket', `${m.shim.socket}=${destSock}`, '--bandwidth', String(BANDWIDTH)], (e: Event) => {
    if (e.event === 'disks-prepared') {
      for (const d of e.disks as Array<{ pid: number }>) onCleanup(() => { try { process.kill(d.pid, 'SIGTERM'); } catch { /* gone */ } });
      dest = bootGuest({ mode: 'writer', params: WRITER, disk: { nbdSocket: destSock, exportName: 'disk' }, qmpSocket: join(m.hosts.dir, 'qb.qmp'), extraArgs: ['-incoming', 'defer', '-S'] });
    }
    if (!restarted && e.event === 'disk-progress' && e.phase === 'mirror' && (e.dataBytes as number) > 8 * MiB) {
      persistedAtKill = existsSync(resumeFile);
      restarted = (async () => {
        process.kill(cli, 'SIGSTOP');
        try {
          process.kill(m.shim.daemon.pid, 'SIGKILL');
          await m.shim.daemon.exited;
          // As vmshiftd would: the same command again, a moment later.
          await new Promise((res) => setTimeout(res, 500));
          const s = await startShim(m.srcDisk, m.shim.socket);
          // Writes before the resume: the guest's (it reconnects within its delay) and ours,
          // in a hole below where the job will resume.
          const seq = m.srcGuest.lastSeq();
          await m.srcGuest.waitFor(new RegExp(`^VMSHIFT-SEQ ${seq + 5}$`), 60_000);
          await run('qemu-io', ['-f', 'raw', '-c', `write -P ${MARK.byte} ${MARK.offset} ${MARK.length}`, `nbd+unix:///disk?socket=${m.shim.socket}`]);
          return s;
        } finally {
          process.kill(cli, 'SIGCONT');
        }
      })();
    }
  }, (pid) => { cli = pid; });
  const summary = `${JSON.stringify(r.events.filter((e) => e.event !== 'progress' && e.event !== 'disk-progress'))}\n${r.stderr}`;
  assert.ok(restarted, `the shim was killed during the copy: ${summary}`);
  await restarted;
  assert.is(r.code, 0, summary);
  assert.ok(persistedAtKill, 'the job had persisted its state before the kill');
  const lost = r.events.find((e) => e.event === 'disk-shim-lost') as Event & { lastBytesCopied: number; lastCursor: number } | undefined;
  const resumed = r.events.find((e) => e.event === 'disk-resumed') as Event & { resumedFrom: number; copiedEverything: boolean; dataBytesBefore: number; restartBytes: number; recopyBound: number } | undefined;
  assert.ok(lost && resumed, `the mover saw the shim go and resumed the job: ${summary}`);
  assert.is(resumed!.copiedEverything, false, summary);
  assert.ok(resumed!.restartBytes >= MARK.length, `the writes served before the resume were copied again: ${resumed!.restartBytes} bytes`);
  assert.ok(resumed!.resumedFrom > MARK.offset && resumed!.resumedFrom <= lost!.lastCursor, `resumed from ${resumed!.resumedFrom}, the old job had reached ${lost!.lastCursor}`);
  assert.ok(resumed!.recopyBound <= 3 * BANDWIDTH, `copied again at most what ~1 s of copying holds: ${resumed!.recopyBound}`);
  assert.is(await qmpStatus(m.qmpA), 'postmigrate');
  const b = dest as unknown as Guest;
  assert.is(await qmpStatus(join(m.hosts.dir, 'qb.qmp')), 'running');
  // The resumed job (in the restarted shim) reports where it resumed from.
  const job = (await controlCall<{ job: { ok: boolean; dataBytes: number; bytesCopied: number; resume: { resumedFrom: number } | null } }>(`${m.shim.socket}.ctl`, 'migrate.status')).job;
  assert.ok(job.ok, JSON.stringify(job));
  assert.is(job.resume?.resumedFrom, resumed!.resumedFrom);
  assert.not.ok(existsSync(resumeFile), 'the resume state is gone once the job ended');
  const alloc = allocated(m.srcDisk);
  // Copied in all: what the old job had copied at its last persist, plus the new job's data
  // (which holds what the old one copied after that persist again).
  const total = resumed!.dataBytesBefore + job.dataBytes;
  process.stderr.write(`hostmove shim kill: allocated ${alloc}, resumed from ${resumed!.resumedFrom} (old job at ${lost!.lastCursor}), before ${resumed!.dataBytesBefore} + after ${job.dataBytes} data bytes (${job.bytesCopied - job.dataBytes} zeroes), copied again <= ${resumed!.recopyBound}, restart writes ${resumed!.restartBytes}: ${(total / alloc).toFixed(3)}x\n`);
  assert.ok(total <= 1.05 * alloc, `bytes copied ${total} <= 1.05 x allocated ${alloc}`);
  assert.ok(job.dataBytes + lost!.lastBytesCopied <= 1.05 * alloc + resumed!.recopyBound + BANDWIDTH, 'what both jobs sent');
  const aHash = sha(m.srcDisk);
  const atSwitch = m.srcGuest.lastSeq();
  assert.not.ok(m.srcGuest.lines().some((l) => /VMSHIFT-ERROR|I\/O error/.test(l)), `the guest saw no I/O error: ${m.srcGuest.lines().filter((l) => /ERROR|error/.test(l)).join('\n')}`);
  await b.waitFor(new RegExp(`^VMSHIFT-SEQ ${atSwitch + 30}$`), 120_000);
  await b.stop();
  assert.equal(verifyWriterLog(destPath, b.lastSeq(), WRITER.blocks, { start: WRITER.start }), [], 'every acknowledged record is on B');
  const onB = readFileSync(destPath).subarray(MARK.offset, MARK.offset + MARK.length);
  assert.ok(onB.every((x) => x === MARK.byte), 'the block written between the restart and the resume is on B');
  assert.ok(allocated(destPath) <= alloc + 4 * MiB, `B's file stayed thin: ${allocated(destPath)} allocated, A has ${alloc}`);
  assert.is(sha(m.srcDisk), aHash, "A's file untouched after the move");
});

test.run();
