// `npm run bench -- host --local-disks [--rounds 1] [--bandwidth 20] [--no-reset] [--systems libvirt,vmshift]`:
// a running guest with a thin local raw disk (256 MiB virtual, 64 MiB of data, the sequence
// writer, 128 MiB RAM) moved from host A to host B (test/helpers/libvirt-hosts.ts) by
//   libvirt: `virsh migrate --live --copy-storage-all` (libvirt's NBD server on B and QEMU's
//            drive-mirror; B's file pre-created at the same path, as libvirt wants it), its own
//            qemu+ssh connection and a tcp:// stream;
//   vmshift: `vmshift migrate DOMAIN URI --to-dir` of the same guest enabled with vmshift (its
//            disk behind a shim of A's vmshiftd: the local-disk handover over the link).
// Interleaved in one run: each move starts the guest afresh on A from the same disk contents,
// healthy and with the carrying connection reset (`ss -K`) once 8 MiB crossed (mid disk copy).
// Per move: total time, libvirt's downtime, the writer's pause (the longest time without a
// new record, sampled every 10 ms from its console, over the move), the writer's record
// interval p99 during the move (the writer writes a record, waits 10 ms, prints it: its
// write latency plus that 10 ms, at the 10 ms of the sampling), bytes over the veth, and for
// vmshift the disk bytes it sent (copied + resent by the link) against the allocated size.
import { join } from 'node:path';
import { mkdirSync, rmSync, statSync } from 'node:fs';
import { cleanupAll, run } from '../test/helpers/proc.ts';
import { ensureGuest } from '../test/helpers/guest.ts';
import { resetConnections } from '../test/helpers/hosts.ts';
import { VMSHIFT, domState, libvirtHosts, startVmshiftd, type LibvirtTestHost } from '../test/helpers/libvirt-hosts.ts';
import { writerDomainXml } from '../test/e2e/libvirt-host.ts';
import { enableDomain } from '../src/libvirt/enable.ts';
import { parseJobInfo } from '../src/libvirt/migrate-domain.ts';
import { runIn, seqOf, sshWrap, txBytes } from './host.ts';
import { table } from './lib.ts';

const MiB = 1024 * 1024;
/** The images directory as each host sees it (a private bind mount per host): the same path, two files. */
const IMAGES = '/var/lib/libvirt/images';

interface Row { system: string; reset: boolean; ok: boolean; s: number; downtimeMs: number | null; pausedMs: number | null; gapMs: number; p99Ms: number; netMiB: number; diskX: string; note: string }

const pct = (xs: number[], p: number) => { const s = [...xs].sort((a, b) => a - b); return s.length ? s[Math.min(s.length - 1, Math.floor((p / 100) * s.length))]! : 0; };
const hostPath = (h: LibvirtTestHost, p: string) => join(h.dir, 'lib', p.slice('/var/lib/libvirt/'.length));

