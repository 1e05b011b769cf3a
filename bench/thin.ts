// `npm run bench -- thin [--sizes 1T,4T] [--extents 64] [--extent-size 4M] [--rounds 1]`
// (`npm run bench -- thin --memory`: what dirty tracking costs on a 16 TiB disk, no copies):
// large, mostly empty raw disks (issue 11 section 2). Each source is a sparse file of the
// given virtual size holding `extents` data extents of `extent-size` spread evenly over it.
// In the same run, interleaved, per size and round:
//   - qemu-img convert -f raw -O raw SRC DST (what an operator would use offline);
//   - vmshift: `vmshift serve SRC` then `vmshift migrate-storage --to DST` (the job's own
//     duration, and the CLI's wall time including its start-up), the shim's peak RSS;
// then for each: the destination's allocated bytes, and `qemu-img compare` SRC DST.
// Targets: vmshift at most 1.5x qemu-img convert's time, shim RSS under 100 MiB, the
// destination as thin as the source.
import { openSync, closeSync, writeSync, ftruncateSync, statSync, rmSync, mkdirSync, writeFileSync } from 'node:fs';
import { randomFillSync } from 'node:crypto';
import { join } from 'node:path';
import { cleanupAll, run, runStatus, startDaemon, tempDir, waitForSocket } from '../test/helpers/proc.ts';
import { peakRssMiB, table } from './lib.ts';
import { formatBytes, parseSize } from '../src/util/size.ts';
import { jobGranularity, type JobResult } from '../src/migrate/job.ts';
import { setFlagsFromString } from 'node:v8';
import { runInNewContext } from 'node:vm';
import { BloomDirtySet, DirtyBitmap, HeatMap } from '../src/tracking/index.ts';

const root = new URL('..', import.meta.url).pathname;
const VMSHIFT = join(root, 'bin/vmshift');
const MiB = 2 ** 20;

interface Row {
  size: number;
  round: number;
  system: string;
  /** The copy's own time (vmshift: the job's duration; qemu-img: its wall time). */
  seconds: number;
  /** vmshift: the CLI's wall time, start-up included. */
  wallSeconds: number;
  allocatedBytes: number;
  equal: boolean;
  rssMiB: number;
  /** vmshift: the highest `rate` and the last `etaSeconds` progress reported, and how many events. */
  events?: number;
  maxRate?: number;
  error?: string;
}

function options(args: string[]) {
  const opt = (name: string) => {
    const i = args.indexOf(`--${name}`);
    return i >= 0 ? args[i + 1] : undefined;
  };
  return {
    sizes: (opt('sizes') ?? '1T,4T').split(',').map((s) => parseSize(s, '--sizes')),
    extents: Number(opt('extents') ?? 64),
    extentSize: parseSize(opt('extent-size') ?? '4M', '--extent-size'),
    rounds: Number(opt('rounds') ?? 1),
  };
}

/** A sparse file of `size` with `extents` runs of random data spread evenly over it. */
export function makeThinFile(path: string, size: number, extents: number, extentSize: number): void {
  const fd = openSync(path, 'w');
  try {
    ftruncateSync(fd, size);
    const buf = Buffer.alloc(extentSize);
    const stride = Math.floor(size / extents / MiB) * MiB;
    for (let i = 0; i < extents; i++) {
      randomFillSync(buf);
      // Offset a little within each stride so extents are not all aligned the same way.
      writeSync(fd, buf, 0, buf.length, i * stride + (i % 7) * MiB);
    }
  } finally {
    closeSync(fd);
  }
}

const allocated = (path: string) => statSync(path).blocks * 512;

async function compare(a: string, b: string): Promise<boolean> {
  const r = await runStatus('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', a, b]);
  return r.code === 0;
}

/** qemu-img convert's default cache mode is `unsafe` (no flush at the end); `-t writeback` flushes, as a migration must. */
async function qemuImg(src: string, dst: string, flush = false): Promise<Omit<Row, 'size' | 'round'>> {
  const t0 = performance.now();
  await run('qemu-img', ['convert', ...(flush ? ['-t', 'writeback'] : []), '-f', 'raw', '-O', 'raw', src, dst]);
  const seconds = (performance.now() - t0) / 1000;
  return { system: flush ? 'qemu-img convert -t writeback' : 'qemu-img convert', seconds, wallSeconds: seconds, allocatedBytes: allocated(dst), equal: await compare(src, dst), rssMiB: NaN };
}

let shimRuns = 0;

