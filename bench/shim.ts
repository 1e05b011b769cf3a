// `npm run bench -- shim [--size 1G] [--seconds 5] [--rounds 3] [--copies 3] [--only fio|nbdcopy]`:
// the same raw file served by qemu-nbd, nbdkit's file plugin and a vmshift shim (bitmap
// tracking on), driven by fio (nbd engine, one connection) and by nbdcopy (4 connections,
// 64 requests of 256 KiB in flight on each: how people back up or move a whole export).
// Condition: "warm": the file is fully written first and stays resident; each system gets
// the same workloads in the same run, and vmshift is reported as a ratio to the others.
// vmshift's peak RSS is taken per workload (VmHWM, reset before each through clear_refs).
// BENCH_BASE=/path/to/other/bin/vmshift adds that build as a fourth system ("vmshift-base",
// in the JSON only): an A/B of two versions of the shim interleaved in one run.
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { execFileSync, spawn } from 'node:child_process';
import { startDaemon, waitForSocket } from '../test/helpers/proc.ts';
import { fio, peakRssMiB, procCpuSeconds, resetPeakRss, table } from './lib.ts';
import { parseSize } from '../src/util/size.ts';

const root = new URL('..', import.meta.url).pathname;

/** How each system serves FILE as export "disk" on the unix socket SOCK. */
const systems: Array<{ name: string; command(file: string, sock: string): [string, string[]] }> = [
  { name: 'qemu-nbd', command: (f, s) => ['qemu-nbd', ['-t', '-e', '8', '-f', 'raw', '-k', s, '-x', 'disk', f]] },
  { name: 'nbdkit', command: (f, s) => ['nbdkit', ['-U', s, '--foreground', '--exit-with-parent', 'file', f]] },
  { name: 'vmshift', command: (f, s) => [join(root, 'bin/vmshift'), ['serve', f, '--socket', s, '--track', 'bitmap', '--state', `${s}.state.json`]] },
];
// An A/B of the code before against this one (see the file comment).
if (process.env.BENCH_BASE) systems.push({ name: 'vmshift-base', command: (f, s) => [process.env.BENCH_BASE!, ['serve', f, '--socket', s, '--track', 'bitmap', '--state', `${s}.state.json`]] });

interface Ctx { uri: string; size: number; seconds: number; copies: number; source: string }
/** One cell: the figure (`unit`), higher is better unless `lowerIsBetter`. */
interface Workload { name: string; unit: string; group: 'fio' | 'nbdcopy'; lowerIsBetter?: boolean; run(ctx: Ctx): Promise<number> }

const fioWorkload = (name: string, unit: 'IOPS' | 'MiB/s', args: string[]): Workload => ({
  name, unit, group: 'fio',
  async run({ uri, size, seconds }) {
    const r = await fio([
      '--name=b', '--ioengine=nbd', `--uri=${uri}`, `--size=${size}`,
      '--time_based', `--runtime=${seconds}`, '--ramp_time=1', '--norandommap', '--randrepeat=0', ...args,
    ]);
    return unit === 'IOPS' ? r.iops : r.mibps;
  },
});

/** nbdcopy's own defaults, said out loud: 4 connections, 64 requests of 256 KiB each. */
const NBDCOPY = ['--connections=4', '--requests=64', '--request-size=262144'];
const nbdcopyWorkload = (name: string, args: (ctx: Ctx) => string[]): Workload => ({
  name, unit: 's', group: 'nbdcopy', lowerIsBetter: true,
  async run(ctx) {
    // The median of a few copies: one takes a few tenths of a second, and this machine jitters.
    const times: number[] = [];
    for (let i = 0; i < ctx.copies; i++) times.push(await timed('nbdcopy', [...NBDCOPY, ...args(ctx)]));
    return median(times);
  },
});

const workloads: Workload[] = [
  fioWorkload('4k randread qd16', 'IOPS', ['--rw=randread', '--bs=4k', '--iodepth=16']),
  fioWorkload('4k randwrite qd16', 'IOPS', ['--rw=randwrite', '--bs=4k', '--iodepth=16']),
  fioWorkload('1M read qd4', 'MiB/s', ['--rw=read', '--bs=1M', '--iodepth=4']),
  fioWorkload('1M write qd4', 'MiB/s', ['--rw=write', '--bs=1M', '--iodepth=4']),
  nbdcopyWorkload('nbdcopy export -> null:', (c) => [c.uri, 'null:']),
  nbdcopyWorkload('nbdcopy file -> export', (c) => [c.source, c.uri]),
];

