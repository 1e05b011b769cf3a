// `npm run bench -- cache-codec [--file STREAM] [--keep FILE] [--mib M] [--budget SIZE_MiB] [--rounds N]`:
// what the memory cache's codec (src/relay/cache/) costs in CPU per GiB of QEMU's stream, on
// each end, in-process (no link, no second QEMU). A real stream: the tiny guest (256 MiB) in
// mode=redirty (a working set of `--mib` MiB, default 64, one byte in 64 changed each pass)
// recorded with `migrate exec:cat > FILE` (max-bandwidth 48 MiB/s, downtime-limit 1 ms for 6
// passes, as in docs/performance.md), or `--file` a stream recorded before. Then, per round:
//   encoder, compressing    CacheEncoder without a governor (every page through lz4)
//   decoder                 CacheDecoder on those frames
//   encoder, pass-through   the encoder turned down (pages go raw: the reader and RAW frames only)
//   decoder, pass-through
//   encoder, through        turned down for good (whole chunks as THRU frames, the reader skimming)
//   decoder, through
// in 64 KiB chunks (what QEMU's socket gives the relay), with the CPU time of this process
// (user+sys) and the wall time, and checks the sha256 of what the decoder gave back.
import { createHash } from 'node:crypto';
import { copyFileSync, existsSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { bootGuest, ensureGuest } from '../test/helpers/guest.ts';
import { cleanupAll, run, tempDir, waitForSocket } from '../test/helpers/proc.ts';
import { recordStream } from '../test/helpers/mig-streams.ts';
import { CacheEncoder } from '../src/relay/cache/encoder.ts';
import { CacheDecoder } from '../src/relay/cache/decoder.ts';
import { table } from './lib.ts';

const MiB = 1024 * 1024;
const GiB = 1024 * MiB;

interface Options { file: string | null; keep: string | null; mib: number; budget: number; rounds: number }

function parseArgs(args: string[]): Options {
  const o: Options = { file: null, keep: null, mib: 64, budget: 64, rounds: 3 };
  for (let i = 0; i < args.length; i++) {
    const a = args[i];
    if (a === '--file') o.file = String(args[++i]);
    else if (a === '--keep') o.keep = String(args[++i]);
    else if (a === '--mib') o.mib = Number(args[++i]);
    else if (a === '--budget') o.budget = Number(args[++i]);
    else if (a === '--rounds') o.rounds = Number(args[++i]);
    else throw new Error(`bench cache-codec: unknown option ${a} (--file STREAM, --keep FILE, --mib M, --budget MiB, --rounds N)`);
  }
  if (!(o.mib >= 1) || !(o.budget >= 1) || !(o.rounds >= 1)) throw new Error('bench cache-codec: --mib, --budget and --rounds must be positive');
  return o;
}

async function record(o: Options): Promise<string> {
  await ensureGuest();
  const dir = tempDir('vmshift-codec-');
  const qmp = join(dir, 'g.qmp');
  const g = bootGuest({ mode: 'redirty', params: { mib: o.mib }, qmpSocket: qmp });
  await g.waitFor(/^VMSHIFT-DIRTY 3$/, 240_000);
  await waitForSocket(qmp, g.daemon);
  const file = join(dir, 'redirty.mig');
  await recordStream(qmp, file, { parameters: { 'max-bandwidth': 48 * MiB, 'downtime-limit': 1 }, passes: 6 });
  await g.stop();
  if (o.keep) copyFileSync(file, o.keep);
  return file;
}

function* chunks(b: Buffer, size: number): Generator<Buffer> {
  for (let at = 0; at < b.length; at += size) yield b.subarray(at, Math.min(b.length, at + size));
}

interface Timed<T> { value: T; cpuMs: number; wallMs: number }
function timed<T>(f: () => T): Timed<T> {
  const c0 = process.cpuUsage(), t0 = performance.now();
  const value = f();
  const c = process.cpuUsage(c0);
  return { value, cpuMs: (c.user + c.system) / 1000, wallMs: performance.now() - t0 };
}

export async function main(argv: string[]): Promise<void> {
  const o = parseArgs(argv);
  const load = async () => (await run('uptime', [])).stdout.trim();
  try {
    if (o.file && !existsSync(o.file)) throw new Error(`bench cache-codec: --file ${o.file}: no such file`);
    const file = o.file ?? await record(o);
    const stream = readFileSync(file);
    const want = createHash('sha256').update(stream).digest('hex');
    console.log(`stream ${file}: ${(stream.length / MiB).toFixed(1)} MiB; budget ${o.budget} MiB; load before: ${await load()}`);
    const rows: (string | number)[][] = [];
    for (let round = 0; round < o.rounds; round++) {
      for (const mode of (process.env.CODEC_MODES ?? 'compressing,pass-through,through').split(',') as Array<'compressing' | 'pass-through' | 'through'>) {
        const enc = new CacheEncoder({ budget: o.budget * MiB, compress: mode === 'compressing' });
        if (mode === 'through') enc.setMode('through');
        const e = timed(() => {
          const out: Buffer[] = [];
          for (const c of chunks(stream, 64 * 1024)) for (const f of enc.encode(c)) out.push(f);
          for (const f of enc.finish()) out.push(f);
          return out;
        });
        const link = Buffer.concat(e.value);
        const dec = new CacheDecoder();
        const d = timed(() => {
          const out: Buffer[] = [];
          for (const c of chunks(link, 64 * 1024)) for (const b of dec.push(c)) out.push(b);
          if (dec.end()) throw dec.end()!;
          return out;
        });
        const h = createHash('sha256');
        for (const b of d.value) h.update(b);
        const got = h.digest('hex');
        const st = enc.stats();
        const perGiB = (ms: number) => (ms / 1000) * GiB / stream.length;
        rows.push([round + 1, mode, (link.length / MiB).toFixed(1), (link.length / stream.length).toFixed(2), st.hits, st.bypassedPages,
          perGiB(e.cpuMs).toFixed(2), (stream.length / MiB / (e.wallMs / 1000)).toFixed(0), perGiB(d.cpuMs).toFixed(2), (stream.length / MiB / (d.wallMs / 1000)).toFixed(0),
          got === want ? 'same' : 'DIFFERENT']);
      }
    }
    console.log(table(['round', 'encoder', 'link MiB', 'link / QEMU', 'hits', 'raw pages', 'encode CPU s/GiB', 'encode MiB/s', 'decode CPU s/GiB', 'decode MiB/s', 'sha256'], rows));
    console.log(`load after: ${await load()}`);
  } finally {
    await cleanupAll();
  }
}
