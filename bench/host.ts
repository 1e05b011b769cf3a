// `npm run bench -- host [--rounds 2] [--bandwidth 20] [--no-reset] [--cut S] [--systems a,b]`: a whole running guest
// (with `--local-disks`: its thin local disk moved too, bench/host-local.ts)
// moved between two libvirt hosts on this machine (test/helpers/libvirt-hosts.ts), by
// libvirt alone (`virsh migrate --live` with its own qemu+ssh connection and TCP migration
// stream) and by `vmshift migrate DOMAIN URI` (both through the link, and with
// `--libvirt-via direct`: virsh's own connection, vmshift's memory stream), interleaved in
// one run on one guest (the sequence writer, 128 MiB RAM) that goes back and forth. Per move:
// total time, libvirt's downtime, the writer's longest gap (the pause the guest saw, sampled
// every 10 ms from its console), bytes over the veth, and whether a connection reset
// (`ss -K`, once 8 MiB went) was survived; with `--cut S`, a link-down of S seconds instead. The disk is shared (one file both hosts see).
import { join } from 'node:path';
import { chmodSync, existsSync, readFileSync, writeFileSync } from 'node:fs';
import { spawn } from 'node:child_process';
import { cleanupAll, run, runStatus } from '../test/helpers/proc.ts';
import { ensureGuest } from '../test/helpers/guest.ts';
import { linkState, resetConnections } from '../test/helpers/hosts.ts';
import { VMSHIFT, domState, libvirtHosts, type LibvirtTestHost } from '../test/helpers/libvirt-hosts.ts';
import { writerDomainXml } from '../test/e2e/libvirt-host.ts';
import { parseJobInfo } from '../src/libvirt/migrate-domain.ts';
import { table } from './lib.ts';

const NAME = 'benchhost';

interface Row { system: string; reset: boolean; ok: boolean; s: number; downtimeMs: number | null; gapMs: number; netMiB: number; note: string }

export function seqOf(consolePath: string): number {
  if (!existsSync(consolePath)) return 0;
  const m = [...readFileSync(consolePath, 'latin1').matchAll(/^VMSHIFT-SEQ (\d+)\r?$/gm)];
  return m.length ? Number(m[m.length - 1]![1]) : 0;
}

export async function txBytes(h: LibvirtTestHost): Promise<number> {
  const r = await run('ip', ['-n', h.ns, '-s', '-j', 'link', 'show', 'dev', h.dev]);
  return (JSON.parse(r.stdout) as Array<{ stats64: { tx: { bytes: number } } }>)[0]!.stats64.tx.bytes;
}

/** Run argv (inside a host) to its end; `during` sees stdout as it comes. */
export function runIn(argv: [string, string[]], during: (out: string) => void): Promise<{ code: number | null; out: string; err: string }> {
  return new Promise((resolve) => {
    const p = spawn(argv[0], argv[1], { stdio: ['ignore', 'pipe', 'pipe'] });
    let out = '', err = '';
    p.stdout.on('data', (b) => { out += b; during(out); });
    p.stderr.on('data', (b) => { err += b; during(out + err); });
    p.on('close', (code) => resolve({ code, out, err }));
  });
}

/** virsh's own qemu+ssh URI for host h: the OpenSSH client, through a wrapper that gives it the test's known_hosts. */
export function sshWrap(h: LibvirtTestHost): string {
  const w = join(h.dir, 'ssh-wrapper');
  writeFileSync(w, `#!/bin/sh\nexec ssh -o UserKnownHostsFile=${h.sshd.knownHosts} -o StrictHostKeyChecking=yes "$@"\n`);
  chmodSync(w, 0o755);
  return `qemu+ssh://root@${h.addr}:${h.sshd.port}/system?keyfile=${h.sshd.identity}&command=${w}&no_tty=1`;
}

