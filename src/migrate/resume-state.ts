// The resume state of a host move's disk job (handover 'peer'): what a source shim killed
// mid-copy and restarted needs to go on against the same peer shim instead of recopying. It
// lives beside the shim's state file (`<state>.resume.json`), written atomically
// (write-then-rename, synced) at intervals, and synchronously with the guest's I/O at the one
// moment that matters: before the first write answered by the source alone (the mirror
// degraded) is acknowledged.
//   copiedBelow  everything below it is on the peer: the first mirror pass copied it, and every
//                guest write there since was written to both hosts before it was acknowledged.
//                An older value is always safe (the resumed pass copies from it again).
//   touchedBelow the peer may hold data only below it (a fresh peer file reads as zeroes): it is
//                moved ahead of the copier in steps, durably BEFORE the copier writes past it,
//                so a resumed pass knows where holes must be written as zeroes.
//   restartedBy  the shim process that served the disk since the last job's state was written
//                (noteRestart, before it listens): its tracker holds every write since, and
//                only that process can resume without copying everything.
//   degraded     some acknowledged write may be on the source alone (the mirror degraded and
//                its catch-up has not completed): nothing below copiedBelow is proven on the
//                peer, and a resume copies everything again (holes written as zeroes).
// The argument is written down in docs/storage-migration.md ("A source shim killed mid-copy").
import { unlink } from 'node:fs/promises';
import { z } from 'zod';
import { readJsonIfExists, writeFileAtomic } from '../util/atomic-file.ts';

const ResumeSchema = z.object({
  version: z.literal(1),
  /** Identity: the job the mover (PeerDisks) started, the peer, and the peer's file and socket. */
  jobId: z.string().min(1),
  peer: z.string(),
  destination: z.string(),
  backing: z.string(),
  size: z.number().int().nonnegative(),
  copiedBelow: z.number().int().nonnegative(),
  touchedBelow: z.number().int().nonnegative(),
  degraded: z.boolean(),
  restartedBy: z.string().nullable(),
  /** Data bytes the job had copied when it wrote this (what a resume did not copy again). */
  dataBytes: z.number().int().nonnegative(),
  updatedAt: z.string(),
});
export type ResumeState = z.infer<typeof ResumeSchema>;
/** Who the job is: what a resume must name the same. */
export type ResumeIdentity = Pick<ResumeState, 'jobId' | 'peer' | 'destination' | 'backing' | 'size'>;

export function resumePath(statePath: string): string {
  return `${statePath}.resume.json`;
}

/** Why a resume cannot use the state: the code says whether to copy from zero or to refuse. */
export class ResumeRefused extends Error {
  override name = 'ResumeRefused';
  constructor(readonly code: 'no-resume-state' | 'resume-unreadable' | 'resume-mismatch', message: string) {
    super(message);
  }
}

/** The state the previous process left, checked against the job the mover asks to resume. */
export async function loadResumeState(path: string, want: ResumeIdentity): Promise<ResumeState> {
  const raw = await readJsonIfExists<unknown>(path).catch((e: Error) => { throw new ResumeRefused('resume-unreadable', e.message); });
  if (raw === undefined) throw new ResumeRefused('no-resume-state', `${path}: no resume state (the job never persisted one, or it ended)`);
  const parsed = ResumeSchema.safeParse(raw);
  if (!parsed.success) throw new ResumeRefused('resume-unreadable', `${path}: not a vmshift resume state: ${parsed.error.issues[0]?.message}`);
  const s = parsed.data;
  for (const k of ['jobId', 'peer', 'destination', 'backing', 'size'] as const) {
    if (s[k] !== want[k]) throw new ResumeRefused('resume-mismatch', `${path} belongs to another job: its ${k} is ${JSON.stringify(s[k])}, this one's ${JSON.stringify(want[k])}`);
  }
  if (s.copiedBelow > s.size) throw new ResumeRefused('resume-unreadable', `${path}: copiedBelow ${s.copiedBelow} is past the disk's end ${s.size}`);
  return s;
}

/** This process, as restartedBy names it. */
export const RESTART_TOKEN = `${process.pid}@${Date.now()}`;

/**
 * At a shim's start, before it serves anything: a resume state left by a job that died is
 * marked as served by this process from now on (its tracker then holds every write a resume
 * must copy again). A state some other process had marked already (it served writes no one
 * tracks any more, then died) is marked degraded: a resume copies everything. Returns what
 * was done, for the log; an unreadable state is left for the resume to refuse.
 */
export async function noteRestart(path: string): Promise<string | null> {
  const raw = await readJsonIfExists<unknown>(path).catch(() => undefined);
  if (raw === undefined) return null;
  const parsed = ResumeSchema.safeParse(raw);
  if (!parsed.success) return `left an unreadable resume state ${path}`;
  const s = parsed.data;
  const next: ResumeState = { ...s, degraded: s.degraded || s.restartedBy !== null, restartedBy: RESTART_TOKEN, updatedAt: new Date().toISOString() };
  await writeFileAtomic(path, JSON.stringify(next) + '\n');
  return `kept the state of job ${s.jobId} to ${s.destination} (in step below ${s.copiedBelow}${next.degraded ? ', degraded: a resume copies everything' : ''}) for a resume`;
}

export async function removeResumeState(path: string): Promise<void> {
  await unlink(path).catch((e: NodeJS.ErrnoException) => {
    if (e.code !== 'ENOENT') throw e;
  });
}

/**
 * Writes the state, one write at a time, each from the figures as they are when it starts
 * (so a write queued earlier can never put back an older `degraded`). `persist()` resolves
 * once a write that began after the call is durable.
 */
export class ResumeWriter {
  #chain: Promise<void> = Promise.resolve();
  #closed = false;
  writes = 0;

  constructor(readonly path: string, private readonly current: () => ResumeState) {}

  persist(): Promise<void> {
    const next = this.#chain.then(async () => {
      if (this.#closed) return;
      await writeFileAtomic(this.path, JSON.stringify(this.current()) + '\n');
      this.writes++;
    });
    this.#chain = next.catch(() => {});
    return next;
  }

  /** No more writes; the file is removed (the job ended: there is nothing to resume). */
  async remove(): Promise<void> {
    this.#closed = true;
    await this.#chain;
    await removeResumeState(this.path);
  }
}
