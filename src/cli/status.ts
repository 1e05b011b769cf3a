// `vmshift status --socket PATH`: what a running shim is doing, from its control socket.
// `vmshift status` (no --socket): every shim and job vmshiftd owns, asked of the daemon, and
// every host move in progress here, asked of the process that runs its end (the source's
// `vmshift migrate DOMAIN URI`, the destination's link agent: src/hostmove/move-status.ts).
import type { Argv, ArgumentsCamelCase } from 'yargs';
import { controlCall } from '../control/client.ts';
import { controlSocketFor } from '../shim/shim.ts';
import { formatBytes } from '../util/size.ts';
import { printJson } from './output.ts';
import { callDaemon, daemonSocket, daemonSocketOption } from './daemon-client.ts';
import { listMoves, type MoveStatus } from '../hostmove/move-status.ts';
import { runDir } from '../daemon/defaults.ts';

interface StatusArgs {
  socket?: string;
  daemonSocket?: string;
  runDir?: string;
  agentSocketDir?: string;
  json: boolean;
}

export const statusCommand = {
  command: 'status',
  describe: 'Show every shim and job of vmshiftd, or one shim (--socket): backing, clients, bytes, dirty bytes, job',
  builder: (y: Argv) =>
    y
      .option('socket', { type: 'string', describe: 'the NBD socket of one shim (asks the shim itself, no daemon needed)' })
      .option('daemon-socket', daemonSocketOption)
      .option('run-dir', { type: 'string', describe: 'where host moves serve their status (default $VMSHIFT_RUN_DIR or /run/vmshift)' })
      .option('agent-socket-dir', { type: 'string', describe: 'where link agents listen here (the source\'s --peer-socket-dir; default RUN_DIR/links)' }),
  handler: async (argv: ArgumentsCamelCase<StatusArgs>) => {
    if (!argv.socket) return daemonStatus(argv);
    const ctl = controlSocketFor(argv.socket);
    const s = await controlCall<ShimStatus>(ctl, 'status', {}, { timeoutMs: 5000 });
    // The running job's phase and figures (a move to the peer shows "synchronized" here).
    const m = s.job ? await controlCall<{ job: JobSummary | null }>(ctl, 'migrate.status', {}, { timeoutMs: 5000 }).catch(() => null) : null;
    if (argv.json) return printJson(m?.job ? { ...s, migration: m.job } : s);
    const lines = [
      `socket:   ${s.socket} (export "${s.export}")`,
      `backing:  ${s.backing}${s.backing !== s.origin ? ` (moved from ${s.origin})` : ''}`,
      `size:     ${formatBytes(s.size)}${s.readOnly ? ', read-only' : ''}`,
      `clients:  ${s.nbd.clients} now, ${s.nbd.connectionsTotal} since start`,
      `traffic:  ${formatBytes(s.nbd.bytesRead)} read, ${formatBytes(s.nbd.bytesWritten)} written, ${s.nbd.requests} requests, ${s.nbd.errors} errors`,
    ];
    if (s.tracking) {
      lines.push(`dirty:    ${formatBytes(s.tracking.dirtyBytes)} (${s.tracking.writes} writes tracked)`);
      for (const h of s.tracking.hot ?? []) lines.push(`  hot:    ${formatBytes(h.offset)} +${formatBytes(h.length)}  ${Math.round(h.writes)} writes`);
    }
    if (s.stack) lines.push(`stack:    ${s.stack.join(' -> ')}`);
    const j = m?.job;
    lines.push(`job:      ${s.job ?? 'none'}${j ? `: ${j.phase} to ${j.to}, ${formatBytes(j.bytesCopied)} copied, ${formatBytes(j.mirroredBytes)} mirrored` : ''}`);
    process.stdout.write(lines.join('\n') + '\n');
  },
};

interface JobSummary {
  phase: string;
  to: string;
  bytesCopied: number;
  mirroredBytes: number;
}

interface ShimStatus {
  socket: string;
  export: string;
  origin: string;
  backing: string;
  size: number;
  readOnly: boolean;
  job: string | null;
  /** Top-down, each layer by its own name (older shims do not send it). */
  stack?: string[];
  nbd: { clients: number; connectionsTotal: number; bytesRead: number; bytesWritten: number; requests: number; errors: number };
  tracking: { dirtyBytes: number; writes: number; hot?: Array<{ offset: number; length: number; writes: number }> } | null;
}

