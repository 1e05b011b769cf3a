// What the phases of a storage migration (precopy, selective mirroring, switch-over) share:
// the stack they act on, the copier, the options, and the job's running figures.
import type { Gate } from '../block/gate.ts';
import type { Tracker } from '../block/tracker.ts';
import type { Mirror } from '../block/mirror.ts';
import type { DirtySet } from '../tracking/dirty-set.ts';
import type { Copier } from './copier.ts';
import type { JobCursors } from './cursors.ts';
import type { Destination } from './destination.ts';
import type { ResumeFigures } from './resume-keeper.ts';

export type MigrateMode = 'auto' | 'precopy' | 'mirror';
export type TrackerChoice = 'bitmap' | 'incremental' | 'bloom';
/** `synchronized`: (handover 'peer' only) every guest write reaches both hosts; waiting for migrate.handover. */
/** `catching-up`: the mirror was degraded (the peer was unreachable) and copies again what it missed. */
export type JobPhase = 'starting' | 'precopy' | 'mirror' | 'catching-up' | 'synchronized' | 'switchover' | 'done' | 'failed' | 'aborted';

export interface MigrateOptions {
  /** Destination: absolute file path or NBD URI. */
  to: string;
  mode: MigrateMode;
  /** The I/O stall the switch-over may take, in ms (default 50). */
  maxDowntimeMs: number;
  /** Copy rate limit in bytes/s; 0 = unlimited. Guest writes mirrored are not limited. */
  bandwidth: number;
  tracker: TrackerChoice;
  /** Leave regions the guest keeps rewriting for the final pass. */
  heat: boolean;
  /** Pre-copy passes after the first before giving up converging (default 8). */
  maxPasses: number;
  /** Remove the old source file after a successful switch-over. */
  deleteSource: boolean;
  /** Pause the guest through this QMP socket during the switch-over instead of only holding I/O. */
  suspendQmp?: string;
  chunkSize: number;
  concurrency: number;
  /**
   * What the switch-over does: 'local' swaps the shim onto the destination; 'peer' (the
   * destination is the peer host's shim, reached over the link) holds a synchronized mirror
   * after the copy until migrate.handover, then stops serving here (src/migrate/peer-handover.ts).
   */
  handover: 'local' | 'peer';
  /** For messages when handover is 'peer': who the peer is. */
  peer?: string;
  /**
   * The caller vouches that the destination reads as zeroes (the peer just created it): holes
   * are then skipped, not written as zeroes. Only with handover 'peer' (a local file the job
   * creates knows it by itself).
   */
  destinationZero?: boolean;
  /**
   * Handover 'peer': a mirrored guest write the peer has not answered within this many ms is
   * answered by the source alone and copied again once the link is back (a cut network must
   * not stall the guest). Unset: the guest waits for both, as with a local destination.
   */
  degradeAfterMs?: number;
  /**
   * Handover 'peer': who this job is (the mover's id for it, and the peer's file and socket).
   * With both, the job persists its resume state (resume-state.ts): a shim killed mid-copy and
   * restarted resumes it (migrate.resume) instead of copying again.
   */
  jobId?: string;
  destinationId?: string;
}

export const DEFAULT_OPTIONS: Omit<MigrateOptions, 'to'> = {
  mode: 'auto',
  maxDowntimeMs: 50,
  bandwidth: 0,
  tracker: 'bitmap',
  heat: false,
  maxPasses: 8,
  deleteSource: false,
  chunkSize: 1024 * 1024,
  concurrency: 4,
  handover: 'local',
};

/** The span over which the reported rate is measured. */
export const RATE_WINDOW_MS = 5000;

/** What the job reports, in progress events and at the end. */
export interface JobFigures {
  phase: JobPhase;
  pass: number;
  /** Bytes of the current pass processed / to process. */
  passDone: number;
  passTotal: number;
  /** Bytes written to the destination by the copier (data + zeroes). */
  bytesCopied: number;
  dataBytes: number;
  zeroBytes: number;
  /** Zero regions not written at all (destination already zero). */
  skippedBytes: number;
  /** Guest writes mirrored to the destination. */
  mirroredBytes: number;
  /**
   * Guest writes while the mirror was active: how many, how long the guest waited (ms), how
   * many the source alone answered (the peer was cut off) and the bytes still to copy again.
   */
  writes: { count: number; maxMs: number; p99Ms: number; degradedWrites: number; laggingBytes: number } | null;
  /**
   * Data bytes the current pass has to copy, null while unknown: pass 1 the source's
   * allocated bytes (block status, measured beside the copy), later passes the dirty bytes.
   * passDone/passTotal count the virtual range the pass has passed (holes included).
   */
  passDataBytes: number | null;
  /** Data bytes of the current pass copied so far (holes jumped over are not data). */
  passDataDone: number;
  /** Source data copied per second over the last few seconds (RATE_WINDOW_MS), bytes/s. */
  rate: number;
  /** The copy rate the last finished pass measured (bytes written / s): the convergence estimates use it. */
  passRate: number;
  /** Dirty bytes still to copy (tracker set + deferred, or the mirror's pending set). */
  dirtyBytes: number;
  /** Data left in this pass at the current rate: (passDataBytes - passDataDone) / rate; null while either is unknown. */
  etaSeconds: number | null;
  switchedToMirror: boolean;
  stallMs: number | null;
  /** Where the stall went: drain (Gate.pause), final copy, destination flush, state commit and swap. */
  stallParts: { drainMs: number; copyMs: number; flushMs: number; commitMs: number } | null;
  /** A job resumed after its shim was restarted: from where, and what was copied again. */
  resume: ResumeFigures | null;
  savings: {
    /** Guest writes the incremental tracker did not mark (ahead of the first pass's cursor). */
    incrementalSkippedWrites: number;
    incrementalSkippedBytes: number;
    /** Copies heat deferral left out of intermediate passes, and those that were rewritten before the final copy. */
    heatDeferredBytes: number;
    heatSavedBytes: number;
    /** Memory of the Bloom set vs an exact bitmap of the same granularity. */
    bloomBytes: number | null;
    bitmapBytes: number | null;
    bloomFalsePositiveRate: number | null;
  };
}

export interface JobContext {
  readonly opts: MigrateOptions;
  readonly gate: Gate;
  readonly tracker: Tracker;
  readonly mirror: Mirror;
  /** The tracker's and the mirror's cursors: the only way the phases move them. */
  readonly cursors: JobCursors;
  readonly copier: Copier;
  readonly dest: Destination;
  readonly size: number;
  readonly granularity: number;
  readonly signal: AbortSignal;
  readonly figures: JobFigures;
  /** Sets the phase and tells watchers. */
  setPhase(phase: JobPhase): void;
  /** A pass begins: its number, the virtual bytes it walks and the data bytes it copies (null: not known yet). */
  startPass(pass: number, total: number, dataBytes: number | null): void;
  /** Tells watchers where the job is (rate limited inside). */
  progress(force?: boolean): void;
  /** Note a swapped dirty set (Bloom accounting). */
  noteSet(set: DirtySet): void;
  /**
   * With dest.initiallyZero: the destination reads as zeroes at and above this offset only (0
   * for a fresh peer file; a resumed job's old copy may hold data below it).
   */
  destZeroFrom: number;
  /** The copier is about to write the destination below `end` (the resume state records it first). */
  willWrite(end: number): Promise<void> | undefined;
}
