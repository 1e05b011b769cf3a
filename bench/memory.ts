// `npm run bench -- memory [--quick] [--rounds N] [--cut] [--no-faults] [--only REGEX] [--compare DIR]`: the tiny guest's memory moved
// between two hosts (network namespaces A and B, sshd in B, a directory both see), in one
// interleaved run, by
//   direct    QEMU's own stream over one TCP connection (socat in each namespace between
//             QEMU's unix sockets and TCP: QEMU itself runs in the root namespace)
//   openssh   an OpenSSH tunnel, `ssh -L SRC.sock:DST.sock` in A to sshd in B (Proxmox's
//             secure migration)
//   vmshift   `vmshift migrate --peer ssh://` (and tls:// where this branch has it), each
//             with and without --shared-dir
// for three guests: idle, and mode=dirty at two rates. Every system gets the same QEMU
// parameters (return-path on, downtime-limit 300 ms, max-bandwidth 1 GiB/s: the transport
// is the limit). Reported per row: wall time (the system's own setup included: vmshift's
// process start, SSH login and agent start), QEMU's total-time and downtime (source's
// query-migrate), the gap in the guest's VMSHIFT-DIRTY lines across the switch as seen on
// the two serial consoles (minus the guest's own line interval: its downtime as it sees it),
// bytes, and ratios to direct. Then faults (dirty-low guest): the carrying connection reset
// mid-stream (`ss -K` in A; direct fails, vmshift completes) and, with --cut, the network
// down for 40 s with the shared file (vmshift completes without waiting for it).
// `--only REGEX`: only the systems whose name matches (and direct, the baseline); `--compare
// DIR`: every vmshift row also with DIR/bin/vmshift (another built checkout), interleaved.
// Root only (namespaces, sshd); everything started is stopped by PID, namespaces removed.
import { existsSync, readFileSync, readdirSync, statSync } from 'node:fs';
import { join } from 'node:path';
import { bootGuest, ensureGuest, type Guest, type GuestParams } from '../test/helpers/guest.ts';
import { cleanupAll, run, waitForSocket } from '../test/helpers/proc.ts';
import { daemonInNs, jsonLinesInNs, linkState, makeCerts, resetConnections, startSshd, twoHosts, type Sshd, type TwoHosts } from '../test/helpers/hosts.ts';
import { QmpClient } from '../src/qemu/qmp.ts';
import { table } from './lib.ts';

const root = new URL('..', import.meta.url).pathname;
const defaultVmshift = join(root, 'bin/vmshift');
const MiB = 1024 * 1024;
const DOWNTIME_MS = 300;
const BANDWIDTH = 1024 * MiB;

interface Workload { name: string; mode: 'idle' | 'dirty'; params?: GuestParams }
const WORKLOADS: Workload[] = [
  { name: 'idle', mode: 'idle' },
  { name: 'dirty 8 MiB / 200 ms', mode: 'dirty', params: { mib: 8, delay: 200 } },
  { name: 'dirty 32 MiB / 0 ms', mode: 'dirty', params: { mib: 32, delay: 0 } },
];

export interface Vm { guest: Guest; qmp: string; lines: Array<{ t: number; n: number }> }

interface Outcome {
  ok: boolean;
  error?: string;
  wallMs: number;
  qemuMs: number | null;
  downtimeMs: number | null;
  bytes: number | null;
  /** Guest-seen gap across the switch minus its line interval (dirty guests only). */
  guestGapMs: number | null;
  link?: { reconnects: number; resentBytes: number; fromFileBytes: number; spilledBytes: number };
  /** vmshift: CPU ms of the CLI with its children (ssh) and of the peer's agent. */
  cpuMs?: { cli: number | null; agent: number | null };
}

interface Ctx { hosts: TwoHosts; sshd: Sshd; certs: string | null; n: number }

type Fault = null | { kind: 'reset' } | { kind: 'cut'; ms: number };

interface System {
  name: string;
  migrate(ctx: Ctx, src: Vm, dst: Vm, fault: Fault): Promise<Omit<Outcome, 'guestGapMs'>>;
}

