// CPU seconds per GiB at each end of a link, the two ends in two processes (as on two hosts),
// over loopback: a unix socket (the link's own cost: frames, acks, copies) or TCP+TLS (the
// same plus the TLS crypto), against the carrier alone (`raw`: the same bytes written to the
// bare socket or TLS socket and read on the far side). CPU time (process.cpuUsage) is what
// the machine's load skews least; wall time is reported but says mostly how busy it was.
// Run: node --import tsx bench/link-cpu.ts [rounds] [MiB]   (writes in 64 KiB pieces, as QEMU's stream arrives)
// LINKCPU_ONLY=REGEX runs only the matching rows; LINKCPU_PROF=DIR writes each end's --cpu-prof there.
import { spawn } from 'node:child_process';
import { createServer, connect, type Socket } from 'node:net';
import { join } from 'node:path';
import type { Duplex } from 'node:stream';
import { Link } from '../src/link/link.ts';
import { tlsDialer, listenTls } from '../src/link/tls-carrier.ts';
import { makeCerts } from '../test/helpers/hosts.ts';
import { cleanupAll, run, tempDir } from '../test/helpers/proc.ts';

const self = new URL(import.meta.url).pathname;
const PIECE = 64 * 1024;
type Carrier = 'unix' | 'tls';
type Kind = 'link' | 'raw';
interface EndResult { cpuMs: number; wallMs: number; bytes: number }

const out = (o: object) => process.stdout.write(`${JSON.stringify(o)}\n`);
const cpuMs = (c: NodeJS.CpuUsage) => (c.user + c.system) / 1000;
const tlsFiles = (dir: string, who: 'server' | 'client') => ({ ca: join(dir, 'ca-cert.pem'), cert: join(dir, `${who}-cert.pem`), key: join(dir, `${who}-key.pem`) });

/** The receiving end: count every byte to the end, then report this process's CPU since it started listening. */
async function receiver(kind: Kind, carrier: Carrier, dir: string, port: number): Promise<void> {
  const c0 = process.cpuUsage();
  let t0 = 0;
  const done = (bytes: number) => { out({ event: 'result', cpuMs: cpuMs(process.cpuUsage(c0)), wallMs: performance.now() - t0, bytes }); process.exit(0); };
  let link: Link | null = null;
  if (kind === 'link') {
    link = new Link({ link: 'cpu', migration: 'm1', role: 'b', peer: 'sender' });
    link.on('stream', (s: Duplex) => {
      let bytes = 0;
      s.on('data', (b: Buffer) => { if (!t0) t0 = performance.now(); bytes += b.length; });
      s.on('end', () => { s.end(); link!.finish().then(() => done(bytes), (e) => { out({ event: 'failed', message: String(e) }); process.exit(1); }); });
    });
  }
  const take = (sock: Duplex) => {
    if (link) { link.attach(sock); return; }
    let bytes = 0;
    sock.on('data', (b: Buffer) => { if (!t0) t0 = performance.now(); bytes += b.length; });
    sock.on('end', () => done(bytes));
  };
  if (carrier === 'tls') await listenTls({ host: '127.0.0.1', port, ...tlsFiles(dir, 'server') }, take);
  else await new Promise<void>((r) => createServer({ allowHalfOpen: true }, (s) => take(s)).listen(join(dir, `r${port}.sock`), r));
  out({ event: 'ready' });
}

/** The sending end: `mib` MiB in 64 KiB writes with backpressure, then the end (and, for the link, finish). */
async function sender(kind: Kind, carrier: Carrier, dir: string, port: number, mib: number): Promise<void> {
  const dial = carrier === 'tls'
    ? tlsDialer({ host: '127.0.0.1', port, ...tlsFiles(dir, 'client') })
    : () => new Promise<Duplex>((resolve, reject) => { const s: Socket = connect(join(dir, `r${port}.sock`), () => resolve(s)); s.once('error', reject); });
  const piece = Buffer.alloc(PIECE, 0x5a);
  const c0 = process.cpuUsage();
  let w: Duplex;
  let link: Link | null = null;
  if (kind === 'link') {
    link = new Link({ link: 'cpu', migration: 'm1', role: 'a', peer: 'receiver', dial });
    await new Promise((r) => link!.once('carrier', r));
    w = link.stream('bulk');
    w.resume();
  } else w = await dial();
  const t0 = performance.now();
  for (let i = 0; i < (mib * 1024 * 1024) / PIECE; i++) {
    if (!w.write(piece)) await new Promise((r) => w.once('drain', r));
  }
  w.end();
  if (link) await link.finish();
  else await new Promise((r) => w.once('close', r));
  out({ event: 'result', cpuMs: cpuMs(process.cpuUsage(c0)), wallMs: performance.now() - t0, bytes: mib * 1024 * 1024 });
  process.exit(0);
}

