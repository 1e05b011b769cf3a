// A storage-migration job on one disk (a MovableDisk: disk.ts; a shim is one): checks and
// opens the destination, inserts its own Tracker -> Mirror -> source stack under the gate
// (src/block/stack.ts), runs the mode's phases, switches over (the strategy: switchover.ts),
// and reports. It runs inside the shim process; callers watch it through the control
// socket and may go away without stopping it. Any failure before the commit point puts the
// shim's original stack back, removes what the job created, and leaves the source as the
// disk; an abort is such a failure, on request.
import { unlink } from 'node:fs/promises';
import type { BlockDevice } from '../block/device.ts';
import type { Tracker } from '../block/tracker.ts';
import { MirrorFailedError, type Mirror } from '../block/mirror.ts';
import { migratingStack } from '../block/stack.ts';
import { isNbdUri } from '../block/open.ts';
import { BloomDirtySet } from '../tracking/bloom.ts';
import type { DirtySet } from '../tracking/dirty-set.ts';
import { ControlError } from '../control/protocol.ts';
import { Copier, CopyError } from './copier.ts';
import { RateLimiter } from './limiter.ts';
import { openDestination, discard, type Destination } from './destination.ts';
import { journalPath, writeJournal, removeJournal } from './journal.ts';
import { precopy } from './precopy.ts';
import { catchUp, copyAgain, mirrorPass, startMirroring, stopMirroring } from './selective.ts';
import { ResumeKeeper, type ResumeStart } from './resume-keeper.ts';
import { resumePath } from './resume-state.ts';
import { Tracker as TrackerLayer } from '../block/tracker.ts';
import { switchOver, swapToLocalFile, CommittedError, type Handover } from './switchover.ts';
import { JobCursors } from './cursors.ts';
import { handOverToPeer } from './peer-handover.ts';
import type { MovableDisk } from './disk.ts';
import { RATE_WINDOW_MS, type JobContext, type JobFigures, type JobPhase, type MigrateOptions } from './context.ts';

export interface JobResult extends JobFigures {
  ok: boolean;
  mode: MigrateOptions['mode'];
  tracker: MigrateOptions['tracker'];
  from: string;
  to: string;
  startedAt: string;
  durationMs: number;
  error: { code: string; message: string } | null;
}

/** `resumed`: once, at the start of a job resumed after its shim was restarted (figures.resume). */
export type JobListener = (event: 'progress' | 'phase' | 'end' | 'resumed', data: unknown) => void;

class AbortRequested extends Error {
  override name = 'AbortRequested';
  readonly code = 'aborted';
}

export class MigrationJob {
  readonly startedAt = new Date();
  readonly from: string;
  readonly figures: JobFigures = {
    phase: 'starting', pass: 0, passDone: 0, passTotal: 0, passDataBytes: null, passDataDone: 0, bytesCopied: 0, dataBytes: 0, zeroBytes: 0, skippedBytes: 0,
    mirroredBytes: 0, writes: null, rate: 0, passRate: 0, dirtyBytes: 0, etaSeconds: null, switchedToMirror: false, stallMs: null, stallParts: null, resume: null,
    savings: { incrementalSkippedWrites: 0, incrementalSkippedBytes: 0, heatDeferredBytes: 0, heatSavedBytes: 0, bloomBytes: null, bitmapBytes: null, bloomFalsePositiveRate: null },
  };
  readonly done: Promise<JobResult>;
  readonly #abort = new AbortController();
  #handoverAsked!: () => void;
  readonly #handoverRequest = new Promise<void>((r) => (this.#handoverAsked = r));
  readonly #listeners = new Set<JobListener>();
  #lastProgress = 0;
  #copier: Copier;
  /** (time, copier.stats.extentBytes) samples over the last RATE_WINDOW_MS, oldest first. */
  #samples: Array<[number, number]> = [];
  /** copier.stats.extentBytes when the current pass began. */
  #passBase = 0;
  #mirror: Mirror | null = null;
  /** Handover 'peer' with a job id: the state a restarted shim resumes from (resume-keeper.ts). */
  readonly #keeper: ResumeKeeper | null;
  readonly #resume: ResumeStart | null;