/** Record when each VMSHIFT-DIRTY line reaches the host (the guest's counter, timed). */
export function watch(guest: Guest, qmp: string): Vm {
  const vm: Vm = { guest, qmp, lines: [] };
  let buf = '';
  guest.daemon.proc.stdout!.on('data', (b: Buffer) => {
    buf += b.toString('latin1');
    let i;
    while ((i = buf.indexOf('\n')) >= 0) {
      const m = /^VMSHIFT-DIRTY (\d+)\r?$/.exec(buf.slice(0, i));
      if (m) vm.lines.push({ t: performance.now(), n: Number(m[1]) });
      buf = buf.slice(i + 1);
    }
  });
  return vm;
}

function boot(ctx: Ctx, w: Workload, incoming: boolean): Vm {
  const qmp = join(ctx.hosts.dir, `q${++ctx.n}.qmp`);
  const guest = bootGuest({ mode: w.mode, params: w.params, qmpSocket: qmp, extraArgs: incoming ? ['-incoming', 'defer', '-S'] : [] });
  return watch(guest, qmp);
}

export async function qmp<T>(path: string, fn: (q: QmpClient) => Promise<T>): Promise<T> {
  const q = await QmpClient.connect(path, { connectTimeoutMs: 5000 });
  try { return await fn(q); } finally { await q.close(); }
}

export interface MigrateInfo { status?: string; 'total-time'?: number; downtime?: number; 'error-desc'?: string; ram?: { transferred?: number } }

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/**
 * Direct and OpenSSH: QEMU's own migration through `uri` (the socket a tunnel listens on in
 * A), destination listening on `dstSock`; the destination resumed once the source completed.
 * `fault` is applied from the poll loop once 8 MiB went.
 */
async function qemuMigrate(ctx: Ctx, src: Vm, dst: Vm, dstSock: string, tunnel: () => Promise<{ srcSock: string; stop(): Promise<void> }>, fault: Fault, t0: number) {
  const caps = { capabilities: [{ capability: 'return-path', state: true }] };
  await qmp(dst.qmp, async (q) => {
    await q.execute('migrate-set-capabilities', caps);
    await q.execute('migrate-incoming', { uri: `unix:${dstSock}` });
  });
  const t = await tunnel();
  try {
    return await qmp(src.qmp, async (q) => {
      await q.execute('migrate-set-capabilities', caps);
      await q.execute('migrate-set-parameters', { 'downtime-limit': DOWNTIME_MS, 'max-bandwidth': BANDWIDTH });
      await q.execute('migrate', { uri: `unix:${t.srcSock}` });
      let faulted = false;
      for (let i = 0; ; i++) {
        const info = await q.execute<MigrateInfo>('query-migrate');
        if (fault && !faulted && (info.ram?.transferred ?? 0) > 8 * MiB) {
          faulted = true;
          if (fault.kind === 'reset') await resetConnections(ctx.hosts.a, ctx.hosts.b);
          else { await linkState(ctx.hosts.b, false); setTimeout(() => void linkState(ctx.hosts.b, true), fault.ms); }
        }
        if (info.status === 'completed') break;
        if (info.status === 'failed' || info.status === 'cancelled' || i > 2400) {
          if (info.status !== 'failed') await q.execute('migrate_cancel').catch(() => {});
          const st = await q.execute<{ status: string }>('query-status');
          return { ok: false, error: `${info.status}: ${info['error-desc'] ?? 'timed out'} (source ${st.status})`, wallMs: performance.now() - t0, qemuMs: null, downtimeMs: null, bytes: null };
        }
        await sleep(50);
      }
      // With -S the destination stops once everything arrived; resume it as vmshift's commit does.
      await qmp(dst.qmp, async (d) => {
        for (let i = 0; i < 400; i++) {
          const st = await d.execute<{ status: string }>('query-status');
          if (st.status === 'paused') break;
          await sleep(25);
        }
        await d.execute('cont');
      });
      const info = await q.execute<MigrateInfo>('query-migrate');
      return { ok: true, wallMs: performance.now() - t0, qemuMs: info['total-time'] ?? null, downtimeMs: info.downtime ?? null, bytes: info.ram?.transferred ?? null };
    });
  } finally {
    await t.stop();
  }
}

