// `npm run demo`: the main job on an embedded default. Boots the tiny real guest on a disk
// served through a vmshift shim, lets it write a numbered sequence of records, moves the disk
// to a second directory while it keeps writing, and proves that every record the guest saw
// acknowledged is on the destination. Everything it starts is stopped by PID at the end.
import { join } from 'node:path';
import { writeFileSync, statSync } from 'node:fs';
import { spawn } from 'node:child_process';
import { bootGuest, ensureGuest, verifyWriterLog } from '../test/helpers/guest.ts';
import { tempDir, startDaemon, waitForSocket, run, cleanupAll } from '../test/helpers/proc.ts';

const root = new URL('..', import.meta.url).pathname;
const vmshift = join(root, 'bin/vmshift');
const MiB = 1024 * 1024;
const SLOTS = 2048; // the writer cycles over 8 MiB of 4 KiB slots
const say = (s: string) => process.stdout.write(`demo: ${s}\n`);

async function main(): Promise<void> {
  await ensureGuest();
  const dir = tempDir('vmshift-demo-');
  const source = join(dir, 'datastore-a.raw');
  const dest = join(dir, 'datastore-b.raw');
  writeFileSync(source, Buffer.alloc(0));
  await run('truncate', ['-s', String(64 * MiB), source]);
  const sock = join(dir, 'vm.sock');

  say(`serving ${source} through a shim on ${sock}`);
  const shim = startDaemon(vmshift, ['serve', source, '--socket', sock]);
  await waitForSocket(`${sock}.ctl`, shim);

  say('booting the tiny guest (TCG) with a continuous writer on its virtio disk');
  const guest = bootGuest({ disk: { nbdSocket: sock, exportName: 'disk' }, mode: 'writer', params: { blocks: SLOTS } });
  await guest.waitFor(/^VMSHIFT-SEQ 300$/, 120000);
  const status = JSON.parse((await run(vmshift, ['status', '--socket', sock, '--json'])).stdout);
  say(`guest has written ${guest.lastSeq()} records; the shim tracked ${status.tracking.dirtyBytes / 1024} KiB dirty in ${status.tracking.writes} writes`);
  for (const h of status.tracking.hot ?? []) say(`  hot region at ${h.offset / MiB} MiB: ${Math.round(h.writes)} writes`);

  say(`migrating the disk to ${dest} while the guest writes`);
  const before = guest.lastSeq();
  const result = await migrate(sock, dest);
  const atSwitch = guest.lastSeq();
  say(`switched over: mode ${result.mode ?? '?'}, ${result.passes ?? '?'} pass(es), ${fmtMiB(result.bytesCopied)} copied, I/O stall ${result.stallMs ?? '?'} ms; guest wrote records ${before}..${atSwitch} during the job`);

  await guest.waitFor(new RegExp(`^VMSHIFT-SEQ ${atSwitch + 300}$`), 120000);
  say(`the guest kept running on the destination: record ${guest.lastSeq()} written`);
  await guest.stop();
  const last = guest.lastSeq();
  await shim.stop();

  const bad = verifyWriterLog(dest, last, SLOTS);
  if (bad.length) throw new Error(`${bad.length} slot(s) wrong on the destination, first: ${JSON.stringify(bad[0])}`);
  const staleOnSource = verifyWriterLog(source, last, SLOTS).length;
  say(`verified: all ${Math.min(last, SLOTS)} slots on ${dest} hold the newest of the ${last} acknowledged records`);
  say(`(the old source misses ${staleOnSource} of them, as it should: writes after the switch-over went to the destination only)`);
  say(`destination is ${fmtMiB(statSync(dest).blocks * 512)} allocated of ${fmtMiB(statSync(dest).size)}: it stayed thin`);
  say('done');
}

function fmtMiB(n: number | string | undefined): string {
  return typeof n !== "number" ? "?" : `${(n / MiB).toFixed(1)} MiB`;
}

/** Runs `vmshift migrate-storage --json`, echoing progress, and returns the final result. */
function migrate(sock: string, dest: string): Promise<Record<string, number | string | undefined>> {
  return new Promise((resolve, reject) => {
    const p = spawn(vmshift, ['migrate-storage', '--socket', sock, '--to', dest, '--json'], { stdio: ['ignore', 'pipe', 'inherit'] });
    let out = '';
    let lastShown = 0;
    p.stdout.on('data', (b) => {
      out += b;
      const lines = out.split('\n');
      for (const l of lines.slice(lastShown, -1)) {
        try {
          const m = JSON.parse(l);
          if (m.event === 'phase' || m.event === 'pass') say(`  ${m.event}: ${JSON.stringify(m.data)}`);
        } catch { /* not JSON */ }
      }
      lastShown = lines.length - 1;
    });
    p.on('close', (code) => {
      const lines = out.trim().split('\n');
      let final: Record<string, unknown> = {};
      try { final = JSON.parse(lines[lines.length - 1] ?? '{}'); } catch { /* keep empty */ }
      if (code !== 0) return reject(new Error(`migrate-storage failed (exit ${code}): ${lines.slice(-3).join('\n')}`));
      resolve(flatten(final));
    });
  });
}

/** The result JSON's shape is the job's; pick the figures the demo prints wherever they are. */
function flatten(o: Record<string, unknown>, into: Record<string, number | string | undefined> = {}): Record<string, number | string | undefined> {
  for (const [k, v] of Object.entries(o)) {
    if (v && typeof v === 'object' && !Array.isArray(v)) flatten(v as Record<string, unknown>, into);
    else if (typeof v === 'number' || typeof v === 'string') into[k] ??= v;
  }
  return into;
}

main()
  .then(() => cleanupAll())
  .catch(async (e) => {
    process.stderr.write(`demo: FAILED: ${(e as Error).message}\n`);
    await cleanupAll();
    process.exit(1);
  });
