// Shared benchmark plumbing: fio runs through the nbd engine, process RSS, tables.
import { spawn } from 'node:child_process';
import { readFileSync, writeFileSync } from 'node:fs';

export interface FioResult {
  iops: number;
  mibps: number;
  latP50Ms: number;
  latP99Ms: number;
  latMaxMs: number;
}

/** Run fio with the given arguments plus JSON output; returns the first job's figures. */
export async function fio(args: string[]): Promise<FioResult & { raw: unknown }> {
  const out = await new Promise<string>((resolve, reject) => {
    const p = spawn('fio', [...args, '--output-format=json'], { stdio: ['ignore', 'pipe', 'pipe'] });
    let o = '', e = '';
    p.stdout.on('data', (b) => (o += b));
    p.stderr.on('data', (b) => (e += b));
    p.on('close', (code) => (code === 0 ? resolve(o) : reject(new Error(`fio ${args.join(' ')} exited ${code}: ${e}${o.slice(0, 2000)}`))));
  });
  const json = JSON.parse(out.slice(out.indexOf('{')));
  const job = json.jobs[0];
  const side = job.write.io_bytes > job.read.io_bytes ? job.write : job.read;
  const pct = side.clat_ns?.percentile ?? {};
  return {
    iops: side.iops,
    mibps: side.bw_bytes / 2 ** 20,
    latP50Ms: (pct['50.000000'] ?? 0) / 1e6,
    latP99Ms: (pct['99.000000'] ?? 0) / 1e6,
    latMaxMs: (side.clat_ns?.max ?? 0) / 1e6,
    raw: json,
  };
}

/** Peak resident set of a process (VmHWM), in MiB. */
export function peakRssMiB(pid: number): number {
  const status = readFileSync(`/proc/${pid}/status`, 'utf8');
  const kb = Number(/VmHWM:\s+(\d+)/.exec(status)?.[1] ?? NaN);
  return kb / 1024;
}

/** Start a new peak for peakRssMiB (Linux: 5 > /proc/PID/clear_refs resets VmHWM to the current RSS). */
export function resetPeakRss(pid: number): void {
  writeFileSync(`/proc/${pid}/clear_refs`, '5');
}

export function table(header: string[], rows: (string | number)[][]): string {
  const cells = [header, ...rows.map((r) => r.map((c) => (typeof c === 'number' ? fmt(c) : c)))];
  const widths = header.map((_, i) => Math.max(...cells.map((r) => String(r[i]).length)));
  const line = (r: (string | number)[]) => `| ${r.map((c, i) => String(c).padEnd(widths[i]!)).join(' | ')} |`;
  return [line(cells[0]!), `|${widths.map((w) => '-'.repeat(w + 2)).join('|')}|`, ...cells.slice(1).map(line)].join('\n');
}

function fmt(n: number): string {
  if (!Number.isFinite(n)) return '-';
  if (Math.abs(n) >= 100) return n.toFixed(0);
  if (Math.abs(n) >= 10) return n.toFixed(1);
  return n.toFixed(2);
}

/** Drop the page cache so every system starts cold (root only; a no-op warning otherwise). */
export async function dropCaches(): Promise<void> {
  await new Promise<void>((resolve) => {
    const p = spawn('sh', ['-c', 'sync; echo 3 > /proc/sys/vm/drop_caches'], { stdio: 'ignore' });
    p.on('close', () => resolve());
  });
}

/** Write counters of a process (all its threads) from /proc/PID/io. */
export interface ProcIo {
  /** Bytes passed to write-family syscalls (files and sockets): counts every rewrite. */
  wchar: number;
  /** Bytes accounted when page-cache pages become dirty: a rewrite of a still-dirty page is not counted again. */
  writeBytes: number;
}

export function procIo(pid: number): ProcIo {
  const text = readFileSync(`/proc/${pid}/io`, 'utf8');
  const field = (name: string) => Number(new RegExp(`^${name}:\\s+(\\d+)`, 'm').exec(text)?.[1] ?? NaN);
  return { wchar: field('wchar'), writeBytes: field('write_bytes') };
}

