// The migrate.* methods on a shim's control socket:
//   migrate.start  {to, mode, ...options, follow?}  start a job; with follow, stream its
//                  `phase`/`progress`/`end` events and answer with the result when it ends
//   migrate.watch  follow the running job (or get the last result)
//   migrate.status the running job's figures, or the last result
//   migrate.abort  stop the running job (rolls back unless already committed); answers
//                  with its result
//   migrate.handover a job started with handover 'peer' that holds its synchronized
//                  mirror: switch over (the peer's shim becomes the disk); answers with the result
//   migrate.insync {timeoutMs?} handover 'peer': answers once the peer holds every
//                  acknowledged write (after a cut, once the degraded mirror caught up)
//   migrate.resume {as start, jobId and destinationId required} this shim was restarted
//                  while a handover 'peer' job ran: go on from the state it persisted
//                  (resume-state.ts); emits `resumed` first. A state of another job is refused
//                  (resume-mismatch: the mover aborts the move); a missing or unreadable one
//                  makes the job copy everything again, holes written as zeroes
// A caller that disconnects stops watching; the job goes on (use migrate.abort to stop it),
// unless it started the job with abortOnDisconnect (then the job rolls back if not committed).
// On registration, a journal left by a job that died with the process is cleaned up.
import { z } from 'zod';
import { ControlError } from '../control/protocol.ts';
import type { CallContext, ControlServer } from '../control/server.ts';
import type { MovableDisk } from './disk.ts';
import { MigrationJob, type JobResult } from './job.ts';
import { DEFAULT_OPTIONS, type MigrateOptions } from './context.ts';
import { journalPath, recoverJournal } from './journal.ts';
import { checkDestinationFree } from './dest-in-use.ts';
import { isNbdUri } from '../block/open.ts';
import { loadResumeState, noteRestart, resumePath, ResumeRefused } from './resume-state.ts';
import type { ResumeStart } from './resume-keeper.ts';

const StartParams = z.object({
  to: z.string().min(1),
  mode: z.enum(['auto', 'precopy', 'mirror']).default(DEFAULT_OPTIONS.mode),
  maxDowntimeMs: z.number().nonnegative().default(DEFAULT_OPTIONS.maxDowntimeMs),
  bandwidth: z.number().int().nonnegative().default(DEFAULT_OPTIONS.bandwidth),
  tracker: z.enum(['bitmap', 'incremental', 'bloom']).default(DEFAULT_OPTIONS.tracker),
  heat: z.boolean().default(DEFAULT_OPTIONS.heat),
  maxPasses: z.number().int().min(1).max(1000).default(DEFAULT_OPTIONS.maxPasses),
  deleteSource: z.boolean().default(DEFAULT_OPTIONS.deleteSource),
  suspendQmp: z.string().min(1).optional(),
  chunkSize: z.number().int().min(64 * 1024).max(64 * 1024 * 1024).default(DEFAULT_OPTIONS.chunkSize),
  concurrency: z.number().int().min(1).max(64).default(DEFAULT_OPTIONS.concurrency),
  handover: z.enum(['local', 'peer']).default(DEFAULT_OPTIONS.handover),
  peer: z.string().min(1).max(256).optional(),
  destinationZero: z.boolean().default(false),
  degradeAfterMs: z.number().int().min(10).max(3_600_000).optional(),
  jobId: z.string().regex(/^[A-Za-z0-9_.:-]{1,128}$/).optional(),
  destinationId: z.string().min(1).max(4096).optional(),
  follow: z.boolean().default(false),
  /** Abort the job if this caller disconnects before the switch-over has committed. */
  abortOnDisconnect: z.boolean().default(false),
  /** Replace the contents of an existing destination that holds data. */
  overwrite: z.boolean().default(false),
});

interface Slot {
  job: MigrationJob | null;
  last: JobResult | null;
  /** What start-up recovery did about a job that died with the process, if anything. */
  recovered: string | null;
}

/**
 * Before the shim serves anything: mark a resume state a killed job left as this process's
 * (its tracker then holds every write a resume needs). serve.ts calls it before listening.
 */
export async function noteShimRestart(statePath: string): Promise<void> {
  const note = await noteRestart(resumePath(statePath)).catch((e: Error) => `cannot mark the resume state: ${e.message}`);
  if (note) process.stderr.write(`vmshift: ${note}\n`);
}