function child(args: string[], onReady?: () => void): Promise<EndResult> {
  return new Promise((resolve, reject) => {
    const p = spawn(process.execPath, [...(process.env.LINKCPU_PROF ? ['--cpu-prof', '--cpu-prof-dir', process.env.LINKCPU_PROF] : []), '--import', 'tsx', self, ...args], { stdio: ['ignore', 'pipe', 'inherit'] });
    let buf = '';
    let result: EndResult | null = null;
    p.stdout.on('data', (b: Buffer) => {
      buf += b;
      for (let i; (i = buf.indexOf('\n')) >= 0; buf = buf.slice(i + 1)) {
        const e = JSON.parse(buf.slice(0, i));
        if (e.event === 'ready') onReady?.();
        else if (e.event === 'result') result = e;
      }
    });
    p.on('exit', (code) => (result ? resolve(result) : reject(new Error(`${args.join(' ')} exited ${code}`))));
  });
}

async function once(kind: Kind, carrier: Carrier, dir: string, mib: number) {
  const port = 30000 + Math.floor(Math.random() * 20000);
  let ready!: () => void;
  const isReady = new Promise<void>((r) => { ready = r; });
  const recv = child(['recv', kind, carrier, dir, String(port)], ready);
  await isReady;
  const send = await child(['send', kind, carrier, dir, String(port), String(mib)]);
  const r = await recv;
  if (r.bytes !== send.bytes) throw new Error(`${kind} ${carrier}: sent ${send.bytes}, received ${r.bytes}`);
  return { send, recv: r };
}

const [role, ...rest] = process.argv.slice(2);
if (role === 'recv') await receiver(rest[0] as Kind, rest[1] as Carrier, rest[2], Number(rest[3]));
else if (role === 'send') await sender(rest[0] as Kind, rest[1] as Carrier, rest[2], Number(rest[3]), Number(rest[4]));
else {
  const rounds = Number(role ?? 3);
  const mib = Number(rest[0] ?? 1024);
  try {
    console.log(`load before: ${(await run('uptime', [])).stdout.trim()}`);
    const dir = tempDir('vmshift-linkcpu-');
    await makeCerts(dir, '127.0.0.1');
    const rows: Record<string, Array<{ s: number; r: number; mibps: number }>> = {};
    for (let i = 0; i < rounds; i++) {
      for (const carrier of ['unix', 'tls'] as Carrier[]) {
        for (const kind of ['raw', 'link'] as Kind[]) {
          if (process.env.LINKCPU_ONLY && !new RegExp(process.env.LINKCPU_ONLY).test(`${kind} over ${carrier}`)) continue;
          const { send, recv } = await once(kind, carrier, dir, mib);
          const gib = mib / 1024;
          (rows[`${kind} over ${carrier}`] ??= []).push({ s: send.cpuMs / 1000 / gib, r: recv.cpuMs / 1000 / gib, mibps: mib / (send.wallMs / 1000) });
        }
      }
    }
    const med = (v: number[]) => [...v].sort((a, b) => a - b)[Math.floor(v.length / 2)];
    console.log(`${mib} MiB per run, ${rounds} rounds, medians (runs)`);
    console.log('| path | sender CPU s/GiB | receiver CPU s/GiB | MiB/s |\n|---|---|---|---|');
    const f = (v: number[]) => `${med(v).toFixed(2)} (${v.map((x) => x.toFixed(2)).join(', ')})`;
    for (const [k, v] of Object.entries(rows)) console.log(`| ${k} | ${f(v.map((x) => x.s))} | ${f(v.map((x) => x.r))} | ${Math.round(med(v.map((x) => x.mibps)))} |`);
    console.log(`load after: ${(await run('uptime', [])).stdout.trim()}`);
  } finally {
    await cleanupAll();
  }
}