async function vmshift(dir: string, src: string, dst: string): Promise<Omit<Row, 'size' | 'round'>> {
  // A fresh socket (and so state file) per run: a shim's state names the backing it switched to.
  const socket = join(dir, `nbd${++shimRuns}`);
  const shim = startDaemon(VMSHIFT, ['serve', src, '--socket', socket]);
  try {
    await waitForSocket(`${socket}.ctl`, shim, 30_000);
    const t0 = performance.now();
    const r = await runStatus(VMSHIFT, ['migrate-storage', '--socket', socket, '--to', dst, '--json']);
    const wallSeconds = (performance.now() - t0) / 1000;
    const rssMiB = peakRssMiB(shim.pid);
    let result: JobResult | undefined;
    let events = 0, maxRate = 0;
    for (const line of r.stdout.split('\n')) {
      if (!line.startsWith('{')) continue;
      const msg = JSON.parse(line) as { result?: JobResult; event?: string; data?: { rate?: number } };
      if (msg.result) result = msg.result;
      if (msg.event === 'progress') {
        events++;
        maxRate = Math.max(maxRate, msg.data?.rate ?? 0);
      }
    }
    if (!result?.ok) throw new Error(`migrate-storage failed (exit ${r.code}): ${result?.error?.message ?? r.stderr.slice(-1000)}`);
    return {
      system: 'vmshift migrate-storage', seconds: result.durationMs / 1000, wallSeconds,
      allocatedBytes: allocated(dst), equal: await compare(src, dst), rssMiB, events, maxRate,
    };
  } finally {
    await shim.stop();
  }
}

const SIXTEEN_TIB = 16 * 2 ** 40;

/** The structures the job and the shim track with, as [name, factory, computed worst case in bytes]. */
function trackingKinds(): Array<[string, () => { mark(o: number, l: number): void; memoryBytes(): number }, number]> {
  const size = SIXTEEN_TIB, jobG = jobGranularity(size, 64 * 1024);
  // Worst case of a bitmap: every leaf allocated (1 KiB of bits, ~104 bytes of entry and object).
  const bitmapWorst = (g: number) => size / g / 8 + (size / g / 8192) * 104;
  return [
    [`bitmap at ${jobG / 1024} KiB (the job's grain; the shim's default --granularity)`, () => new DirtyBitmap(size, jobG), bitmapWorst(jobG)],
    ['bitmap at 4 KiB (shim --granularity 4K)', () => new DirtyBitmap(size, 4096), bitmapWorst(4096)],
    ['Bloom at 64 KiB (--tracker bloom, default sizing)', () => new BloomDirtySet(size, { granularity: 64 * 1024 }), NaN],
    ['heat map, 1 MiB regions (shim, --heat)', () => {
      const h = new HeatMap(size);
      return { mark: (o: number, l: number) => h.record(o, l), memoryBytes: () => h.memoryBytes() };
    }, (size / MiB / 256) * (1024 + 96)],
  ];
}

/** One structure after `writes` random 4 KiB writes, in this (fresh) process: accounted and measured bytes. */
function trackingCostOne(kind: number, writes: number): { accounted: number; measured: number } {
  setFlagsFromString('--expose-gc');
  const gc = runInNewContext('gc') as () => void;
  const used = () => {
    gc();
    const m = process.memoryUsage();
    return m.heapUsed + m.arrayBuffers;
  };
  const before = used();
  const set = trackingKinds()[kind]![1]();
  let seed = 12345;
  for (let i = 0; i < writes; i++) {
    seed = (Math.imul(seed, 1103515245) + 12345) >>> 0;
    set.mark(Math.floor((seed / 2 ** 32) * (SIXTEEN_TIB / 4096)) * 4096, 4096);
  }
  const measured = used() - before;
  return { accounted: set.memoryBytes(), measured };
}

/**
 * What tracking costs on a 16 TiB disk: each structure the job and the shim use, empty and
 * after N random 4 KiB writes, as accounted (memoryBytes) and as measured (heap and array
 * buffers after a full GC, each in a fresh process), beside the worst case (every leaf).
 */
async function trackingCosts(): Promise<string> {
  const rows: Array<Array<string | number>> = [];
  const MiBs = (n: number) => (Number.isNaN(n) ? 'fixed' : (n / MiB).toFixed(2));
  for (const [i, [name, , worst]] of trackingKinds().entries()) {
    for (const writes of [0, 1000, 10_000, 100_000]) {
      const r = await run(process.execPath, ['--import', 'tsx', join(root, 'bench/run.ts'), 'thin', '--memory-one', String(i), String(writes)], { cwd: root });
      const got = JSON.parse(r.stdout.trim().split('\n').pop()!) as { accounted: number; measured: number };
      rows.push([name, String(writes), MiBs(got.accounted), MiBs(Math.max(0, got.measured)), MiBs(worst)]);
    }
  }
  return table(['16 TiB disk: structure', 'random 4 KiB writes', 'accounted MiB', 'measured MiB (heap + buffers)', 'worst case MiB (computed)'], rows);
}

