// Where a running `vmshift migrate` (memory) can be reached: one private control socket per
// source QEMU, RUN_DIR/memory/<sha256 of the QMP socket's real path, 16 hex>.sock (0600 in a
// 0700 directory). The migrating process stays the one source of truth about its migration
// (nothing is written anywhere else); the socket only lets `vmshift abort --qmp` ask it to
// roll back and hear the outcome, and, while it answers, refuses a second `vmshift migrate`
// of the same guest with a clear error. It goes when the process ends (a stale one left by a
// killed process is replaced: nothing answers on it).
import { createHash } from 'node:crypto';
import { realpathSync } from 'node:fs';
import { join, resolve } from 'node:path';
import { ControlServer } from '../control/server.ts';
import { ControlError } from '../control/protocol.ts';
import { controlCall } from '../control/client.ts';
import { ensureDir } from '../util/trusted-fs.ts';

export function migrationSocket(runDir: string, qmp: string): string {
  let real = resolve(qmp);
  try { real = realpathSync(real); } catch { /* not there (yet): the path as given */ }
  return join(runDir, 'memory', `${createHash('sha256').update(real).digest('hex').slice(0, 16)}.sock`);
}

export interface AbortOutcome {
  /** True: rolled back, the guest runs on the source. False: it had committed first. */
  aborted: boolean;
  message: string;
}

/**
 * Serve `abort` and `status` for the migration of `qmp` until `close()`. `abort()` must roll
 * the migration back if it has not committed yet and resolve with what happened.
 */
export async function listenMigration(runDir: string, qmp: string, h: { abort: () => Promise<AbortOutcome>; status: () => unknown }): Promise<{ path: string; close: () => Promise<void> }> {
  const path = migrationSocket(runDir, qmp);
  await ensureDir(join(runDir, 'memory'), { mode: 0o700 }, 'memory migration sockets');
  const server = new ControlServer({ maxConnections: 8 });
  server.on('status', () => h.status());
  server.on('abort', () => h.abort());
  await server.listen(path).catch((e: Error) => {
    if (/another server is listening/.test(e.message)) throw new ControlError('busy', `a migration of the guest at ${qmp} is already running (${path} answers); abort it with: vmshift abort --qmp ${qmp}`);
    throw e;
  });
  return { path, close: () => server.close() };
}

/** `vmshift abort --qmp`: ask the migration of `qmp` to roll back; resolves with the outcome. */
export async function abortMigration(runDir: string, qmp: string): Promise<AbortOutcome> {
  const path = migrationSocket(runDir, qmp);
  return controlCall<AbortOutcome>(path, 'abort', {}, { timeoutMs: 120_000 }).catch((e: ControlError) => {
    if (e.code === 'unreachable') throw new ControlError('no-migration', `no memory migration of ${qmp} is running here (nothing answers on ${path})`);
    throw e;
  });
}