export async function registerMigrationMethods(disk: MovableDisk, control: ControlServer): Promise<void> {
  const slot: Slot = { job: null, last: null, recovered: null };
  if (!disk.readOnly) {
    slot.recovered = await recoverJournal(journalPath(disk.statePath), disk.backing);
    if (slot.recovered) process.stderr.write(`vmshift: ${slot.recovered}\n`);
  }
  const none = () => new ControlError('no-job', `${disk.label}: no migration is running`);

  const start = async (method: string, params: unknown, ctx: CallContext, resume: boolean) => {
    const parsed = StartParams.safeParse(params);
    if (!parsed.success) {
      const i = parsed.error.issues[0]!;
      throw new ControlError('bad-request', `${method}: ${i.path.join('.') || 'params'}: ${i.message}`);
    }
    const { follow: wantsFollow, abortOnDisconnect, overwrite, ...opts } = parsed.data;
    let from: ResumeStart | null = null;
    if (resume) {
      if (opts.handover !== 'peer' || !opts.jobId || !opts.destinationId) throw new ControlError('bad-request', `${method}: needs handover "peer", jobId and destinationId`);
      if (slot.job) throw new ControlError('busy', `${disk.label}: a migration is already running; nothing to resume`);
      from = await resumeFrom(resumePath(disk.statePath), { jobId: opts.jobId, peer: opts.peer ?? '', destination: opts.destinationId, backing: disk.backing, size: disk.gate.size });
    }
    if (opts.handover === 'peer' && (!isNbdUri(opts.to) || opts.mode !== 'mirror')) {
      throw new ControlError('bad-request', 'migrate.start: handover "peer" needs mode "mirror" and an NBD destination (the peer\'s shim)');
    }
    if (opts.destinationZero && opts.handover !== 'peer') throw new ControlError('bad-request', 'migrate.start: destinationZero is only for handover "peer"');
    if (opts.degradeAfterMs !== undefined && opts.handover !== 'peer') throw new ControlError('bad-request', 'migrate.start: degradeAfterMs is only for handover "peer"');
    if (!isNbdUri(opts.to)) await checkDestinationFree(opts.to, overwrite, disk.backing);
    const job = await MigrationJob.start(disk, opts as MigrateOptions, undefined, from);
    // The domain form's caller owns the job until the switch-over: a Ctrl-C'd, killed or
    // disconnected CLI (or a vmshiftd restart in between) leaves the disk on its source.
    // After the commit an abort does nothing: the move stands and vmshiftd records it.
    if (abortOnDisconnect) void ctx.closed.then(() => job.abort('the caller went away before the switch-over'));
    slot.job = job;
    void job.done.then((r) => {
      slot.last = r;
      if (slot.job === job) slot.job = null;
    });
    return wantsFollow ? follow(job, ctx) : job.snapshot();
  };
  control.on('migrate.start', (params, ctx) => start('migrate.start', params, ctx, false));
  control.on('migrate.resume', (params, ctx) => start('migrate.resume', params, ctx, true));

  control.on('migrate.watch', (_params, ctx) => {
    if (slot.job) return follow(slot.job, ctx);
    if (slot.last) return slot.last;
    throw none();
  });

  control.on('migrate.status', () => ({
    running: slot.job !== null,
    job: slot.job ? slot.job.snapshot() : slot.last,
    recovered: slot.recovered,
  }));

  control.on('migrate.handover', async () => {
    const job = slot.job;
    if (!job) throw none();
    job.handover();
    const result = await job.done;
    if (!result.ok) throw new ControlError(result.error?.code ?? 'failed', result.error?.message ?? 'handover failed');
    return result;
  });

  // Handover 'peer': answers once the peer holds every acknowledged write (a degraded mirror
  // caught up); asked before the peer's guest may run.
  control.on('migrate.insync', async (params) => {
    const job = slot.job;
    if (!job) throw none();
    const t = (params as { timeoutMs?: unknown } | undefined)?.timeoutMs;
    return job.untilInSync(typeof t === 'number' && t > 0 ? Math.min(t, 3_600_000) : 60_000);
  });

  control.on('migrate.abort', async () => {
    const job = slot.job;
    if (!job) throw none();
    job.abort();
    return job.done;
  });
}

/** Stream the job's events to this caller until it ends; a failed job answers with its error. */
async function follow(job: MigrationJob, ctx: CallContext): Promise<JobResult> {
  const unsubscribe = job.subscribe((event, data) => ctx.emit(event, data));
  void ctx.closed.then(unsubscribe);
  ctx.emit('phase', { phase: job.phase, pass: job.figures.pass });
  const result = await job.done;
  unsubscribe();
  if (!result.ok) throw new ControlError(result.error?.code ?? 'failed', result.error?.message ?? 'migration failed');
  return result;
}

/** The state to resume from; a missing or unreadable one: copy everything (null state); another job's: refused. */
async function resumeFrom(path: string, want: Parameters<typeof loadResumeState>[1]): Promise<ResumeStart> {
  try {
    return { state: await loadResumeState(path, want), note: null };
  } catch (e) {
    if (!(e instanceof ResumeRefused)) throw e;
    // Another job's state: this shim was not moving this disk to this peer file. Copying
    // anything now could only write a disk nobody asked for: refuse, the mover aborts.
    if (e.code === 'resume-mismatch') throw new ControlError('resume-mismatch', `${e.message}: not resumed; nothing was changed`);
    // No usable state: the peer's file may hold anything the old job wrote; a full copy that
    // writes holes as zeroes makes it the source again, whatever it held.
    return { state: null, note: `${e.message}: copying everything again` };
  }
}