export async function main(args: string[]): Promise<void> {
  if (args.includes('--local-disks')) return (await import('./host-local.ts')).main(args);
  const opt = (n: string, d: string) => { const i = args.indexOf(n); return i >= 0 ? args[i + 1]! : d; };
  const rounds = Number(opt('--rounds', '2'));
  const bandwidth = Number(opt('--bandwidth', '20'));
  const withReset = !args.includes('--no-reset');
  const cutS = Number(opt('--cut', '0'));
  const only = opt('--systems', '').split(',').filter(Boolean);
  await ensureGuest();
  const hosts = await libvirtHosts();
  const disk = join(hosts.shared, 'disk.raw'), consolePath = join(hosts.shared, 'console.log');
  await run('qemu-img', ['create', '-f', 'raw', disk, '1M']);
  await hosts.a.virsh.define(writerDomainXml(NAME, disk, consolePath, 64, 128));
  await hosts.a.virsh.start(NAME);
  for (let i = 0; seqOf(consolePath) < 20; i++) { if (i > 1200) throw new Error('the guest did not start writing'); await new Promise((r) => setTimeout(r, 100)); }
  const systems: Record<string, (from: LibvirtTestHost, to: LibvirtTestHost) => [string, string[]]> = {
    libvirt: (from, to) => from.argv('virsh', ['migrate', '--live', '--unsafe', '--persistent', '--undefinesource', '--bandwidth', String(bandwidth), NAME, sshWrap(to), '--migrateuri', `tcp://${to.addr}`, '--listen-address', to.addr]),
    vmshift: (from, to) => from.argv(VMSHIFT, ['migrate', NAME, to.sshUri, '--json', '--bandwidth', `${bandwidth}M`, '--peer-vmshift', VMSHIFT]),
    'vmshift --libvirt-via direct': (from, to) => from.argv(VMSHIFT, ['migrate', NAME, `${sshWrap(to)}&known_hosts=${to.sshd.knownHosts}`, '--libvirt-via', 'direct', '--json', '--bandwidth', `${bandwidth}M`, '--peer-vmshift', VMSHIFT]),
  };
  for (const k of Object.keys(systems)) if (only.length && !only.includes(k)) delete systems[k];
  const rows: Row[] = [];
  let here = hosts.a, there = hosts.b;
  try {
    for (let round = 0; round < rounds; round++) {
      for (const reset of withReset ? [false, true] : [false]) {
        for (const [system, argv] of Object.entries(systems)) {
          const tx0 = (await txBytes(here)) + (await txBytes(there));
          let last = seqOf(consolePath), since = Date.now(), gap = 0, didReset = false;
          const watch = setInterval(() => { const n = seqOf(consolePath); if (n !== last) { gap = Math.max(gap, Date.now() - since); last = n; since = Date.now(); } }, 10);
          const t0 = Date.now();
          const txStart = tx0;
          // The fault once 8 MiB crossed (polled: libvirt prints nothing while it migrates).
          const from = here, to = there;
          const fault = setInterval(() => {
            if (!reset || didReset) return;
            void (async () => {
              const now = (await txBytes(from)) + (await txBytes(to));
              if (didReset || now - txStart <= 8 * 1024 * 1024) return;
              didReset = true;
              if (!cutS) { await resetConnections(from, to); return; }
              await linkState(from, false);
              await new Promise((res) => setTimeout(res, cutS * 1000));
              await linkState(from, true);
            })();
          }, 100);
          const r = await runIn(argv(here, there), () => {});
          clearInterval(fault);
          if (cutS && didReset) await linkState(from, true);
          // The writer's pause: the longest gap until a few records after the move.
          const after = seqOf(consolePath);
          for (let i = 0; i < 100 && seqOf(consolePath) < after + 5; i++) await new Promise((res) => setTimeout(res, 50));
          clearInterval(watch);
          const s = (Date.now() - t0) / 1000;
          const net = ((await txBytes(here)) + (await txBytes(there)) - tx0) / 2 ** 20;
          const moved = (await domState(there, NAME)) === 'running' && (await domState(here, NAME)) !== 'running';
          const job = moved ? parseJobInfo((await runStatus('virsh', ['-c', there.virsh.uri, 'domjobinfo', '--completed', '--keep-completed', NAME])).stdout) : null;
          // vmshift's pause is libvirt's downtime plus its commit (the resume after Confirm).
          const done = r.out.split('\n').filter((l) => l.startsWith('{')).map((l) => JSON.parse(l) as { event?: string; commitMs?: number; pausedMs?: number; error?: { message: string } });
          const fin = done.find((e) => e.event === 'done');
          const commitMs = fin?.commitMs;
          const jsonError = done.find((e) => e.error)?.error?.message;
          const note = r.code === 0 ? (commitMs !== undefined ? `commit ${commitMs} ms, source paused to destination running ${fin?.pausedMs ?? '?'} ms` : '') : (jsonError ?? r.err).replace(/\s+/g, ' ').trim().slice(-160);
          rows.push({ system, reset, ok: r.code === 0 && moved, s, downtimeMs: job?.downtimeMs ?? null, gapMs: gap, netMiB: net, note });
          process.stderr.write(`${system}${reset ? ' (reset)' : ''}: ${r.code === 0 && moved ? 'moved' : 'FAILED'} in ${s.toFixed(1)} s${note ? `: ${note}` : ''}\n`);
          if (moved) [here, there] = [there, here];
          else if ((await domState(here, NAME)) !== 'running') throw new Error(`the guest runs on neither host after ${system}: ${r.err}`);
        }
      }
    }
  } finally {
    process.stderr.write(`${table(['system', 'reset', 'ok', 'time s', 'libvirt downtime ms', 'writer gap ms', 'net MiB', 'note'],
      rows.map((r) => [r.system, r.reset ? (cutS ? `${cutS} s cut` : 'ss -K') : '-', r.ok ? 'yes' : 'NO', r.s.toFixed(1), r.downtimeMs ?? '-', r.gapMs, r.netMiB.toFixed(1), r.note]))}\n`);
    await cleanupAll();
  }
}