interface DaemonShim {
  name: string;
  pid: number | null;
  source: string;
  socket: string;
  restarts: number;
  state: string;
  error: string | null;
  shim: ShimStatus | null;
  job: { running: boolean; job: JobView | null } | null;
}
interface JobView {
  phase: string;
  rate?: number;
  writes?: { p99Ms: number; maxMs: number; degradedWrites: number; laggingBytes: number } | null;
  /** A job resumed after its shim was restarted (src/migrate/resume-keeper.ts ResumeFigures). */
  resume?: { resumedFrom: number; copiedEverything: boolean; restartBytes: number; note: string | null } | null;
  pass: number;
  passDone: number;
  passTotal: number;
  bytesCopied: number;
  dirtyBytes: number;
  to: string;
  ok: boolean;
  error: { message: string } | null;
}

async function daemonStatus(argv: StatusArgs): Promise<void> {
  const [r, moves] = await Promise.all([
    callDaemon<{ shims: DaemonShim[] }>(daemonSocket(argv.daemonSocket), 'status', {}, { timeoutMs: 30_000 }),
    listMoves(runDir(argv.runDir), argv.agentSocketDir ? [argv.agentSocketDir] : undefined),
  ]);
  if (argv.json) return printJson({ ...r, moves });
  const out: string[] = moves.map(moveLine);
  if (!r.shims.length) out.push('vmshiftd owns no shims');
  for (const d of r.shims) {
    out.push(`${d.name}  ${d.state}  pid ${d.pid ?? '-'}${d.restarts ? ` (restarted ${d.restarts}x)` : ''}  ${d.socket}`);
    if (d.shim) {
      const s = d.shim;
      out.push(`  backing: ${s.backing}${s.backing !== s.origin ? ` (moved from ${s.origin})` : ''}, ${formatBytes(s.size)}, ${s.nbd.clients} clients`);
      if (s.tracking) out.push(`  dirty:   ${formatBytes(s.tracking.dirtyBytes)}`);
    } else if (d.error) {
      out.push(`  ${d.error}`);
    }
    const j = d.job?.job;
    if (j && d.job?.running) {
      out.push(`  job:     -> ${j.to} ${j.phase} pass ${j.pass} ${bar(j.passDone, j.passTotal)} ${formatBytes(j.bytesCopied)} copied${j.rate ? ` at ${formatBytes(j.rate)}/s` : ''}, dirty ${formatBytes(j.dirtyBytes)}`);
      const w = j.writes;
      if (w) out.push(`  writes:  p99 ${w.p99Ms} ms, max ${w.maxMs} ms${w.degradedWrites ? `; ${w.degradedWrites} answered here alone (peer unreachable), ${formatBytes(w.laggingBytes)} to copy again` : ''}`);
      const rs = j.resume;
      if (rs) out.push(`  resumed: after a shim restart, ${rs.copiedEverything ? `copying everything again (${rs.note ?? 'nothing proven on the peer'})` : `from ${formatBytes(rs.resumedFrom)}, ${formatBytes(rs.restartBytes)} written since the restart copied again`}`);
    }
    else if (j) out.push(`  last job: -> ${j.to} ${j.ok ? 'done' : `failed: ${j.error?.message ?? j.phase}`}`);
  }
  process.stdout.write(out.join('\n') + '\n');
}

/** A host move, as the process running its end here tells it. */
function moveLine(m: MoveStatus): string {
  const l = m.link;
  const link = l ? `link ${l.carrier}, ${l.reconnects} reconnects, ${formatBytes(l.resentBytes)} resent` : 'no link yet';
  const mem = m.memory ? `; memory ${m.memory.pct}% (${formatBytes(m.memory.processed)} of ${formatBytes(m.memory.total)}, ${formatBytes(m.memory.remaining)} left)` : '';
  const what = m.role === 'source' ? `move of ${m.domain} to ${m.peer}` : 'incoming move';
  const disks = m.disks.length ? `\n  disks:   ${m.disks.map((d) => `${d.name} ${d.path ?? ''} on ${d.socket}`).join(', ')}` : '';
  return `${what}: ${m.phase} since ${m.startedAt}; ${link}${mem}${disks}`;
}

/** A one-line progress bar for a job seen in a status snapshot. */
function bar(done: number, total: number, width = 20): string {
  const f = total > 0 ? Math.min(1, done / total) : 0;
  const n = Math.round(f * width);
  return `[${'#'.repeat(n)}${'.'.repeat(width - n)}] ${Math.round(f * 100)}%`;
}