  private constructor(
    private readonly disk: MovableDisk,
    readonly opts: MigrateOptions,
    private readonly dest: Destination,
    private readonly release: () => void,
    private readonly journal: string,
    private readonly strategy: Handover,
    resume: ResumeStart | null,
  ) {
    this.from = disk.backing;
    this.#copier = new Copier(disk.bottom, dest.device, {
      chunkSize: opts.chunkSize,
      concurrency: opts.concurrency,
      limiter: new RateLimiter(opts.bandwidth),
      signal: this.#abort.signal,
    });
    this.#resume = resume;
    this.#keeper = opts.handover === 'peer' && opts.jobId && opts.destinationId
      ? new ResumeKeeper(resumePath(disk.statePath), { jobId: opts.jobId, peer: opts.peer ?? '', destination: opts.destinationId, backing: disk.backing, size: disk.gate.size },
        () => this.#mirror?.cursor ?? 0, () => this.#copier.stats.dataBytes, resume)
      : null;
    this.done = this.#run();
  }

  /**
   * Claim the disk, check and open the destination, and start; errors here are the caller's.
   * The switch-over's strategy defaults to swapping the disk onto the destination here.
   * `resume`: the shim was restarted mid-job; go on from what the old job persisted.
   */
  static async start(disk: MovableDisk, opts: MigrateOptions, handover?: (dest: Destination) => Handover, resume: ResumeStart | null = null): Promise<MigrationJob> {
    if (disk.readOnly) throw new ControlError('read-only', `${disk.label}: the shim serves its disk read-only; nothing to migrate live`);
    const release = disk.claim('migrate-storage');
    const journal = journalPath(disk.statePath);
    try {
      const facts = { backing: disk.backing, sockets: disk.sockets, size: disk.gate.size, caps: disk.gate.caps };
      const dest = await openDestination(opts.to, facts, (path) => writeJournal(journal, path, true));
      if (opts.destinationZero) dest.initiallyZero = true;
      const strategy = handover ?? (opts.handover === 'peer' ? (d: Destination) => handOverToPeer(disk, d, opts.peer ?? 'the peer') : (d: Destination) => swapToLocalFile(disk, d));
      return new MigrationJob(disk, opts, dest, release, journal, strategy(dest), resume);
    } catch (e) {
      await removeJournal(journal).catch(() => {});
      release();
      throw e;
    }
  }

  get phase(): JobPhase {
    return this.figures.phase;
  }

  /** Handover 'peer': the synchronized mirror may end; switch over now (or once synchronized). */
  handover(): void {
    if (this.opts.handover !== 'peer') throw new ControlError('bad-request', 'migrate.handover: this job swaps to a local destination; it switches over on its own');
    this.#handoverAsked();
  }

  /** Ask the job to stop; it rolls back unless the switch-over has already committed. */
  abort(reason = 'aborted by request'): void {
    this.#abort.abort(new AbortRequested(reason));
  }

  subscribe(fn: JobListener): () => void {
    this.#listeners.add(fn);
    return () => this.#listeners.delete(fn);
  }

  snapshot(): JobResult {
    this.#sync();
    return {
      ...structuredClone(this.figures),
      ok: this.figures.phase === 'done',
      mode: this.opts.mode,
      tracker: this.opts.tracker,
      from: this.from,
      to: this.dest.spec,
      startedAt: this.startedAt.toISOString(),
      durationMs: Date.now() - this.startedAt.getTime(),
      error: null,
    };
  }

  #emit(event: 'progress' | 'phase' | 'end' | 'resumed', data: unknown): void {
    for (const fn of this.#listeners) {
      try {
        fn(event, data);
      } catch {
        // A watcher's failure is not the job's.
      }
    }
  }

  #sync(): void {
    const s = this.#copier.stats, f = this.figures;
    if (this.#mirror) {
      const m = this.#mirror.stats();
      f.mirroredBytes = m.mirroredBytes;
      f.writes = { count: m.writes, maxMs: m.writeMaxMs, p99Ms: m.writeP99Ms, degradedWrites: m.degradedWrites, laggingBytes: m.laggingBytes };
    }
    f.dataBytes = s.dataBytes;
    f.zeroBytes = s.zeroBytes;
    f.skippedBytes = s.skippedBytes;
    f.bytesCopied = this.#copier.writtenBytes;
    f.passDataDone = s.extentBytes - this.#passBase;
    // The rate over a moving window of data copied: holes jumped over are not progress.
    const now = performance.now(), samples = this.#samples;
    if (samples.length === 0 || now - samples[samples.length - 1]![0] >= 100) samples.push([now, s.extentBytes]);
    while (samples.length > 2 && now - samples[1]![0] > RATE_WINDOW_MS) samples.shift();
    const [t0, b0] = samples[0]!;
    // At least a second of samples: over a shorter span one chunk or a token bucket's burst
    // reads as many times the real rate.
    if (now - t0 >= 1000) f.rate = (s.extentBytes - b0) / ((now - t0) / 1000);
    f.etaSeconds = f.rate > 0 && f.passDataBytes !== null ? Math.max(0, f.passDataBytes - f.passDataDone) / f.rate : null;
  }

  async #run(): Promise<JobResult> {
    const { disk, opts, dest } = this;
    const gate = disk.gate;
    // Our own stack under the gate: the tracker kind is the job's choice, and the mirror
    // layer is in place (inactive) so auto can start mirroring without another swap. Both
    // read the job's cursors; only the phases move them.
    const cursors = new JobCursors();
    const granularity = jobGranularity(gate.size, disk.granularity);
    const keeper = this.#keeper;
    const { tracker, mirror } = migratingStack(disk.bottom, dest.device, { kind: opts.tracker === 'bloom' ? 'bloom' : 'bitmap', granularity, heat: opts.heat, cursors, degradeAfterMs: opts.degradeAfterMs, onDegrade: keeper?.onDegrade });
    this.#mirror = mirror;
    let original: BlockDevice | null = null;
    let committed = false;
    const ctx: JobContext = {
      opts, gate, tracker, mirror, cursors, copier: this.#copier, dest, size: gate.size, granularity,
      signal: this.#abort.signal, figures: this.figures,
      setPhase: (phase) => {
        this.figures.phase = phase;
        this.#emit('phase', { phase, pass: this.figures.pass });
        ctx.progress(true);
      },
      startPass: (pass, total, dataBytes) => {
        const f = this.figures;
        f.pass = pass;
        f.passTotal = total;
        f.passDone = 0;
        f.passDataBytes = dataBytes;
        this.#passBase = this.#copier.stats.extentBytes;
      },
      progress: (force = false) => {
        const now = Date.now();
        if (!force && now - this.#lastProgress < 200) return;
        this.#lastProgress = now;
        this.#sync();
        this.#emit('progress', { ...this.figures, savings: undefined });
      },
      noteSet: (set: DirtySet) => this.#noteSet(set),
      destZeroFrom: keeper?.zeroFrom ?? 0,
      willWrite: (end) => keeper?.willWrite(end),
    };
    try {
      // Give the first tick a chance: the caller gets its answer (job started) first.
      await new Promise((r) => setImmediate(r));
      // A resume needs the writes the shim served since its restart: its own tracker has them.
      let sinceRestart: DirtySet | null = null;
      await gate.pause();
      try {
        original = gate.swap(tracker);
        if (this.#resume && keeper && !keeper.copiesEverything) sinceRestart = original instanceof TrackerLayer && original.dirty ? original.swap() : null;
      } finally {
        gate.resume();
      }
      if (keeper) {
        if (this.#resume && !keeper.copiesEverything && !sinceRestart) keeper.copyEverything('the shim tracks no writes (--track none): what it served since its restart is unknown');
        await keeper.start((e) => this.#emit('progress', { warning: `resume state: ${e.message}` }));
        ctx.destZeroFrom = keeper.zeroFrom;
      }
      let carry: DirtySet[] = [];
      if (opts.mode === 'mirror') {
        const restart = await startMirroring(ctx, sinceRestart ? [sinceRestart] : null, keeper?.resumedFrom ?? 0);
        if (this.#resume && keeper) {
          this.figures.resume = keeper.figures(restart?.reduce((n, set) => n + set.dirtyBytes(), 0) ?? 0, keeper.note ?? this.#resume.note);
          this.#emit('resumed', this.figures.resume);
        }
        keeper?.fullPass(true);
        await mirrorPass(ctx, null);
        keeper?.fullPass(false);
        // Only now the writes served between the restart and the resume (the full pass must
        // never run after a pass that moved the cursor back: it skips holes as zeroes).
        if (restart) await copyAgain(ctx, () => restart);
        keeper?.initialCopyDone();
        await catchUp(ctx);
        keeper?.caughtUp(mirror.degraded);
        if (opts.handover === 'peer') await this.#holdSynchronized(ctx);
        else await stopMirroring(ctx);
      } else {
        const outcome = await precopy(ctx);
        if (outcome.kind === 'diverging') {
          this.figures.switchedToMirror = true;
          const sets = await startMirroring(ctx, outcome.carry);
          await mirrorPass(ctx, sets);
          await stopMirroring(ctx);
        } else carry = outcome.carry;
      }
      const sw = await switchOver(ctx, this.strategy, carry);
      committed = true;
      // The old source device is no longer below the gate; close it, and delete it if asked.
      await sw.old.close().catch(() => {});
      if (opts.deleteSource && !isNbdUri(this.from)) await unlink(this.from).catch(() => {});
      await removeJournal(this.journal).catch(() => {});
      await keeper?.end().catch(() => {});
      this.figures.phase = 'done';
      return this.#finish(null);
    } catch (e) {
      if (e instanceof CommittedError) {
        committed = true;
        gate.resume();
      }
      const error = this.#describe(e);
      if (!committed) await this.#rollback(original, tracker, mirror);
      await keeper?.end().catch(() => {});
      this.figures.phase = this.#abort.signal.aborted && !committed ? 'aborted' : 'failed';
      return this.#finish(error);
    } finally {
      this.release();
    }
  }

  /**
   * Handover 'peer': the mirror stays on (every guest write is acknowledged once both hosts
   * have it) until the caller asks for the handover, typically once the memory phase ended.
   * A degraded mirror (the peer was cut off) catches up first, whenever the link is back, and
   * before the handover.
   */
  async #holdSynchronized(ctx: JobContext): Promise<void> {
    for (;;) {
      await catchUp(ctx);
      this.#keeper?.caughtUp(ctx.mirror.degraded);
      ctx.setPhase('synchronized');
      const why = await this.#waitSynchronized(ctx);
      if (why === 'handover' && !ctx.mirror.degraded) return;
    }
  }

  /** Until the handover is asked for or the mirror degrades; an abort or a failed destination throws. */
  async #waitSynchronized(ctx: JobContext): Promise<'handover' | 'degraded'> {
    let tick: NodeJS.Timeout | undefined;
    // An abort, or the destination failing a mirrored write, ends the wait: the job rolls back.
    const ended = new Promise<'degraded'>((resolve, reject) => {
      const signal = this.#abort.signal;
      if (signal.aborted) reject(signal.reason);
      signal.addEventListener('abort', () => reject(signal.reason), { once: true });
      tick = setInterval(() => {
        if (ctx.mirror.error) reject(ctx.mirror.error);
        else if (ctx.mirror.degraded) resolve('degraded');
        ctx.progress();
      }, 250);
    });
    try {
      return await Promise.race([this.#handoverRequest.then(() => 'handover' as const), ended]);
    } finally {
      clearInterval(tick);
      if (ctx.mirror.error) throw ctx.mirror.error;
    }
  }

  /**
   * Handover 'peer': resolves once the peer holds every acknowledged write (the job is
   * synchronized and its mirror not degraded); rejects if the job ends or `timeoutMs` passes.
   */
  async untilInSync(timeoutMs: number): Promise<JobResult> {
    const deadline = Date.now() + timeoutMs;
    let ended: JobResult | null = null;
    void this.done.then((r) => { ended = r; });
    for (;;) {
      if (ended) throw new ControlError((ended as JobResult).error?.code ?? 'failed', (ended as JobResult).error?.message ?? 'the job ended before it was in sync');
      if (this.figures.phase === 'synchronized' && this.#mirror && !this.#mirror.degraded && this.#mirror.settled) return this.snapshot();
      if (Date.now() > deadline) throw new ControlError('timeout', `${this.from}: not in sync with ${this.dest.spec} after ${Math.round(timeoutMs / 1000)} s (phase ${this.figures.phase}, ${this.figures.writes?.laggingBytes ?? 0} bytes lagging)`);
      await new Promise((r) => setTimeout(r, 50));
    }
  }

  /** Put the shim's own stack back on the source and undo what the job created. */
  async #rollback(original: BlockDevice | null, tracker: Tracker, mirror: Mirror): Promise<void> {
    const gate = this.disk.gate;
    mirror.stop();
    await gate.pause();
    try {
      if (original && gate.next === tracker) gate.swap(original);
    } finally {
      gate.resume();
    }
    await discard(this.dest).catch((e) => this.#emit('progress', { warning: (e as Error).message }));
    await removeJournal(this.journal).catch(() => {});
  }

  #finish(error: JobResult['error']): JobResult {
    const result = { ...this.snapshot(), ok: error === null, error };
    this.#emit('end', result);
    return result;
  }

  /** A message that names what failed and says the guest is still on the source. */
  #describe(e: unknown): { code: string; message: string } {
    const stay = `the disk stays on ${this.from}`;
    if (e instanceof AbortRequested) return { code: 'aborted', message: `migration to ${this.dest.spec} aborted during ${this.#phaseName()}: ${stay}` };
    if (e instanceof CommittedError) return { code: e.code, message: e.message };
    const cause = e instanceof Error ? e.message : String(e);
    if (e instanceof CopyError && e.side === 'destination') {
      if (e.errno === 'ENOSPC') return { code: 'destination-full', message: `destination ${this.dest.spec} is out of space (${cause}): ${stay}` };
      return { code: 'destination-failed', message: `destination ${this.dest.spec} failed during ${this.#phaseName()}: ${cause}: ${stay}` };
    }
    if (e instanceof CopyError) return { code: 'source-failed', message: `reading the source failed during ${this.#phaseName()}: ${cause}: ${stay}` };
    if (e instanceof MirrorFailedError) return { code: e.code, message: `${cause}: ${stay}` };
    return { code: 'failed', message: `migration to ${this.dest.spec} failed during ${this.#phaseName()}: ${cause}: ${stay}` };
  }

  #phaseName(): string {
    const f = this.figures;
    return f.phase === 'precopy' ? `pre-copy pass ${f.pass}` : f.phase === 'mirror' ? 'the mirror pass' : f.phase === 'catching-up' ? 'the catch-up after a cut' : f.phase === 'synchronized' ? 'the synchronized mirror' : f.phase;
  }

  #noteSet(set: DirtySet): void {
    if (!(set instanceof BloomDirtySet)) return;
    const s = this.figures.savings;
    s.bloomBytes = set.memoryBytes();
    s.bitmapBytes = Math.ceil(set.blocks / 32) * 4;
    s.bloomFalsePositiveRate = Math.max(s.bloomFalsePositiveRate ?? 0, set.estimatedFalsePositiveRate());
  }
}

/**
 * The job tracks at a finer grain than the shim: a guest's 4 KiB write marked at 64 KiB
 * costs 64 KiB in every later pass (measured: 1.12-1.27x the disk at 8-32 MiB/s of 4k Zipf
 * writes). 4 KiB while the bitmap stays within 1 MiB (disks up to 32 GiB), coarser above,
 * never coarser than the shim's own granularity.
 */
export function jobGranularity(size: number, shimGranularity: number): number {
  let g = 4096;
  while (g < shimGranularity && size / g > 8 * 1024 * 1024) g *= 2;
  return g;
}
