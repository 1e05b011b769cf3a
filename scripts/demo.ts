// `npm run demo`: the main job on an embedded default, end to end as an operator would run
// it. Starts vmshiftd (private state and run dirs), boots the tiny real guest on a plain raw
// file with a continuous writer, attaches a shim under its running disk, shows what the shim
// tracks, moves the disk to a second datastore while the guest writes, detaches the shim
// (the guest is left on the new file), and proves that every record the guest saw
// acknowledged is on the destination. Act 2 (scripts/demo-hostmove.ts) moves the whole running
// guest, local disk and memory, between two hosts (network namespaces): a connection reset
// during the disk copy, the network cut half-way through the memory for good; it completes
// through the shared file and every acknowledged write is on the new host's disk. Everything it starts is stopped by PID at the end.
import { join } from 'node:path';
import { mkdirSync, statSync } from 'node:fs';
import { spawn } from 'node:child_process';
import { bootGuest, ensureGuest, verifyWriterLog } from '../test/helpers/guest.ts';
import { tempDir, startDaemon, waitForSocket, run, cleanupAll, onCleanup } from '../test/helpers/proc.ts';
import { hostMoveAct } from './demo-hostmove.ts';

const root = new URL('..', import.meta.url).pathname;
const vmshift = join(root, 'bin/vmshift');
const MiB = 1024 * 1024;
const SLOTS = 2048; // the writer cycles over 8 MiB of 4 KiB slots
const say = (s: string) => process.stdout.write(`demo: ${s}\n`);

async function main(): Promise<void> {
  await ensureGuest();
  const t0 = performance.now();
  const dir = tempDir('vmshift-demo-');
  const dsA = join(dir, 'datastore-a');
  const dsB = join(dir, 'datastore-b');
  mkdirSync(dsA);
  mkdirSync(dsB);
  const source = join(dsA, 'vm1.raw');
  const dest = join(dsB, 'vm1.raw');
  await run('truncate', ['-s', String(64 * MiB), source]);
  const api = join(dir, 'vmshiftd.sock');
  const env = { ...process.env, VMSHIFT_SOCKET: api };
  const cli = async (...args: string[]) => (await run(vmshift, args, { env })).stdout;

  say('starting vmshiftd (state and sockets in a temp dir; it may serve disks in the two datastores only)');
  const daemon = startDaemon(join(root, 'bin/vmshiftd'), ['--socket', api, '--state-dir', join(dir, 'state'), '--run-dir', join(dir, 'run'), '--config', join(dir, 'no-config.json'), '--datastore', dsA, '--datastore', dsB]);
  await waitForSocket(api, daemon, 30000);
  // Shims are detached processes that outlive the daemon by design: stop any left on failure.
  onCleanup(async () => {
    const list = JSON.parse(await cli('list', '--json').catch(() => '[]')) as unknown;
    for (const s of (Array.isArray(list) ? list : (list as { shims?: unknown[] }).shims ?? []) as Array<{ pid?: number }>) {
      if (s.pid) try { process.kill(s.pid, 'SIGTERM'); } catch { /* gone */ }
    }
  });

  say(`booting the tiny guest (TCG) on ${source} with a continuous writer`);
  const qmp = join(dir, 'vm1.qmp');
  const guest = bootGuest({ disk: { file: source }, mode: 'writer', params: { blocks: SLOTS }, qmpSocket: qmp });
  await guest.waitFor(/^VMSHIFT-SEQ 100$/, 120000);

  say('attaching a shim under the running disk (blockdev-reopen onto an NBD node; the guest does not stop)');
  const attached = JSON.parse(await cli('attach', 'vm1', '--qmp', qmp, '--json')) as { disks: Array<{ disk: string; status: string; shim?: { name: string; socket: string } }> };
  const disk = attached.disks.find((d) => d.status === 'attached');
  if (!disk?.shim) throw new Error(`attach did not attach a disk: ${JSON.stringify(attached)}`);
  say(`  ${disk.disk} is now served by shim "${disk.shim.name}" on ${disk.shim.socket}`);
  const seqAtAttach = guest.lastSeq();
  await guest.waitFor(new RegExp(`^VMSHIFT-SEQ ${seqAtAttach + 200}$`), 120000);
  const st = JSON.parse(await cli('status', '--socket', disk.shim.socket, '--json'));
  say(`  the guest wrote ${guest.lastSeq() - seqAtAttach} more records through the shim; it tracked ${st.tracking.dirtyBytes / 1024} KiB dirty in ${st.tracking.writes} writes`);
  for (const h of st.tracking.hot ?? []) say(`  hot region at ${(h.offset / MiB).toFixed(0)} MiB: ${Math.round(h.writes)} writes`);

  say(`migrating the disk to ${dest} while the guest writes`);
  const before = guest.lastSeq();
  const result = await migrate(disk.shim.socket, dest, env);
  const atSwitch = guest.lastSeq();
  say(`  switched over: ${result.mode}${result.switchedToMirror ? ' (switched to mirroring)' : ''}, ${result.pass} pass(es), ${fmtMiB(result.bytesCopied)} copied, I/O stall ${Number(result.stallMs).toFixed(1)} ms; the guest wrote records ${before}..${atSwitch} meanwhile`);
  await guest.waitFor(new RegExp(`^VMSHIFT-SEQ ${atSwitch + 200}$`), 120000);

  say('detaching the shim: the guest goes back to a plain file node, now on datastore-b');
  const detached = await cli('detach', 'vm1', '--qmp', qmp);
  process.stdout.write(detached.trimEnd().replace(/^/gm, 'demo:   ') + '\n');
  const seqAtDetach = guest.lastSeq();
  await guest.waitFor(new RegExp(`^VMSHIFT-SEQ ${seqAtDetach + 200}$`), 120000);
  say(`the guest kept running throughout: record ${guest.lastSeq()} written`);
  await guest.stop();
  const last = guest.lastSeq();

  const bad = verifyWriterLog(dest, last, SLOTS);
  if (bad.length) throw new Error(`${bad.length} slot(s) wrong on the destination, first: ${JSON.stringify(bad[0])}`);
  say(`verified: all ${Math.min(last, SLOTS)} slots of ${dest} hold the newest of the ${last} records the guest saw acknowledged`);
  say(`  (the old source misses ${verifyWriterLog(source, last, SLOTS).length} of them, as it should: writes after the switch-over went to the destination only)`);
  say(`  the destination has ${fmtMiB(statSync(dest).blocks * 512)} allocated of ${fmtMiB(statSync(dest).size)}: it stayed thin`);
  await daemon.stop();
  say(`act 1 took ${((performance.now() - t0) / 1000).toFixed(1)} s`);
  const t1 = performance.now();
  await hostMoveAct(say);
  say(`act 2 took ${((performance.now() - t1) / 1000).toFixed(1)} s`);
  say('done');
}

