// Shared benchmark plumbing: fio runs through the nbd engine, process RSS, tables.
import { spawn } from 'node:child_process';
import { readFileSync } from 'node:fs';

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