export async function main(args: string[]): Promise<void> {
  const opt = (name: string, def: string) => {
    const i = args.indexOf(`--${name}`);
    return i >= 0 ? args[i + 1]! : def;
  };
  const size = parseSize(opt('size', '1G'));
  const seconds = Number(opt('seconds', '5'));
  const rounds = Number(opt('rounds', '3'));
  const copies = Number(opt('copies', '3'));
  const only = opt('only', '');
  const chosen = workloads.filter((w) => !only || w.group === only);
  const dir = mkdtempSync(join(tmpdir(), 'vmshift-bench-'));
  const file = join(dir, 'disk.raw');
  const source = join(dir, 'source.raw');
  const samples: Record<string, Record<string, number[]>> = {};
  const cpu: Record<string, Record<string, number[]>> = {};
  const rss: Record<string, number> = {};
  const started = Date.now();
  try {
    process.stderr.write(`bench shim: filling ${size} bytes (warm condition)\n`);
    for (const f of chosen.some((w) => w.group === 'nbdcopy') ? [file, source] : [file]) {
      execFileSync('fio', ['--name=fill', `--filename=${f}`, '--rw=write', '--bs=1M', `--size=${size}`, '--ioengine=psync', '--end_fsync=1', '--refill_buffers'], { stdio: 'ignore' });
    }
    // Several rounds, systems interleaved, medians reported: this machine's throughput drifts
    // by tens of percent within a minute, and interleaving puts every system under the same drift.
    for (let round = 1; round <= rounds; round++) {
      for (const sys of systems) {
        const sock = join(dir, `${sys.name}-${round}.sock`);
        const server = startDaemon(...sys.command(file, sock));
        try {
          await waitForSocket(sock, server);
          const ctx: Ctx = { uri: `nbd+unix:///disk?socket=${sock}`, size, seconds, copies, source };
          for (const w of chosen) {
            process.stderr.write(`bench shim: round ${round}/${rounds}: ${sys.name}: ${w.name}\n`);
            resetPeakRss(server.pid);
            const cpu0 = procCpuSeconds(server.pid);
            ((samples[sys.name] ??= {})[w.name] ??= []).push(await w.run(ctx));
            ((cpu[sys.name] ??= {})[w.name] ??= []).push(procCpuSeconds(server.pid) - cpu0);
            if (sys.name === 'vmshift') rss[w.name] = Math.max(rss[w.name] ?? 0, peakRssMiB(server.pid));
          }
        } finally {
          await server.stop();
        }
      }
    }
    const med = (s: string, w: string) => median(samples[s]![w]!);
    const ratio = (w: Workload, a: string, b: string) => `${(w.lowerIsBetter ? med(b, w.name) / med(a, w.name) : med(a, w.name) / med(b, w.name)).toFixed(2)}x`;
    const rows = chosen.map((w) => [
      w.name, w.unit, med('qemu-nbd', w.name), med('nbdkit', w.name), med('vmshift', w.name),
      ratio(w, 'vmshift', 'qemu-nbd'), ratio(w, 'vmshift', 'nbdkit'), rss[w.name]!,
    ]);
    const out = table(['workload', 'unit', 'qemu-nbd', 'nbdkit file', 'vmshift', 'vmshift/qemu-nbd', 'vmshift/nbdkit', 'vmshift peak RSS MiB'], rows);
    const summary = `${out}\n\nRatios: > 1 means vmshift is faster (for seconds, the other's time over vmshift's). File ${size} bytes, warm, median of ${rounds} interleaved rounds; fio cells ${seconds} s each over one connection, nbdcopy cells the median of ${copies} copies (${NBDCOPY.join(' ')}); all over a unix socket. Wall time ${((Date.now() - started) / 1000).toFixed(0)} s.`;
    process.stdout.write(summary + '\n');
    const stamp = new Date().toISOString().replace(/[:.]/g, '-');
    writeFileSync(join(root, 'bench/results', `shim-${stamp}.json`), JSON.stringify({ size, seconds, rounds, copies, samples, serverCpuSeconds: cpu, peakRssMiB: rss }, null, 2));
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}

/** Run a command to completion; its wall time in seconds. */
async function timed(cmd: string, args: string[]): Promise<number> {
  const t0 = performance.now();
  await new Promise<void>((resolve, reject) => {
    const p = spawn(cmd, args, { stdio: ['ignore', 'ignore', 'pipe'] });
    let e = '';
    p.stderr.on('data', (b) => (e += b));
    p.on('close', (code) => (code === 0 ? resolve() : reject(new Error(`${cmd} ${args.join(' ')} exited ${code}: ${e}`))));
  });
  return (performance.now() - t0) / 1000;
}

function median(list: number[]): number {
  const sorted = [...list].sort((a, b) => a - b);
  return sorted[Math.floor((sorted.length - 1) / 2)]!;
}