export async function main(args: string[]): Promise<void> {
  const opt = (n: string, d: string) => { const i = args.indexOf(n); return i >= 0 ? args[i + 1]! : d; };
  const rounds = Number(opt('--rounds', '1'));
  const bandwidth = Number(opt('--bandwidth', '20'));
  const withReset = !args.includes('--no-reset');
  const only = opt('--systems', '').split(',').filter(Boolean);
  await ensureGuest();
  const hosts = await libvirtHosts();
  const { a, b } = hosts;
  for (const h of [a, b]) mkdirSync(hostPath(h, IMAGES), { recursive: true, mode: 0o700 });
  const [, vmB] = await Promise.all([startVmshiftd(a, IMAGES), startVmshiftd(b, IMAGES)]);
  const seed = join(hosts.shared, 'seed.raw');
  await run('qemu-img', ['create', '-q', '-f', 'raw', seed, String(256 * MiB)]);
  await run('qemu-io', ['-f', 'raw', '-c', `write -P 0x5a ${8 * MiB} ${64 * MiB}`, seed]);

  const systems: Record<string, { name: string; argv: () => [string, string[]]; enable: boolean }> = {
    libvirt: { name: 'bhl-libvirt', enable: false, argv: () => a.argv('virsh', ['migrate', '--live', '--copy-storage-all', '--persistent', '--undefinesource', '--bandwidth', String(bandwidth), 'bhl-libvirt', sshWrap(b), '--migrateuri', `tcp://${b.addr}`, '--listen-address', b.addr]) },
    vmshift: { name: 'bhl-vmshift', enable: true, argv: () => a.argv(VMSHIFT, ['migrate', 'bhl-vmshift', b.sshUri, '--json', '--to-dir', IMAGES, '--peer-config', vmB.config, '--peer-hook-config', vmB.hookConfig, '--bandwidth', `${bandwidth}M`, '--peer-vmshift', VMSHIFT]) },
  };
  for (const k of Object.keys(systems)) if (only.length && !only.includes(k)) delete systems[k];
  const rows: Row[] = [];
  try {
    for (let round = 0; round < rounds; round++) {
      for (const reset of withReset ? [false, true] : [false]) {
        for (const [system, sys] of Object.entries(systems)) {
          const disk = `${IMAGES}/${sys.name}.raw`;
          const consolePath = join(hosts.shared, `${sys.name}-${round}-${reset ? 'r' : 'h'}.log`);
          // The same start for every move: A's file from the seed (thin), nothing on B.
          rmSync(hostPath(b, disk), { force: true });
          await run('cp', ['--sparse=always', seed, hostPath(a, disk)]);
          if (!sys.enable) await run('qemu-img', ['create', '-q', '-f', 'raw', hostPath(b, disk), String(256 * MiB)]);
          await a.virsh.define(writerDomainXml(sys.name, disk, consolePath, 64, 128));
          if (sys.enable) await enableDomain(a.virsh, sys.name, { disks: ['vda'], runDir: '/run/vmshift' });
          await a.virsh.start(sys.name);
          for (let i = 0; seqOf(consolePath) < 20; i++) { if (i > 1200) throw new Error('the guest did not start writing'); await new Promise((r) => setTimeout(r, 100)); }
          const alloc = statSync(hostPath(a, disk)).blocks * 512;

          const tx0 = (await txBytes(a)) + (await txBytes(b));
          let last = seqOf(consolePath), since = Date.now(), gap = 0, didReset = false;
          const intervals: number[] = [];
          const watch = setInterval(() => {
            const n = seqOf(consolePath);
            if (n === last) return;
            const dt = Date.now() - since;
            gap = Math.max(gap, dt);
            for (let k = last; k < n; k++) intervals.push(dt / (n - last));
            last = n; since = Date.now();
          }, 10);
          const fault = setInterval(() => {
            if (!reset || didReset) return;
            void (async () => {
              const now = (await txBytes(a)) + (await txBytes(b));
              if (didReset || now - tx0 <= 8 * MiB) return;
              didReset = true;
              await resetConnections(a, b);
            })();
          }, 100);
          const t0 = Date.now();
          // vmshift's phases as its JSON lines arrive (link up, B's files made, the copy's first progress,
          // disks synchronized, the memory phase's first progress, the commit).
          const seen = new Map<string, number>();
          const r = await runIn(sys.argv(), (out) => {
            for (const ev of ['connected', 'disks-prepared', 'disk-progress', 'disks-synchronized', 'progress', 'committed']) if (!seen.has(ev) && out.includes(`"event":"${ev}"`)) seen.set(ev, (Date.now() - t0) / 1000);
          });
          const s = (Date.now() - t0) / 1000;
          clearInterval(fault);
          const after = seqOf(consolePath);
          for (let i = 0; i < 100 && seqOf(consolePath) < after + 5; i++) await new Promise((res) => setTimeout(res, 50));
          clearInterval(watch);
          const net = ((await txBytes(a)) + (await txBytes(b)) - tx0) / MiB;
          const moved = (await domState(b, sys.name)) === 'running' && (await domState(a, sys.name)) !== 'running';
          const job = moved ? parseJobInfo(await b.virsh.run(['domjobinfo', '--completed', '--keep-completed', sys.name]).catch(() => '')) : null;
          const ev = r.out.split('\n').filter((l) => l.startsWith('{')).map((l) => JSON.parse(l) as Record<string, unknown>);
          const fin = ev.find((e) => e.event === 'done') as { pausedMs?: number; link?: { resentBytes: number; reconnects: number } } | undefined;
          const copied = Math.max(0, ...ev.filter((e) => e.event === 'disk-progress').map((e) => Number(e.bytesCopied)));
          const diskX = sys.enable && fin ? `${((copied + (fin.link?.resentBytes ?? 0)) / alloc).toFixed(3)}x` : '-';
          const err = (ev.find((e) => e.error) as { error?: { message: string } } | undefined)?.error?.message ?? r.err;
          const phases = [...seen].map(([k, v]) => `${k} ${v.toFixed(1)} s`).join(', ');
          const note = r.code === 0 ? (fin?.link ? `${fin.link.reconnects} reconnect(s); ${phases}` : '') : err.replace(/\s+/g, ' ').trim().slice(-160);
          rows.push({ system, reset, ok: r.code === 0 && moved, s, downtimeMs: job?.downtimeMs ?? null, pausedMs: fin?.pausedMs ?? null, gapMs: gap, p99Ms: pct(intervals, 99), netMiB: net, diskX, note });
          process.stderr.write(`${system}${reset ? ' (reset)' : ''}: ${r.code === 0 && moved ? 'moved' : 'FAILED'} in ${s.toFixed(1)} s, writer gap ${gap} ms, p99 ${pct(intervals, 99).toFixed(0)} ms${note ? `: ${note}` : ''}\n`);
          // Clean up for the next move: the guest goes wherever it is, B's file with it.
          for (const h of [a, b]) {
            const st = await domState(h, sys.name);
            if (st === 'running' || st === 'paused') await h.virsh.run(['destroy', sys.name]).catch(() => {});
            if (st !== null) await h.virsh.run(['undefine', sys.name]).catch(() => {});
          }
          for (let i = 0; i < 100 && vmB.shims().length; i++) await new Promise((res) => setTimeout(res, 100));
        }
      }
    }
  } finally {
    process.stderr.write(`${table(['system', 'reset', 'ok', 'time s', 'libvirt downtime ms', 'paused ms', 'writer gap ms', 'record p99 ms', 'net MiB', 'disk bytes / allocated', 'note'],
      rows.map((r) => [r.system, r.reset ? 'ss -K' : '-', r.ok ? 'yes' : 'NO', r.s.toFixed(1), r.downtimeMs ?? '-', r.pausedMs ?? '-', r.gapMs, r.p99Ms.toFixed(0), r.netMiB.toFixed(1), r.diskX, r.note]))}\n`);
    await cleanupAll();
  }
}