const direct: System = {
  name: 'direct (QEMU over TCP)',
  async migrate(ctx, src, dst, fault) {
    const t0 = performance.now();
    const { hosts } = ctx;
    const dstSock = join(hosts.dir, `dst${ctx.n}.mig`);
    const srcSock = join(hosts.dir, `src${ctx.n}.mig`);
    const port = 40000 + Math.floor(Math.random() * 20000);
    return qemuMigrate(ctx, src, dst, dstSock, async () => {
      const b = daemonInNs(hosts.b, 'socat', [`TCP-LISTEN:${port},bind=${hosts.b.addr},reuseaddr`, `UNIX-CONNECT:${dstSock}`]);
      await waitTcp(ctx, port);
      const a = daemonInNs(hosts.a, 'socat', [`UNIX-LISTEN:${srcSock}`, `TCP:${hosts.b.addr}:${port}`]);
      await waitPath(srcSock, a);
      return { srcSock, stop: async () => { await a.stop(); await b.stop(); } };
    }, fault, t0);
  },
};

/** Wait for a tunnel's listening socket to appear, without connecting (a probe would be forwarded to the destination QEMU's one incoming connection). */
async function waitPath(path: string, d: { proc: { exitCode: number | null }; output(): string }): Promise<void> {
  for (let i = 0; i < 400 && !existsSync(path); i++) {
    if (d.proc.exitCode !== null) throw new Error(`tunnel exited before ${path} appeared: ${d.output()}`);
    await sleep(25);
  }
  if (!existsSync(path)) throw new Error(`${path} did not appear: ${d.output()}`);
}

/** Wait until B listens on `port` (checked with ss inside B: no connection that would take the one accept). */
async function waitTcp(ctx: Ctx, port: number): Promise<void> {
  for (let i = 0; i < 200; i++) {
    const r = await run('ip', ['netns', 'exec', ctx.hosts.b.ns, 'ss', '-Htln', `sport = :${port}`]);
    if (r.stdout.trim()) return;
    await sleep(25);
  }
  throw new Error(`nothing listens on ${port} in B`);
}

const openssh: System = {
  name: 'OpenSSH tunnel (ssh -L)',
  async migrate(ctx, src, dst, fault) {
    const t0 = performance.now();
    const { hosts, sshd } = ctx;
    const dstSock = join(hosts.dir, `dst${ctx.n}.mig`);
    const srcSock = join(hosts.dir, `src${ctx.n}.mig`);
    return qemuMigrate(ctx, src, dst, dstSock, async () => {
      const ssh = daemonInNs(hosts.a, 'ssh', ['-N', '-T', '-o', 'BatchMode=yes', '-o', 'ExitOnForwardFailure=yes', '-o', 'StrictHostKeyChecking=yes',
        '-o', `UserKnownHostsFile=${sshd.knownHosts}`, '-o', 'GlobalKnownHostsFile=/dev/null', '-i', sshd.identity, '-o', 'IdentitiesOnly=yes',
        '-p', String(sshd.port), '-L', `${srcSock}:${dstSock}`, `root@${hosts.b.addr}`]);
      await waitPath(srcSock, ssh);
      return { srcSock, stop: () => ssh.stop() };
    }, fault, t0);
  },
};

interface Event { event: string; [k: string]: unknown }

/** `vmshift link-agent --listen` in B on a random port, and the `--peer tls://` arguments that reach it. */
export async function tlsListener(hosts: TwoHosts, vmshift: string, certs: string, shared = false): Promise<{ listener: ReturnType<typeof daemonInNs>; peer: string[] }> {
  const port = 30000 + Math.floor(Math.random() * 10000);
  const listener = daemonInNs(hosts.b, vmshift, ['link-agent', '--listen', `${hosts.b.addr}:${port}`, '--tls-dir', certs,
    '--socket-dir', join(hosts.dir, 'tls-agent'), ...(shared ? ['--shared-dir', hosts.shared] : [])]);
  for (let i = 0; i < 400 && !listener.output().includes('listening'); i++) await sleep(25);
  return { listener, peer: ['--peer', `tls://${hosts.b.addr}:${port}`, '--tls-dir', certs] };
}

/** The CPU the newest agent in `dir` logged when it finished (src/link/agent.ts), in ms. */
async function agentCpuMs(dir: string): Promise<number | null> {
  if (!existsSync(dir)) return null;
  const logs = readdirSync(dir).filter((f) => f.endsWith('.log')).map((f) => join(dir, f)).sort((x, y) => statSync(y).mtimeMs - statSync(x).mtimeMs);
  for (let i = 0; i < 40 && logs.length; i++) {
    const m = /cpu: (\d+) ms/.exec(readFileSync(logs[0], 'utf8'));
    if (m) return Number(m[1]);
    await sleep(50);
  }
  return null;
}

