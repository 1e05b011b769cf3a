// `npm run bench -- migrate [--size 1G] [--quick] [--idle 3] [--cases all|2m,8m,32m,max,bw]
// [--bandwidth 4M] [--bw-size 128M] [--systems background,write-blocking,auto,precopy,mirror]` (or `--report bench/results/migrate-X.json` to print a saved run):
// live storage migration of a fully written disk while fio writes 4k random data through
// the system's NBD export, QEMU 7.2's blockdev-mirror (background, write-blocking) against
// vmshift's modes (auto, precopy, mirror), in one run, one table. --quick is the smoke run:
// a 256M disk, the 8 MiB/s, unthrottled and bandwidth-limited cases, 1 s idle.
// Condition: "cold": every run gets a freshly written source, a destination that does not
// exist yet, and a dropped page cache followed by a few idle seconds (see ENVIRONMENT.md:
// page-cache state alone swings copy times 5x on these machines).
import { mkdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { cleanupAll, tempDir } from '../test/helpers/proc.ts';
import { dropCaches, fillFile, latencyWindow, procCpuSeconds, procIo, sleep, startFio, table, type LatencyStats } from './lib.ts';
import { qemuMirror } from './migrate-qemu.ts';
import { vmshiftMode } from './migrate-vmshift.ts';
import type { JobOutcome, MigrateSystem } from './migrate-system.ts';
import { formatBytes, parseSize } from '../src/util/size.ts';

const root = new URL('..', import.meta.url).pathname;
const MiB = 2 ** 20;

interface Case {
  id: string;
  label: string;
  size: number;
  /** fio --rate, or null for unthrottled. */
  rate: string | null;
  distribution: string;
  bandwidth: number;
  capMs: number;
  /** Issue 3's targets for this case: every target, or (copy slower than the writes) completing with a short stall. */
  targets: 'all' | 'completes';
}

interface Row {
  case: string;
  system: string;
  mode: string;
  size: number;
  job: JobOutcome;
  /** Bytes the serving process wrote beyond fio's own writes (and NBD replies): the destination's share. */
  destIoBytes: number;
  /** The same from write_bytes (page-dirtying accounting: rewrites of dirty pages are missed). */
  destDirtyBytes: number;
  fioWriteBytes: number;
  /** CPU seconds (user + system) the serving process used from fio's start to the job's end. */
  cpuS?: number;
  window: LatencyStats;
}

const systems: MigrateSystem[] = [
  qemuMirror('background'), qemuMirror('write-blocking'),
  vmshiftMode('auto'), vmshiftMode('precopy'), vmshiftMode('mirror'),
];

function options(args: string[]) {
  const opt = (name: string) => {
    const i = args.indexOf(`--${name}`);
    return i >= 0 ? args[i + 1] : undefined;
  };
  const quick = args.includes('--quick');
  const size = parseSize(opt('size') ?? (quick ? '256M' : '1G'), '--size');
  const bandwidth = parseSize(opt('bandwidth') ?? '4M', '--bandwidth');
  // The limited copy takes size/bandwidth: a fraction of the disk keeps the run short.
  const bwSize = parseSize(opt('bw-size') ?? String(Math.max(16 * MiB, quick ? size / 16 : size / 8)), '--bw-size');
  const idleMs = Number(opt('idle') ?? (quick ? 1 : 3)) * 1000;
  // The quick smoke run keeps one moderate rate, the unthrottled one and the bandwidth case.
  const casesOpt = opt('cases') ?? (quick ? '8m,max,bw' : 'all');
  const only = casesOpt === 'all' ? undefined : casesOpt.split(',');
  // A generous safety net for the rate cases (QEMU alone copies ~200 MiB/s here).
  const rateCap = 120_000 + (size / (10 * MiB)) * 1000;
  const all: Case[] = [
    { id: '2m', label: 'zipf 2 MiB/s', size, rate: '2m', distribution: 'zipf:1.2', bandwidth: 0, capMs: rateCap, targets: 'all' },
    { id: '8m', label: 'zipf 8 MiB/s', size, rate: '8m', distribution: 'zipf:1.2', bandwidth: 0, capMs: rateCap, targets: 'all' },
    { id: '32m', label: 'zipf 32 MiB/s', size, rate: '32m', distribution: 'zipf:1.2', bandwidth: 0, capMs: rateCap, targets: 'all' },
    { id: 'max', label: 'zipf unthrottled', size, rate: null, distribution: 'zipf:1.2', bandwidth: 0, capMs: rateCap, targets: 'all' },
    // Copy limited below the write rate: the case where a background mirror never becomes ready.
    { id: 'bw', label: `uniform 8 MiB/s, copy ${formatBytes(bandwidth)}/s`, size: bwSize, rate: '8m', distribution: 'random', bandwidth, capMs: 3 * (bwSize / bandwidth) * 1000, targets: 'completes' },
  ];
  const unknown = only?.filter((id) => !all.some((c) => c.id === id)) ?? [];
  if (unknown.length) throw new Error(`--cases: unknown ${unknown.join(',')} (known: all, ${all.map((c) => c.id).join(', ')})`);
  const cases = all.filter((c) => !only || only.includes(c.id));
  // --systems background,auto,...: a subset of the systems (by mode name), for quick iterations.
  const pick = opt('systems')?.split(',');
  const badSys = pick?.filter((m) => !systems.some((s) => s.mode === m)) ?? [];
  if (badSys.length) throw new Error(`--systems: unknown ${badSys.join(',')} (known: ${systems.map((s) => s.mode).join(', ')})`);
  const chosen = systems.filter((s) => !pick || pick.includes(s.mode));
  return { quick, size, bandwidth, bwSize, idleMs, cases, systems: chosen };
}

/** One system on one case: fresh disk, cold cache, fio through the export, the job, then teardown. */
async function runCase(c: Case, sys: MigrateSystem, idleMs: number): Promise<Row> {
  const dir = tempDir('vmsb-');
  try {
    const source = join(dir, 'src.raw');
    await fillFile(source, c.size);
    const served = await sys.start(dir, source);
    try {
      await dropCaches();
      await sleep(idleMs);
      const io0 = procIo(served.pid);
      const cpu0 = procCpuSeconds(served.pid);
      const fio = startFio([
        '--name=w', '--ioengine=nbd', `--uri=${served.uri}`, '--rw=randwrite', '--bs=4k', `--size=${c.size}`,
        `--random_distribution=${c.distribution}`, '--iodepth=4', '--norandommap', '--randrepeat=0',
        ...(c.rate ? [`--rate=${c.rate}`] : []),
        // Long enough to outlast any job; stopped as soon as the job has concluded.
        '--time_based', `--runtime=${Math.ceil(c.capMs / 1000) + 120}`,
        `--write_lat_log=${join(dir, 'lat')}`, '--log_avg_msec=0', '--log_unix_epoch=1',
      ], join(dir, 'fio.json'));
      let job: JobOutcome;
      let fioDone: { writeBytes: number; writeIos: number };
      try {
        await sleep(1000);
        job = await served.migrate({ dest: join(dir, 'dst.raw'), size: c.size, bandwidth: c.bandwidth, capMs: c.capMs });
      } finally {
        fioDone = await fio.stop();
      }
      const io1 = procIo(served.pid);
      const cpuS = procCpuSeconds(served.pid) - cpu0;
      // Every fio write costs the server its bytes on the source plus a 16-byte NBD reply.
      const fioShare = fioDone.writeBytes + 16 * fioDone.writeIos;
      return {
        case: c.label, system: sys.system, mode: sys.mode, size: c.size, job,
        destIoBytes: io1.wchar - io0.wchar - fioShare,
        destDirtyBytes: io1.writeBytes - io0.writeBytes - fioDone.writeBytes,
        fioWriteBytes: fioDone.writeBytes,
        cpuS,
        window: latencyWindow(join(dir, 'lat_lat.1.log'), job.startMs, job.endMs),
      };
    } finally {
      await served.stop();
    }
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}

function failedRow(c: Case, sys: MigrateSystem, e: Error): Row {
  const now = Date.now();
  return {
    case: c.label, system: sys.system, mode: sys.mode, size: c.size,
    job: { converged: false, startMs: now, endMs: now, bytesToDest: NaN, passes: '-', switchMs: NaN, error: `failed: ${e.message.split('\n')[0]}` },
    destIoBytes: NaN, destDirtyBytes: NaN, fioWriteBytes: NaN, window: { n: 0, p50Ms: NaN, p99Ms: NaN, maxMs: NaN },
  };
}

const x = (bytes: number, size: number) => bytes / size;

/** Targets from issue 3 that a vmshift row misses, against the QEMU rows of its case. */
function misses(c: Case, r: Row, bg: Row | undefined, wb: Row | undefined): string {
  const out: string[] = [];
  if (!r.job.converged) return short(r.job.error ?? 'failed');
  if (c.targets === 'completes') return r.job.switchMs < 50 ? 'completes' : 'completes, stall>=50ms';
  if (x(r.job.bytesToDest, r.size) > 1.05) out.push('bytes>1.05x');
  if (wb?.job.converged && r.window.p99Ms > 0.5 * wb.window.p99Ms) out.push('p99>0.5x wb');
  if (bg?.job.converged && r.window.p99Ms > 1.5 * bg.window.p99Ms) out.push('p99>1.5x bg');
  if (bg?.job.converged && r.job.endMs - r.job.startMs > 1.1 * (bg.job.endMs - bg.job.startMs)) out.push('time>1.1x bg');
  if (!(r.job.switchMs < 50)) out.push('stall>=50ms');
  return out.length ? out.join(', ') : 'all met';
}

/** Errors in the table are cut short (the JSON file has them whole). */
const short = (text: string) => (text.length > 60 ? `${text.slice(0, 57)}...` : text);

function ratios(r: Row, q: Row | undefined): string {
  if (r.system !== 'vmshift' || !q) return '';
  if (!q.job.converged) return 'QEMU dnf';
  if (!r.job.converged) return 'dnf';
  const f = (a: number, b: number) => (b > 0 ? (a / b).toFixed(2) : '-');
  return `${f(r.job.endMs - r.job.startMs, q.job.endMs - q.job.startMs)} / ${f(r.job.bytesToDest, q.job.bytesToDest)} / ${f(r.window.p99Ms, q.window.p99Ms)}`;
}

/**
 * The write rate fio achieved during the job (all its writes are 4 KiB). Latency and bytes
 * copied only compare fairly when the systems let the guest write at the same rate.
 */
function windowMiBps(r: Row): number {
  const seconds = (r.job.endMs - r.job.startMs) / 1000;
  return seconds > 0 ? (r.window.n * 4096) / MiB / seconds : NaN;
}

function report(cases: Case[], rows: Row[]): string {
  const body = rows.map((r) => {
    const c = cases.find((k) => k.label === r.case)!;
    const same = (mode: string) => rows.find((q) => q.case === r.case && q.system === 'QEMU' && q.mode === mode);
    const bg = same('background');
    const wb = same('write-blocking');
    return [
      r.case, `${r.system} ${r.mode}`,
      r.job.converged ? (r.job.endMs - r.job.startMs) / 1000 : `dnf (${((r.job.endMs - r.job.startMs) / 1000).toFixed(0)})`,
      `${x(r.job.bytesToDest, r.size).toFixed(2)}x`, `${x(r.destIoBytes, r.size).toFixed(2)}x`,
      r.job.passes, r.job.switchMs, r.window.p50Ms, r.window.p99Ms, r.window.maxMs, windowMiBps(r), r.cpuS ?? NaN,
      ratios(r, bg), ratios(r, wb), r.system === 'vmshift' ? misses(c, r, bg, wb) : short(r.job.error ?? ''),
    ];
  });
  return table(['case', 'system/mode', 'total s', 'to dest (job)', 'to dest (io)', 'passes', 'switch-over ms',
    'p50 ms', 'p99 ms', 'max ms', 'fio MiB/s', 'server CPU s', 'vs QEMU bg t/bytes/p99', 'vs QEMU wb t/bytes/p99', 'issue-3 targets'], body);
}

export async function main(args: string[]): Promise<void> {
  // --report FILE prints the table of an earlier run's results file again (JSON stores NaN as null).
  const again = args.indexOf('--report');
  if (again >= 0) {
    const saved = JSON.parse(readFileSync(args[again + 1]!, 'utf8'), (_k, v: unknown) => (v === null ? NaN : v)) as { options: { cases: Case[] }; condition: string[]; rows: Row[] };
    process.stdout.write(`${report(saved.options.cases, saved.rows)}\n\n${saved.condition.map((l) => `- ${l}`).join('\n')}\n`);
    return;
  }
  const o = options(args);
  const began = Date.now();
  const rows: Row[] = [];
  const condition = [
    `cold: page cache dropped, ${o.idleMs / 1000} s idle before each run; fresh fully written source, destination created by the job`,
    `disk ${formatBytes(o.size)} (bandwidth case ${formatBytes(o.bwSize)}, copy limit ${formatBytes(o.bandwidth)}/s, cap 3x the limited copy time)`,
    'fio 4k randwrite iodepth 4 through each system\'s NBD export (unix socket), started 1 s before the job and stopped when it concluded',
    'latency p50/p99/max: writes that completed while the job ran; "to dest (io)": the serving process\'s wchar delta minus fio\'s writes',
  ];
  try {
    for (const c of o.cases) {
      for (const sys of o.systems) {
        process.stderr.write(`bench migrate: ${c.label}: ${sys.system} ${sys.mode} (${formatBytes(c.size)})...`);
        // A system that fails one run is reported as failed; the others still run.
        const row = await runCase(c, sys, o.idleMs).catch((e: Error) => failedRow(c, sys, e));
        rows.push(row);
        process.stderr.write(` ${((row.job.endMs - row.job.startMs) / 1000).toFixed(1)} s, ${x(row.job.bytesToDest, row.size).toFixed(2)}x, p99 ${row.window.p99Ms.toFixed(1)} ms${row.job.error ? `, ${row.job.error}` : ''}\n`);
      }
    }
  } finally {
    await cleanupAll();
  }
  const out = `${report(o.cases, rows)}\n\n${condition.map((l) => `- ${l}`).join('\n')}\n- wall time of the whole run: ${((Date.now() - began) / 1000).toFixed(0)} s\n`;
  process.stdout.write(out);
  const stamp = new Date().toISOString().replace(/[:.]/g, '-');
  mkdirSync(join(root, 'bench/results'), { recursive: true });
  const file = join(root, 'bench/results', `migrate-${stamp}.json`);
  writeFileSync(file, JSON.stringify({ options: { ...o, cases: o.cases, systems: o.systems.map((m) => `${m.system} ${m.mode}`) }, condition, rows }, null, 2));
  process.stderr.write(`bench migrate: results in ${file}\n`);
}