export async function main(args: string[]): Promise<void> {
  const one = args.indexOf('--memory-one');
  if (one >= 0) {
    process.stdout.write(`${JSON.stringify(trackingCostOne(Number(args[one + 1]), Number(args[one + 2])))}\n`);
    return;
  }
  if (args.includes('--memory')) {
    process.stdout.write(`${await trackingCosts()}\n`);
    return;
  }
  const o = options(args);
  const dir = tempDir('vmshift-bench-thin-');
  const rows: Row[] = [];
  const began = Date.now();
  try {
    for (const size of o.sizes) {
      const src = join(dir, 'src.raw');
      makeThinFile(src, size, o.extents, o.extentSize);
      const srcAlloc = allocated(src);
      for (let round = 0; round < o.rounds; round++) {
        // Interleaved, and the order alternates from round to round.
        const systems: Array<[string, (dst: string) => Promise<Omit<Row, 'size' | 'round'>>]> = [
          ['qemu-img convert', (dst) => qemuImg(src, dst)],
          ['qemu-img convert -t writeback', (dst) => qemuImg(src, dst, true)],
          ['vmshift migrate-storage', (dst) => vmshift(dir, src, dst)],
        ];
        if (round % 2 === 1) systems.reverse();
        for (const [name, sys] of systems) {
          const dst = join(dir, 'dst.raw');
          rmSync(dst, { force: true });
          process.stderr.write(`bench thin: ${formatBytes(size)} round ${round + 1}: ${name}...`);
          const row = await sys(dst).catch((e: Error) => ({
            system: name, seconds: NaN, wallSeconds: NaN, allocatedBytes: NaN, equal: false, rssMiB: NaN, error: e.message,
          }));
          rows.push({ size, round, ...row });
          process.stderr.write(` ${row.seconds.toFixed(2)} s${row.error ? `: ${row.error}` : ''}\n`);
          rmSync(dst, { force: true });
        }
      }
      process.stderr.write(`bench thin: source ${formatBytes(size)} holds ${formatBytes(srcAlloc)} allocated\n`);
      rmSync(src, { force: true });
    }
  } finally {
    await cleanupAll();
  }
  const median = (xs: number[]) => xs.sort((a, b) => a - b)[Math.floor(xs.length / 2)] ?? NaN;
  const out: Array<Array<string | number>> = [];
  for (const size of o.sizes) {
    const of = (name: string) => rows.filter((r) => r.size === size && r.system === name);
    const qs = median(of('qemu-img convert').map((r) => r.seconds));
    for (const name of ['qemu-img convert', 'qemu-img convert -t writeback', 'vmshift migrate-storage']) {
      const rs = of(name);
      const s = median(rs.map((r) => r.seconds));
      out.push([
        formatBytes(size), name, s, name.startsWith('vmshift') ? `${median(rs.map((r) => r.wallSeconds)).toFixed(2)}` : '-',
        `${(s / qs).toFixed(2)}x`, `${(median(rs.map((r) => r.allocatedBytes)) / MiB).toFixed(0)} MiB`,
        rs.every((r) => r.equal) ? 'equal' : 'DIFFER', name.startsWith('vmshift') ? median(rs.map((r) => r.rssMiB)) : '-',
        name.startsWith('vmshift') ? `${(median(rs.map((r) => r.maxRate ?? 0)) / MiB).toFixed(0)} MiB/s` : '-',
      ]);
    }
  }
  const text = `${table(['virtual size', 'system', 'copy s', 'CLI wall s', 'vs qemu-img', 'dest allocated', 'qemu-img compare', 'shim peak RSS MiB', 'reported rate (max)'], out)}\n\n` +
    `- ${o.extents} extents of ${formatBytes(o.extentSize)} of random data spread over each source; ${o.rounds} round(s), interleaved; medians\n` +
    `- warm: the source was just written; the destination did not exist; qemu-img's default (-t unsafe) does not flush, -t writeback and vmshift do\n- wall time of the whole run: ${((Date.now() - began) / 1000).toFixed(0)} s\n`;
  process.stdout.write(text);
  const stamp = new Date().toISOString().replace(/[:.]/g, '-');
  mkdirSync(join(root, 'bench/results'), { recursive: true });
  const file = join(root, 'bench/results', `thin-${stamp}.json`);
  writeFileSync(file, JSON.stringify({ options: o, rows }, null, 2));
  process.stderr.write(`bench thin: results in ${file}\n`);
}
