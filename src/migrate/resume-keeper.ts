// What a host-move job (handover 'peer' with a job id) keeps on disk so that the shim, killed
// mid-copy and restarted, can resume it (resume-state.ts holds the file and its meaning).
// The job tells the keeper where it is; the keeper decides what the file says:
//   - every second, and whenever the copier is about to write past `touchedBelow`;
//   - before the first write the mirror answers with the source alone (onDegrade), durably:
//     from then on until a catch-up completed, a resume copies everything again.
import { RESTART_TOKEN, ResumeWriter, type ResumeIdentity, type ResumeState } from './resume-state.ts';

const MiB = 1024 * 1024;
export const PERSIST_INTERVAL_MS = 1000;
/** How far ahead of the copier `touchedBelow` is moved at a time (one persist per step). */
export const TOUCH_AHEAD = 8 * MiB;

/** A resumed job starts from this (null state: nothing usable was persisted; copy everything). */
export interface ResumeStart {
  state: ResumeState | null;
  /** Why the state could not be used, when it could not. */
  note: string | null;
}

/** What the job reports about its resume (job figures, `vmshift status`). */
export interface ResumeFigures {
  /** The old job's cursor as persisted: nothing below it is copied again (0 when degraded). */
  resumedFrom: number;
  /** Everything was copied again: the state was missing, unreadable, or degraded. */
  copiedEverything: boolean;
  /** Data bytes the old job had copied at its last persist (not copied again). */
  dataBytesBefore: number;
  /** Writes served after the restart, before the resume, copied again (bytes marked). */
  restartBytes: number;
  note: string | null;
}

export class ResumeKeeper {
  readonly writer: ResumeWriter;
  /** This job's own degradation, as the state says it (not the old job's). */
  #degraded = false;
  /**
   * Nothing the old job did can be trusted: copy the whole disk again, as a fresh job does
   * (only holes below touchedBelow are written as zeroes). Such a pass is as good as a fresh
   * one, so its own cursor is what the state says from then on.
   */
  #copyAll: boolean;
  #touchedBelow: number;
  /** A resume whose writes since the restart are not yet on the peer (only our tracker has them). */
  #restartPending: boolean;
  #inFullPass = false;
  #initialDone = false;
  #from: number;
  /** Why a resume copies everything, when the keeper found out itself. */
  note: string | null = null;
  #dataBefore: number;
  #timer: NodeJS.Timeout | undefined;

  /** `start` null: a fresh job (the peer's file reads as zeroes). */
  constructor(path: string, readonly identity: ResumeIdentity, private readonly cursor: () => number, private readonly dataBytes: () => number, start: ResumeStart | null) {
    const s = start?.state ?? null;
    this.#copyAll = start !== null && (s === null || s.degraded || s.restartedBy !== RESTART_TOKEN);
    this.#from = s && !this.#copyAll ? s.copiedBelow : 0;
    this.#touchedBelow = start === null ? 0 : s ? s.touchedBelow : identity.size;
    this.#restartPending = s !== null && !this.#copyAll;
    this.#dataBefore = s && !this.#copyAll ? s.dataBytes : 0;
    this.writer = new ResumeWriter(path, () => this.#state());
  }

  /** Where the resumed pass starts, and below which the peer may not read as zeroes. */
  get resumedFrom(): number {
    return this.#from;
  }
  get copiesEverything(): boolean {
    return this.#copyAll;
  }
  get zeroFrom(): number {
    return this.#touchedBelow;
  }

  /** Before the job starts: nothing below resumedFrom can be proven on the peer after all. */
  copyEverything(why: string): void {
    this.#copyAll = true;
    this.#from = 0;
    this.#restartPending = false;
    this.#touchedBelow = this.identity.size;
    this.#dataBefore = 0;
    this.note = why;
  }

  figures(restartBytes: number, note: string | null): ResumeFigures {
    return { resumedFrom: this.#from, copiedEverything: this.#copyAll, dataBytesBefore: this.#dataBefore, restartBytes, note };
  }

  #state(): ResumeState {
    const size = this.identity.size;
    const copiedBelow = this.#initialDone ? size : this.#inFullPass ? this.cursor() : this.#from;
    return {
      version: 1, ...this.identity, copiedBelow, touchedBelow: this.#touchedBelow, degraded: this.#degraded,
      restartedBy: this.#restartPending ? RESTART_TOKEN : null, dataBytes: this.#dataBefore + this.dataBytes(), updatedAt: new Date().toISOString(),
    };
  }

  /** Write the state now and every PERSIST_INTERVAL_MS (a failed interval write is tried again at the next). */
  async start(onError: (e: Error) => void): Promise<void> {
    await this.writer.persist();
    this.#timer = setInterval(() => void this.writer.persist().catch(onError), PERSIST_INTERVAL_MS);
    this.#timer.unref();
  }

  /** The mirror is about to answer a write with the source alone: recorded before it does. */
  readonly onDegrade = async (): Promise<void> => {
    this.#degraded = true;
    await this.writer.persist();
  };

  /** The copier is about to write below `end`: the state says so first. */
  willWrite(end: number): Promise<void> | undefined {
    if (end <= this.#touchedBelow) return undefined;
    this.#touchedBelow = Math.min(this.identity.size, end + TOUCH_AHEAD);
    return this.writer.persist();
  }

  /** The full pass (from resumedFrom) runs: its cursor is what the state says is copied. */
  fullPass(running: boolean): void {
    this.#inFullPass = running;
  }
  /** The writes since the restart are on the peer (with the mirror on behind them). */
  restartCopied(): void {
    this.#restartPending = false;
  }
  /** The first copy of the whole disk is done (every write since is mirrored or lagging). */
  initialCopyDone(): void {
    this.#initialDone = true;
    this.#inFullPass = false;
    this.#restartPending = false;
  }
  /**
   * A catch-up finished and, at this instant, nothing is lagging: every acknowledged write is
   * on the peer again (the next degradation goes through onDegrade first).
   */
  caughtUp(mirrorDegraded: boolean): void {
    if (this.#initialDone && !mirrorDegraded && this.#degraded) {
      this.#degraded = false;
      void this.writer.persist().catch(() => {});
    }
  }

  /** The job ended (switched over, failed or aborted): nothing to resume; the file goes. */
  async end(): Promise<void> {
    clearInterval(this.#timer);
    await this.writer.remove();
  }
}
