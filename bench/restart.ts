// `npm run bench -- restart [--rounds 5]`: what a shim restart costs a guest. One tiny writer
// guest (one O_DIRECT+fsync 4 KiB record at a time) is live-attached through vmshiftd; each
// round does a `vmshift restart` and a kill -9 of the shim (vmshiftd restarts it), and
// measures the longest time without a new acknowledged record (the stall as the guest saw
// it, sampled every 10 ms) beside the daemon's own figures. The baseline is the longest gap
// over 200 records with nothing happening (TCG guest, so a few tens of ms).
import { join } from 'node:path';
import { readFileSync, writeFileSync } from 'node:fs';
import { cleanupAll, runStatus, startDaemon, tempDir, waitForSocket } from '../test/helpers/proc.ts';
import { bootGuest, ensureGuest, type Guest } from '../test/helpers/guest.ts';
import { isShimProcess, sleep } from '../src/daemon/processes.ts';
import type { RestartResult } from '../src/daemon/supervisor.ts';
import { table } from './lib.ts';

const root = new URL('..', import.meta.url).pathname;
const VMSHIFT = join(root, 'bin/vmshift');

function gapWatch(g: Guest): () => number {
  let last = g.lastSeq(), since = Date.now(), longest = 0;
  const t = setInterval(() => {
    const n = g.lastSeq();
    if (n !== last) {
      longest = Math.max(longest, Date.now() - since);
      last = n;
      since = Date.now();
    }
  }, 10);
  return () => {
    clearInterval(t);
    return longest;
  };
}

export async function main(args: string[]): Promise<void> {
  const i = args.indexOf('--rounds');
  const rounds = i >= 0 ? Number(args[i + 1]) : 5;
  await ensureGuest();
  const dir = tempDir('vbr-');
  const api = join(dir, 'api.sock'), stateDir = join(dir, 'state'), runDir = join(dir, 'run'), qmp = join(dir, 'q.sock'), src = join(dir, 's.raw');
  const env = { ...process.env, VMSHIFT_SOCKET: api, VMSHIFT_RUN_DIR: runDir };
  writeFileSync(src, Buffer.alloc(64 << 20, 0x5a));
  const d = startDaemon(join(root, 'bin/vmshiftd'), ['--socket', api, '--state-dir', stateDir, '--run-dir', runDir], { env });
  const pids = new Set<number>();
  const shim = () => JSON.parse(readFileSync(join(stateDir, 'vmshiftd.json'), 'utf8')).shims[0];
  try {
    await waitForSocket(api, d, 60_000);
    const g = bootGuest({ mode: 'writer', params: { blocks: 64 }, disk: { file: src }, qmpSocket: qmp });
    await g.waitFor(/^VMSHIFT-SEQ 20$/, 120_000);
    const a = await runStatus(VMSHIFT, ['attach', 'bench', '--qmp', qmp, '--daemon-socket', api], { env });
    if (a.code) throw new Error(a.stderr);
    pids.add(shim().pid);
    const more = async (n: number) => {
      const t = g.lastSeq() + n;
      await g.waitFor(new RegExp(`^VMSHIFT-SEQ ${t}$`), 60_000);
    };
    await more(50);
    let w = gapWatch(g);
    await more(200);
    const baseline = w();
    const rows: (string | number)[][] = [];
    for (let r = 1; r <= rounds; r++) {
      w = gapWatch(g);
      const res = JSON.parse((await runStatus(VMSHIFT, ['restart', 'bench-vd0', '--json', '--daemon-socket', api], { env })).stdout) as RestartResult;
      pids.add(res.pid);
      await more(40);
      rows.push([r, 'vmshift restart', w(), res.stallMs ?? '-', res.downMs, res.stopMs]);
      w = gapWatch(g);
      const old = shim().pid;
      process.kill(old, 'SIGKILL');
      while (shim().pid === old || !(await isShimProcess(shim().pid, shim().socket))) await sleep(20);
      pids.add(shim().pid);
      await more(40);
      rows.push([r, 'kill -9', w(), '-', '-', '-']);
    }
    const errors = g.lines().filter((l) => l.startsWith('VMSHIFT-ERROR'));
    process.stdout.write(`baseline: longest gap between records over 200 records: ${baseline} ms\n`);
    process.stdout.write(table(['round', 'event', 'guest stall ms', 'daemon stallMs', 'downMs', 'stopMs'], rows) + '\n');
    process.stdout.write(errors.length ? `guest errors: ${errors.join('; ')}\n` : 'guest errors: none\n');
    await g.stop();
  } finally {
    for (const p of pids) if (await isShimProcess(p, shim().socket)) process.kill(p, 'SIGKILL');
    await cleanupAll();
  }
}
