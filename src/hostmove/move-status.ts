// Where `vmshift status` finds a host move in progress: each end of a move serves its own
// status on a private control socket (0600 in a 0700 directory): the source in
// RUN_DIR/moves/<name>.sock, the destination beside its link agent's socket
// (AGENT_SOCKET.status, by default in RUN_DIR/links), answered live by the process that owns the facts: on the source, `vmshift migrate DOMAIN
// URI` (the move's phase, its link, libvirt's memory figures as it last polled them); on the
// destination, the link agent (its end of the link, the disks it prepared). The disks' copy
// progress is not here: the source shim's job owns it, and `vmshift status` asks vmshiftd for
// it beside this. Nothing is written to disk: a move whose process died has no socket that
// answers, and `listMoves` skips it (a stale socket is removed by the next listen).
import { readdir, rm } from 'node:fs/promises';
import { join } from 'node:path';
import { ControlServer } from '../control/server.ts';
import { controlCall } from '../control/client.ts';
import { ensureDir } from '../util/trusted-fs.ts';
import type { LinkStats } from '../link/link.ts';

export interface MoveStatus {
  role: 'source' | 'destination';
  /** The domain (libvirt), or the disks' names on the destination. */
  domain: string | null;
  peer: string;
  /** connecting, preparing, disk-copy, synchronized, memory, committing (source); prepared, committed (destination). */
  phase: string;
  startedAt: string;
  link: LinkStats | null;
  /** libvirt's job figures as the source last polled them (once a second), null before the memory phase. */
  memory: { processed: number; remaining: number; total: number; pct: number } | null;
  disks: Array<{ name: string; path?: string; socket: string }>;
}

const MOVES = 'moves';
const NAME_RE = /^[A-Za-z0-9_.%!~*'()-]{1,200}$/;
/** The destination's status socket sits beside its link agent's own socket, in the agent's 0700 directory. */
export const agentStatusSocket = (agentSocket: string) => `${agentSocket}.status`;

/** Serve `status` on `path` until `close()` (which removes the socket). */
async function serveStatus(path: string, status: () => MoveStatus): Promise<{ close: () => Promise<void> }> {
  const server = new ControlServer({ maxConnections: 8 });
  server.on('status', () => status());
  await server.listen(path);
  return { close: async () => { await server.close(); await rm(path, { force: true }); } };
}

/** The source end: RUN_DIR/moves/NAME.sock. */
export async function listenMoveStatus(runDir: string, name: string, status: () => MoveStatus): Promise<{ close: () => Promise<void> }> {
  if (!NAME_RE.test(name)) throw new Error(`move status: bad name ${name}`);
  await ensureDir(join(runDir, MOVES), { mode: 0o700 }, 'host move status sockets');
  return serveStatus(join(runDir, MOVES, `${name}.sock`), status);
}

/** The destination end: beside the link agent's socket. */
export function listenAgentStatus(agentSocket: string, status: () => MoveStatus): Promise<{ close: () => Promise<void> }> {
  return serveStatus(agentStatusSocket(agentSocket), status);
}

/**
 * Every move on this host whose process answers (within 2 s each): sources in RUN_DIR/moves,
 * destinations beside the link agents' sockets (default RUN_DIR/links).
 */
export async function listMoves(runDir: string, agentDirs: string[] = [join(runDir, 'links')]): Promise<MoveStatus[]> {
  const sockets: string[] = [];
  const dir = join(runDir, MOVES);
  for (const n of await readdir(dir).catch(() => [] as string[])) if (n.endsWith('.sock')) sockets.push(join(dir, n));
  for (const d of agentDirs) for (const n of await readdir(d).catch(() => [] as string[])) if (n.endsWith('.sock.status')) sockets.push(join(d, n));
  const answers = await Promise.all(sockets.map((p) => controlCall<MoveStatus>(p, 'status', {}, { timeoutMs: 2000 }).catch(() => null)));
  return answers.filter((a): a is MoveStatus => a !== null);
}

/** The phase of the source end, from the migration's events as they come. */
export function sourcePhase(phase: string, event: string): string {
  switch (event) {
    case 'connected': return 'preparing';
    case 'disk-progress': return phase === 'synchronized' || phase === 'memory' ? phase : 'disk-copy';
    case 'disks-synchronized': return 'synchronized';
    case 'progress': return 'memory';
    case 'committed': return 'committing';
    default: return phase;
  }
}