/** CPU seconds (utime + stime) a process has used so far, from /proc/PID/stat. */
export function procCpuSeconds(pid: number): number {
  const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
  // Fields after the command name (which may hold spaces) start at state; utime and stime are fields 14 and 15.
  const rest = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
  return (Number(rest[11]) + Number(rest[12])) / 100;
}

export const sleep = (ms: number) => new Promise<void>((r) => setTimeout(r, ms));

/** Write `size` bytes of non-zero data to a new file and fsync it: a fully allocated disk. */
export async function fillFile(path: string, size: number): Promise<void> {
  await new Promise<void>((resolve, reject) => {
    const p = spawn('fio', ['--name=fill', `--filename=${path}`, '--rw=write', '--bs=1M', `--size=${size}`, '--ioengine=psync', '--end_fsync=1'], { stdio: ['ignore', 'ignore', 'pipe'] });
    let e = '';
    p.stderr.on('data', (b) => (e += b));
    p.on('close', (code) => (code === 0 ? resolve() : reject(new Error(`fio fill of ${path} exited ${code}: ${e}`))));
  });
}

export interface LatencyStats {
  /** I/Os that completed in the window. */
  n: number;
  p50Ms: number;
  p99Ms: number;
  maxMs: number;
}

/** The value below which `p` (0..1) of the sorted values lie (nearest rank). */
export function percentile(sorted: number[], p: number): number {
  if (sorted.length === 0) return NaN;
  return sorted[Math.min(sorted.length - 1, Math.max(0, Math.ceil(p * sorted.length) - 1))]!;
}

/**
 * Latency of the I/Os that completed between `fromMs` and `toMs` (unix ms), from a fio
 * per-I/O log written with `--write_lat_log=P --log_avg_msec=0 --log_unix_epoch=1`
 * (lines "completion time ms, latency ns, direction, size, offset"). Whole-run
 * percentiles hide what a job does to the I/O running beside it; this window does not.
 */
export function latencyWindow(logPath: string, fromMs: number, toMs: number): LatencyStats {
  const lat: number[] = [];
  for (const line of readFileSync(logPath, 'utf8').split('\n')) {
    const comma = line.indexOf(',');
    if (comma < 0) continue;
    const t = Number(line.slice(0, comma));
    if (t < fromMs || t > toMs) continue;
    lat.push(Number(line.slice(comma + 1, line.indexOf(',', comma + 1))) / 1e6);
  }
  lat.sort((a, b) => a - b);
  return { n: lat.length, p50Ms: percentile(lat, 0.5), p99Ms: percentile(lat, 0.99), maxMs: lat.length ? lat[lat.length - 1]! : NaN };
}

export interface BackgroundFio {
  pid: number;
  /** Stop fio (SIGINT: it finishes in-flight I/O and writes its report); resolves with what it wrote. */
  stop(): Promise<{ writeBytes: number; writeIos: number }>;
}

/**
 * Start fio in the background with its JSON report going to `jsonPath`; `stop()` ends it
 * whenever the caller's work is done, which a fixed --runtime cannot do.
 */
export function startFio(args: string[], jsonPath: string): BackgroundFio {
  const p = spawn('fio', [...args, '--output-format=json', `--output=${jsonPath}`], { stdio: ['ignore', 'ignore', 'pipe'] });
  let err = '';
  p.stderr.on('data', (b) => { err = (err + b).slice(-4000); });
  const exited = new Promise<void>((resolve) => p.on('close', () => resolve()));
  return {
    pid: p.pid!,
    async stop() {
      if (p.exitCode === null && p.signalCode === null) p.kill('SIGINT');
      const t = setTimeout(() => p.kill('SIGKILL'), 15_000);
      await exited;
      clearTimeout(t);
      let job: { write: { io_bytes: number; total_ios: number } };
      try {
        job = JSON.parse(readFileSync(jsonPath, 'utf8').replace(/^[^{]*/, '')).jobs[0];
      } catch (e) {
        throw new Error(`fio ${args.join(' ')} left no JSON report (exit ${p.exitCode ?? p.signalCode}): ${err}`, { cause: e });
      }
      return { writeBytes: job.write.io_bytes, writeIos: job.write.total_ios };
    },
  };
}