function fmtMiB(n: unknown): string {
  return typeof n === 'number' ? `${(n / MiB).toFixed(1)} MiB` : '?';
}

/** Runs `vmshift migrate-storage --json`, echoing phases, and returns the job's result. */
function migrate(sock: string, dest: string, env: NodeJS.ProcessEnv): Promise<Record<string, unknown>> {
  return new Promise((resolve, reject) => {
    const p = spawn(vmshift, ['migrate-storage', '--socket', sock, '--to', dest, '--json'], { stdio: ['ignore', 'pipe', 'inherit'], env });
    let buf = '';
    let result: Record<string, unknown> | undefined;
    p.stdout.on('data', (b) => {
      buf += b;
      let nl: number;
      while ((nl = buf.indexOf('\n')) >= 0) {
        const line = buf.slice(0, nl);
        buf = buf.slice(nl + 1);
        try {
          const m = JSON.parse(line);
          if (m.event === 'phase') say(`  phase: ${m.data?.phase ?? JSON.stringify(m.data)}${m.data?.pass ? ` (pass ${m.data.pass})` : ''}`);
          if (m.result) result = m.result;
        } catch { /* not JSON */ }
      }
    });
    p.on('close', (code) => (code === 0 && result ? resolve(result) : reject(new Error(`migrate-storage failed (exit ${code})`))));
  });
}

// Ctrl-C or a kill: stop what the demo started (guests, daemons, namespaces) before leaving.
for (const sig of ['SIGINT', 'SIGTERM'] as const) {
  process.once(sig, () => {
    say(`interrupted (${sig}): cleaning up`);
    void cleanupAll().finally(() => process.exit(130));
  });
}

main()
  .then(() => cleanupAll())
  .catch(async (e) => {
    process.stderr.write(`demo: FAILED: ${(e as Error).message}\n`);
    await cleanupAll();
    process.exit(1);
  });
