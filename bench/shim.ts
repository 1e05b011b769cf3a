// `npm run bench -- shim [--size 1G] [--seconds 5] [--rounds 3]`: fio (nbd engine) on the same raw file
// through qemu-nbd, nbdkit's file plugin and a vmshift shim (bitmap tracking on).
// Condition: "warm": the file is fully written first and stays resident; each system gets
// the same workloads in the same run, and vmshift is reported as a ratio to qemu-nbd.
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { execFileSync } from 'node:child_process';
import { startDaemon, waitForSocket } from '../test/helpers/proc.ts';
import { fio, peakRssMiB, table, type FioResult } from './lib.ts';
import { parseSize } from '../src/util/size.ts';

const root = new URL('..', import.meta.url).pathname;

/** How each system serves FILE as export "disk" on the unix socket SOCK. */
const systems: Array<{ name: string; command(file: string, sock: string): [string, string[]] }> = [
  { name: 'qemu-nbd', command: (f, s) => ['qemu-nbd', ['-t', '-e', '8', '-f', 'raw', '-k', s, '-x', 'disk', f]] },
  { name: 'nbdkit', command: (f, s) => ['nbdkit', ['-U', s, '--foreground', '--exit-with-parent', 'file', f]] },
  { name: 'vmshift', command: (f, s) => [join(root, 'bin/vmshift'), ['serve', f, '--socket', s, '--track', 'bitmap', '--state', `${s}.state.json`]] },
];

const workloads = [
  { name: '4k randread qd16', unit: 'IOPS', args: ['--rw=randread', '--bs=4k', '--iodepth=16'] },
  { name: '4k randwrite qd16', unit: 'IOPS', args: ['--rw=randwrite', '--bs=4k', '--iodepth=16'] },
  { name: '1M read qd4', unit: 'MiB/s', args: ['--rw=read', '--bs=1M', '--iodepth=4'] },
  { name: '1M write qd4', unit: 'MiB/s', args: ['--rw=write', '--bs=1M', '--iodepth=4'] },
];

export async function main(args: string[]): Promise<void> {
  const opt = (name: string, def: string) => {
    const i = args.indexOf(`--${name}`);
    return i >= 0 ? args[i + 1]! : def;
  };
  const size = parseSize(opt('size', '1G'));
  const seconds = Number(opt('seconds', '5'));
  const rounds = Number(opt('rounds', '3'));
  const dir = mkdtempSync(join(tmpdir(), 'vmshift-bench-'));
  const file = join(dir, 'disk.raw');
  const results: Record<string, Record<string, FioResult>> = {};
  const rss: Record<string, number> = {};
  try {
    process.stderr.write(`bench shim: filling ${size} bytes (warm condition)\n`);
    execFileSync('fio', ['--name=fill', `--filename=${file}`, '--rw=write', '--bs=1M', `--size=${size}`, '--ioengine=psync', '--end_fsync=1', '--refill_buffers'], { stdio: 'ignore' });
    // Several rounds, systems interleaved, medians reported: this machine's throughput drifts
    // by tens of percent within a minute, and interleaving puts every system under the same drift.
    const samples: Record<string, Record<string, FioResult[]>> = {};
    for (let round = 1; round <= rounds; round++) {
      for (const sys of systems) {
        const sock = join(dir, `${sys.name}-${round}.sock`);
        const server = startDaemon(...sys.command(file, sock));
        try {
          await waitForSocket(sock, server);
          for (const w of workloads) {
            process.stderr.write(`bench shim: round ${round}/${rounds}: ${sys.name}: ${w.name}\n`);
            const r = await fio([
              '--name=b', '--ioengine=nbd', `--uri=nbd+unix:///disk?socket=${sock}`, `--size=${size}`,
              '--time_based', `--runtime=${seconds}`, '--ramp_time=1', '--norandommap', '--randrepeat=0', ...w.args,
            ]);
            ((samples[sys.name] ??= {})[w.name] ??= []).push(r);
          }
          if (sys.name === 'vmshift') rss[sys.name] = Math.max(rss[sys.name] ?? 0, peakRssMiB(server.pid));
        } finally {
          await server.stop();
        }
      }
    }
    for (const [sys, byWorkload] of Object.entries(samples)) {
      results[sys] = {};
      for (const [w, list] of Object.entries(byWorkload)) results[sys]![w] = medianBy(list, (r) => r.iops);
    }
    const rows = workloads.map((w) => {
      const v = (s: string) => (w.unit === 'IOPS' ? results[s]![w.name]!.iops : results[s]![w.name]!.mibps);
      return [w.name, w.unit, v('qemu-nbd'), v('nbdkit'), v('vmshift'), `${(v('vmshift') / v('qemu-nbd')).toFixed(2)}x`, `${(v('vmshift') / v('nbdkit')).toFixed(2)}x`];
    });
    const out = table(['workload', 'unit', 'qemu-nbd', 'nbdkit file', 'vmshift', 'vmshift/qemu-nbd', 'vmshift/nbdkit'], rows);
    const summary = `${out}\n\nvmshift peak RSS: ${rss.vmshift?.toFixed(1)} MiB; file ${size} bytes, warm, median of ${rounds} interleaved rounds of ${seconds} s per cell, fio nbd engine over a unix socket.`;
    process.stdout.write(summary + '\n');
    const stamp = new Date().toISOString().replace(/[:.]/g, '-');
    writeFileSync(join(root, 'bench/results', `shim-${stamp}.json`), JSON.stringify({ size, seconds, rounds, results: Object.fromEntries(Object.entries(results).map(([k, v]) => [k, Object.fromEntries(Object.entries(v).map(([w, r]) => [w, { ...r, raw: undefined }]))])), rss }, null, 2));
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}

/** The sample with the median value of `key` (odd counts: the middle one). */
function medianBy<T>(list: T[], key: (t: T) => number): T {
  const sorted = [...list].sort((a, b) => key(a) - key(b));
  return sorted[Math.floor((sorted.length - 1) / 2)]!;
}