/** `client`: the SSH client that carries the link (VMSHIFT_SSH_CLIENT); none = the default. */
function vmshiftSystem(carrier: 'ssh' | 'tls', shared: boolean, vmshift = defaultVmshift, tag = '', client?: 'ssh2' | 'openssh'): System {
  return {
    name: `vmshift ${carrier}${client ? ` (${client})` : ''}${shared ? ' + shared dir' : ''}${tag}`,
    async migrate(ctx, src, dst, fault) {
      const { hosts, sshd } = ctx;
      let listener: ReturnType<typeof daemonInNs> | null = null;
      let peer: string[];
      if (carrier === 'ssh') {
        peer = ['--peer', `ssh://root@${hosts.b.addr}:${sshd.port}`, '--identity', sshd.identity, '--known-hosts', sshd.knownHosts];
      } else {
        ({ listener, peer } = await tlsListener(hosts, vmshift, ctx.certs!, shared));
      }
      const t0 = performance.now();
      let faulted = false;
      const when: Record<string, number> = {};
      // bash's `time`: the CLI's CPU and its children's (an OpenSSH carrier's ssh processes).
      const r = await jsonLinesInNs<Event>(hosts.a, 'env', [`VMSHIFT_SSH_CLIENT=${client ?? ''}`, 'bash', '-c', 'TIMEFORMAT="VMSHIFT-CPU %U %S"; time "$@"', 'bash', vmshift, 'migrate', '--json', '--qmp', src.qmp, ...peer, '--dest-qmp', dst.qmp,
        '--peer-vmshift', vmshift, '--peer-socket-dir', join(hosts.dir, 'agent'), '--max-downtime', `${DOWNTIME_MS}ms`, '--bandwidth', String(BANDWIDTH),
        ...(shared ? ['--shared-dir', hosts.shared] : [])], {
        cwd: root, timeoutMs: 180_000,
        during: (e) => {
          const k = e.event === 'progress' ? `progress-${e.status}` : e.event;
          when[k] ??= Math.round(performance.now() - t0);
          if (!fault || faulted || e.event !== 'progress' || (e.transferred as number) <= 8 * MiB) return;
          faulted = true;
          if (fault.kind === 'reset') void resetConnections(hosts.a, hosts.b);
          else { void linkState(hosts.b, false); setTimeout(() => void linkState(hosts.b, true), fault.ms); }
        },
      });
      const wallMs = performance.now() - t0;
      await listener?.stop();
      const done = r.events.find((e) => e.event === 'done') as (Event & { link: Outcome['link'] }) | undefined;
      if (r.code !== 0 || !done) {
        const err = r.events.find((e) => 'error' in e) as { error?: { message: string } } | undefined;
        return { ok: false, error: err?.error?.message ?? `exit ${r.code}: ${r.stderr.slice(-300)}`, wallMs, qemuMs: null, downtimeMs: null, bytes: null };
      }
      const info = await qmp(src.qmp, (q) => q.execute<MigrateInfo>('query-migrate'));
      if (process.env.BENCH_VERBOSE) console.log(`  events at ms: ${JSON.stringify(when)}`);
      const t = /VMSHIFT-CPU ([\d.]+) ([\d.]+)/.exec(r.stderr);
      const cpuMs = { cli: t ? Math.round((Number(t[1]) + Number(t[2])) * 1000) : null, agent: carrier === 'ssh' ? await agentCpuMs(join(hosts.dir, 'agent')) : null };
      return { ok: true, wallMs, qemuMs: info['total-time'] ?? null, downtimeMs: info.downtime ?? null, bytes: info.ram?.transferred ?? null, link: done.link, cpuMs };
    },
  };
}

/** The guest's own view of the pause: last line on the source to first on the destination, minus its line interval. */
export function guestGap(src: Vm, dst: Vm): number | null {
  const before = src.lines, after = dst.lines;
  if (before.length < 3 || after.length < 1) return null;
  const last = before[before.length - 1];
  const intervals = before.slice(-4).map((l, i, a) => (i ? l.t - a[i - 1].t : 0)).slice(1).sort((x, y) => x - y);
  const interval = intervals[Math.floor(intervals.length / 2)];
  return Math.max(0, after[0].t - last.t - interval);
}

