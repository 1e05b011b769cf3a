// Shared by the host-move tests of the QMP path (`vmshift migrate --qmp ... --disk`): two hosts
// (namespaces A and B, sshd in B), a guest running the sequence writer on a shim over a thin
// local raw disk on A, and the CLI run inside A.
import { join } from 'node:path';
import { createHash } from 'node:crypto';
import { readFileSync, statSync, mkdirSync } from 'node:fs';
import { run } from '../helpers/proc.ts';
import { bootGuest, ensureGuest, type Guest } from '../helpers/guest.ts';
import { jsonLinesInNs, startSshd, twoHosts, type Sshd, type TwoHosts } from '../helpers/hosts.ts';
import { QmpClient } from '../../src/qemu/qmp.ts';
import { startShim, type ShimProc } from './migrate-helpers.ts';

export const root = new URL('../..', import.meta.url).pathname;
export const MiB = 1024 * 1024;
export const SIZE = 64 * MiB;
export const WRITER = { start: 256, blocks: 64, delay: 20 };

export interface HostMove {
  hosts: TwoHosts;
  sshd: Sshd;
  shim: ShimProc;
  srcGuest: Guest;
  srcDisk: string;
  qmpA: string;
}

export interface Event { event: string; [k: string]: unknown }

/** Both hosts, and the writer guest on A (its disk: 64 MiB virtual, 16 MiB of data past the writer's slots, the rest holes). */
export async function setupHostMove(opts: { reconnectDelay?: number } = {}): Promise<HostMove> {
  await ensureGuest();
  const hosts = await twoHosts();
  const sshd = await startSshd(hosts.b, hosts.dir);
  mkdirSync(join(hosts.dir, 'a'), { mode: 0o700 });
  mkdirSync(join(hosts.dir, 'b-images'), { mode: 0o700 });
  const srcDisk = join(hosts.dir, 'a', 'vm.raw');
  await run('qemu-img', ['create', '-q', '-f', 'raw', srcDisk, String(SIZE)]);
  await run('qemu-io', ['-f', 'raw', '-c', `write -P 0x5a ${8 * MiB} ${16 * MiB}`, srcDisk]);
  const shim = await startShim(srcDisk, join(hosts.dir, 'a', 'vm.sock'));
  const qmpA = join(hosts.dir, 'qa.qmp');
  const srcGuest = bootGuest({ mode: 'writer', params: WRITER, disk: { nbdSocket: shim.socket, exportName: 'disk', reconnectDelay: opts.reconnectDelay }, qmpSocket: qmpA });
  await srcGuest.waitFor(/^VMSHIFT-SEQ 20$/, 120_000);
  return { hosts, sshd, shim, srcGuest, srcDisk, qmpA };
}

/** `vmshift migrate --json --qmp ...` to B, run inside A; `during` sees each JSON line, `onSpawn` gets the CLI's pid (ip netns exec and bin/vmshift exec it). */
export function migrate(m: HostMove, extra: string[], during?: (e: Event) => void, onSpawn?: (pid: number) => void) {
  const { hosts, sshd } = m;
  return jsonLinesInNs<Event>(hosts.a, join(root, 'bin/vmshift'), ['migrate', '--json', '--qmp', m.qmpA, '--peer', `ssh://root@${hosts.b.addr}:${sshd.port}`,
    '--dest-qmp', join(hosts.dir, 'qb.qmp'), '--identity', sshd.identity, '--known-hosts', sshd.knownHosts, '--peer-vmshift', join(root, 'bin/vmshift'),
    '--peer-socket-dir', join(hosts.dir, 'agent'), '--hold-time', '20s', '--peer-config', join(hosts.dir, 'b-config.json'), ...extra], { cwd: root, during, onSpawn, timeoutMs: 240_000 });
}

export const allocated = (path: string) => statSync(path).blocks * 512;
export const sha = (path: string) => createHash('sha256').update(readFileSync(path)).digest('hex');

export async function qmpStatus(path: string): Promise<string> {
  const q = await QmpClient.connect(path);
  try { return (await q.execute<{ status: string }>('query-status')).status; } finally { await q.close(); }
}
