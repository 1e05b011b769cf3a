// The job journal: a small durable note, written before the job creates a destination file,
// that lets a shim restarted after a crash (SIGKILL mid-job) remove that file when the
// switch-over never committed. It lives beside the shim's state file.
import { unlink } from 'node:fs/promises';
import { z } from 'zod';
import { readJsonIfExists, writeFileAtomic } from '../util/atomic-file.ts';

const JournalSchema = z.object({
  version: z.literal(1),
  dest: z.string(),
  created: z.boolean(),
  startedAt: z.string(),
});
export type Journal = z.infer<typeof JournalSchema>;

export function journalPath(statePath: string): string {
  return `${statePath}.migrate.json`;
}

export async function writeJournal(path: string, dest: string, created: boolean): Promise<void> {
  const j: Journal = { version: 1, dest, created, startedAt: new Date().toISOString() };
  await writeFileAtomic(path, JSON.stringify(j) + '\n');
}

export async function removeJournal(path: string): Promise<void> {
  await unlink(path).catch((e: NodeJS.ErrnoException) => {
    if (e.code !== 'ENOENT') throw e;
  });
}

/**
 * After a restart: a journal left behind means a job died. If the shim does not serve its
 * destination (no commit), remove the file the job created. Returns what was done, for the log.
 */
export async function recoverJournal(path: string, backing: string): Promise<string | null> {
  const raw = await readJsonIfExists<unknown>(path).catch(() => undefined);
  if (raw === undefined) return null;
  const parsed = JournalSchema.safeParse(raw);
  let note: string;
  if (!parsed.success) note = `ignored an unreadable migration journal ${path}`;
  else if (parsed.data.dest === backing) note = `a migration to ${parsed.data.dest} had committed before the shim stopped; serving it`;
  else if (parsed.data.created) {
    await unlink(parsed.data.dest).catch((e: NodeJS.ErrnoException) => {
      if (e.code !== 'ENOENT') throw new Error(`cannot remove ${parsed.data.dest} left by an interrupted migration: ${e.message}`);
    });
    note = `removed ${parsed.data.dest}, created by a migration that did not complete`;
  } else note = `a migration to ${parsed.data.dest} did not complete; the file was not created by it and is left alone`;
  await removeJournal(path);
  return note;
}