/** Wait for the destination's counter to go on (dirty guests), or a moment (idle). */
async function settle(w: Workload, dst: Vm): Promise<void> {
  if (w.mode !== 'dirty') return;
  for (let i = 0; i < 600 && dst.lines.length < 1; i++) await sleep(50);
}

async function ready(w: Workload, vm: Vm): Promise<void> {
  await vm.guest.waitFor(w.mode === 'dirty' ? /^VMSHIFT-DIRTY 3$/ : /^VMSHIFT-READY$/, 120_000);
}

function parseArgs(args: string[]) {
  const o = { quick: false, rounds: 2, cut: false, faults: true, compare: '', only: '' };
  for (let i = 0; i < args.length; i++) {
    if (args[i] === '--quick') { o.quick = true; o.rounds = 1; }
    else if (args[i] === '--rounds') o.rounds = Number(args[++i]);
    else if (args[i] === '--cut') o.cut = true;
    else if (args[i] === '--no-faults') o.faults = false;
    else if (args[i] === '--compare') o.compare = args[++i];
    else if (args[i] === '--only') o.only = args[++i];
    else throw new Error(`bench memory: unknown option ${args[i]} (--quick, --rounds N, --cut, --no-faults, --compare DIR, --only REGEX)`);
  }
  return o;
}

const cpuPerGiB = (ms: number | null, bytes: number) => (ms === null ? '-' : ((ms / 1000) * (1024 * MiB) / bytes).toFixed(2));
export const med = (v: number[]) => (v.length ? [...v].sort((a, b) => a - b)[Math.floor(v.length / 2)] : NaN);
const num = (v: number | null | undefined) => (v === null || v === undefined ? NaN : v);

export async function main(argv: string[]): Promise<void> {
  const o = parseArgs(argv);
  const load = async () => (await run('uptime', [])).stdout.trim();
  console.log(`load before: ${await load()}`);
  // TLS rows only where `vmshift migrate --peer tls://` exists (another branch adds it).
  const hasTls = readFileSync(join(root, 'src/cli/migrate-memory.ts'), 'utf8').includes('tls://');
  const vmshifts: Array<[string, string]> = [[defaultVmshift, ''], ...(o.compare ? [[join(o.compare, 'bin/vmshift'), ' [other]'] as [string, string]] : [])];
  const systems: System[] = [direct, openssh, ...vmshifts.flatMap(([bin, tag]) => [
    // Both SSH clients, interleaved: the default is whichever measures better (docs/link.md).
    vmshiftSystem('ssh', false, bin, tag, 'ssh2'), vmshiftSystem('ssh', false, bin, tag, 'openssh'), vmshiftSystem('ssh', true, bin, tag),
    ...(hasTls ? [vmshiftSystem('tls', false, bin, tag), vmshiftSystem('tls', true, bin, tag)] : [])])]
    .filter((sys) => !o.only || sys === direct || new RegExp(o.only).test(sys.name));
  if (!hasTls) console.log('note: this branch has no `vmshift migrate --peer tls://`: the TLS rows are not measured');
  try {
    await ensureGuest();
    const hosts = await twoHosts();
    const sshd = await startSshd(hosts.b, hosts.dir);
    const certs = hasTls ? await makeCerts(join(hosts.dir, 'certs'), hosts.b.addr) : null;
    const ctx: Ctx = { hosts, sshd, certs, n: 0 };
    const results = new Map<string, Outcome[]>();
    const workloads = o.quick ? [WORKLOADS[1]] : WORKLOADS;

    /** Move the guest from `cur` to a fresh destination with `sys`; returns the VM that now runs it. */
    const step = async (w: Workload, cur: Vm, sys: System, fault: Fault, key: string): Promise<Vm> => {
      const dst = boot(ctx, w, true);
      await waitForSocket(dst.qmp, dst.guest.daemon);
      const r = await sys.migrate(ctx, cur, dst, fault);
      let gap: number | null = null;
      if (r.ok) { await settle(w, dst); gap = guestGap(cur, dst); }
      if (r.ok && w.mode === 'dirty' && !dst.lines.length) {
        // The move "completed" but the guest never ran on B (its kernel crashed: the memory
        // arrived wrong). Counted as a failure; the source, in postmigrate, is resumed so
        // the run goes on (a benchmark may; vmshift itself never does this).
        r.ok = false;
        r.error = `the destination guest never ran (${dst.guest.daemon.proc.exitCode === null ? 'no counter line in 30 s' : 'it exited'}): ${dst.guest.daemon.output().split('\n').filter((l) => /panic|BUG|Oops|RIP/.test(l)).slice(0, 2).join(' / ')}`;
        await qmp(cur.qmp, (q) => q.execute('cont')).catch(() => {});
      }
      const out: Outcome = { ...r, guestGapMs: gap };
      (results.get(key) ?? results.set(key, []).get(key)!).push(out);
      console.log(`${key}: ${r.ok ? 'ok' : `FAILED ${r.error}`} wall ${Math.round(r.wallMs)} ms, qemu ${r.qemuMs} ms, downtime ${r.downtimeMs} ms, guest gap ${gap === null ? '-' : Math.round(gap)} ms, ${r.bytes === null ? '-' : (r.bytes / MiB).toFixed(0)} MiB${r.link ? `, link ${JSON.stringify(r.link)}` : ''}${r.cpuMs && r.bytes ? `, CPU s/GiB: cli ${cpuPerGiB(r.cpuMs.cli, r.bytes)} agent ${cpuPerGiB(r.cpuMs.agent, r.bytes)}` : ''}`);
      if (!r.ok) {
        // The source runs on; the destination QEMU exited or is quit.
        await dst.guest.stop();
        return cur;
      }
      await cur.guest.stop();
      return dst;
    };

    for (const w of workloads) {
      let cur = boot(ctx, w, false);
      await ready(w, cur);
      for (let round = 0; round < o.rounds; round++) {
        // Rotate the order each round: no system always follows the same one.
        const order = systems.map((_, i) => systems[(i + round) % systems.length]);
        for (const sys of order) {
          cur = await step(w, cur, sys, null, `${w.name} | ${sys.name}`);
          if (w.mode === 'dirty') await cur.guest.waitFor(new RegExp(`^VMSHIFT-DIRTY ${Math.max(...cur.lines.map((l) => l.n), 0) + 2}$`), 60_000);
        }
      }
      if (w === WORKLOADS[1] && o.faults) {
        for (const sys of [direct, vmshiftSystem('ssh', false)]) {
          cur = await step(w, cur, sys, { kind: 'reset' }, `${w.name}, reset mid-stream | ${sys.name}`);
          await cur.guest.waitFor(new RegExp(`^VMSHIFT-DIRTY ${Math.max(...cur.lines.map((l) => l.n), 0) + 2}$`), 60_000);
        }
        if (o.cut) {
          cur = await step(w, cur, vmshiftSystem('ssh', true), { kind: 'cut', ms: 40_000 }, `${w.name}, network down 40 s | vmshift ssh + shared dir`);
          // The network comes back 40 s after the cut; wait for it before anything else uses it.
          await sleep(41_000);
        }
      }
      await cur.guest.stop();
    }

    console.log(`\nload after: ${await load()}`);
    const rows: (string | number)[][] = [];
    for (const [key, rs] of results) {
      const ok = rs.filter((r) => r.ok);
      const [wl, sys] = key.split(' | ');
      const base = results.get(`${wl.split(',')[0]} | ${direct.name}`)?.filter((r) => r.ok) ?? [];
      const ratio = (f: (r: Outcome) => number) => (ok.length && base.length ? med(ok.map(f)) / med(base.map(f)) : NaN);
      rows.push([wl, sys, `${ok.length}/${rs.length}`, med(ok.map((r) => r.wallMs)) / 1000, med(ok.map((r) => num(r.qemuMs))) / 1000, med(ok.map((r) => num(r.downtimeMs))),
        med(ok.map((r) => num(r.guestGapMs))), med(ok.map((r) => num(r.bytes))) / MiB,
        ratio((r) => num(r.qemuMs)), ratio((r) => num(r.downtimeMs)),
        ok.length ? ok.map((r) => `${(r.wallMs / 1000).toFixed(1)}/${r.downtimeMs}`).join(' ') : rs.map((r) => r.error ?? '').join('; ').slice(0, 80)]);
    }
    console.log(table(['guest', 'system', 'ok', 'wall s', 'QEMU total s', 'downtime ms', 'guest gap ms', 'MiB sent', 'time / direct', 'downtime / direct', 'runs (wall s / downtime ms)'], rows));
  } finally {
    await cleanupAll();
  }
}
