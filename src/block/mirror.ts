// Mirror: selective mirroring (idea 4 in DESIGN.md). Sits below the Tracker during a storage
// migration and, while active, keeps the destination in step with the source behind the
// copier's cursor:
//   - a write starting behind the cursor goes to the source AND the destination; the guest
//     gets its answer when both are done (the destination's failure is recorded for the job,
//     never returned to the guest: the source is the disk until the switch-over);
//   - a write at or ahead of the cursor goes to the source only and is recorded in `pending`
//     (the copier copies it when it gets there);
//   - a write overlapping the window the copier holds waits for the copier to finish it.
// Overlapping writes are serialised while mirroring, so both devices apply them in the same
// order. Inactive, the layer passes everything through.
// Degraded (only when the job allows it, `degradeAfterMs`: a peer host behind a link that may
// be cut): a mirrored write the destination has not answered within that time is answered
// once the source has it, and its range goes into `lagging`; from then on every write goes to
// the source only and into `lagging`, so the guest never waits for a cut network. The job
// copies `lagging` again once every destination write still out has settled (the link came
// back: src/migrate/selective.ts catchUp), so a late write can never land after the copy
// that replaces it. With `onDegrade` (the job persists the fact: src/migrate/resume-state.ts),
// no write is answered by the source alone before that promise resolved: a shim killed after
// it acknowledged such a write restarts knowing the peer may lack something.
// The cursor is the job's (src/migrate/cursors.ts): the mirror only reads it, as QEMU's
// mirror filter node reads its job's state through a small handle and never owns it.
import type { BlockDevice, WriteOpts, ZeroOpts } from './device.ts';
import { Layer } from './layer.ts';
import type { DirtySet } from '../tracking/dirty-set.ts';
import { DirtyBitmap } from '../tracking/bitmap.ts';

interface Span {
  start: number;
  end: number;
}

const overlaps = (a: Span, start: number, end: number) => a.start < end && start < a.end;

/** Where the destination is known to be in step: everything below `mirroredBelow`. */
export interface MirrorCursor {
  readonly mirroredBelow: number;
}

/**
 * A failure writing a guest's write to the destination. It carries a code the job switches
 * on (never a regex on the message): the guest's write succeeded on the source; the job
 * must give up.
 */
export class MirrorFailedError extends Error {
  override name = 'MirrorFailedError';
  readonly code = 'destination-failed';
}

export interface MirrorStats {
  active: boolean;
  cursor: number;
  /** Guest bytes written to both devices. */
  mirroredBytes: number;
  /** Guest writes that waited for the copier's window. */
  waitedWrites: number;
  error: string | null;
  /** Writes answered with the source alone (the destination was late) and bytes still to copy again. */
  degraded: boolean;
  degradedWrites: number;
  laggingBytes: number;
  /** Guest writes while active: how many, and how long the guest waited (ms). */
  writes: number;
  writeMaxMs: number;
  writeP99Ms: number;
}

/** Latency samples kept for the p99 (the most recent ones). */
const LATENCY_SAMPLES = 4096;

export interface MirrorOptions {
  /** Answer a mirrored write with the source alone once the destination took this long (null: never). */
  degradeAfterMs?: number | null;
  /** The grain of the lagging set. */
  granularity?: number;
  /**
   * Called when the mirror is about to answer its first write with the source alone (again
   * after each takeLagging); such writes are acknowledged only once it resolved. If it
   * rejects, they wait for the destination as if the mirror could not degrade.
   */
  onDegrade?: () => Promise<void>;
}

export class Mirror extends Layer {
  #active = false;
  readonly #cursor: MirrorCursor;
  /** Writes at or ahead of the cursor while active; the copier reads it. */
  pending: DirtySet | null = null;
  #window: Span | null = null;
  readonly #inFlight = new Set<Span>();
  #waiters: Array<() => void> = [];
  #error: Error | null = null;
  #mirroredBytes = 0;
  #waitedWrites = 0;
  readonly #degradeAfterMs: number | null;
  /** Ranges the destination may lack: written while degraded, or late there. */
  #lagging: DirtyBitmap | null = null;
  #degradedWrites = 0;
  /** Destination writes not yet settled (a late one may still land). */
  #destInFlight = 0;
  #latencies: number[] = [];
  #latencyNext = 0;
  #writes = 0;
  #writeMaxMs = 0;
  readonly #onDegrade: (() => Promise<void>) | null;
  /** Resolves true once the degradation is recorded (onDegrade), false if that failed. */
  #recorded: Promise<boolean> | null = null;

  constructor(source: BlockDevice, readonly destination: BlockDevice, cursor: MirrorCursor, opts: MirrorOptions = {}) {
    super(source);
    this.#cursor = cursor;
    this.#degradeAfterMs = opts.degradeAfterMs ?? null;
    this.#onDegrade = opts.onDegrade ?? null;
    if (this.#degradeAfterMs !== null) this.#lagging = new DirtyBitmap(source.size, opts.granularity ?? 4096);
  }

  override get layerName(): string {
    return 'mirror';
  }
  override describe(): string {
    return `mirror to ${this.destination.name} (${this.#active ? `active, in step below ${this.cursor}` : 'inactive'})`;
  }

  /** Everything below the cursor is on the destination (and mirrored from now on). */
  get cursor(): number {
    return this.#cursor.mirroredBelow;
  }

  get active(): boolean {
    return this.#active;
  }
  /** The first destination failure seen while mirroring (the job must give up). */
  get error(): Error | null {
    return this.#error;
  }

  /** Start mirroring (the job has put the cursor at 0); writes ahead of the cursor are marked in `pending`. */
  start(pending: DirtySet | null): void {
    this.pending = pending;
    this.#active = true;
  }

  /** Stop mirroring (the job ended or failed); writes go to the source only again. */
  stop(): void {
    this.#active = false;
    this.#window = null;
    this.#wake();
  }

  /**
   * Take the window [start, end) for the copier: new writes overlapping it wait, and this
   * resolves once writes already in flight there have finished. Release with `release()`.
   */
  async hold(start: number, end: number): Promise<void> {
    if (this.#window) throw new Error(`${this.name}: mirror window already held at ${this.#window.start}`);
    this.#window = { start, end };
    await this.#until(() => ![...this.#inFlight].some((w) => overlaps(w, start, end)));
  }

  /** Release the window; writes that waited for it see the cursor moved past it. */
  release(): void {
    this.#window = null;
    this.#wake();
  }

  /** Some writes were answered by the source alone: the destination lacks `lagging` until the job copies it again. */
  get degraded(): boolean {
    return (this.#lagging?.dirtyBytes() ?? 0) > 0;
  }

  /** Degraded, and every destination write still out has settled: the destination answers again. */
  get settled(): boolean {
    return this.#destInFlight === 0;
  }

  /** Resolves once every destination write still out has settled (the link is back), or on abort. */
  async untilSettled(signal?: AbortSignal): Promise<void> {
    const wake = () => this.#wake();
    signal?.addEventListener('abort', wake, { once: true });
    try {
      await this.#until(() => this.#destInFlight === 0 || signal?.aborted === true);
    } finally {
      signal?.removeEventListener('abort', wake);
    }
  }

  /**
   * The job starts copying the lagging ranges again (the gate is paused: no write in
   * flight): they are the caller's now, and the mirror is no longer degraded.
   */
  takeLagging(): DirtyBitmap | null {
    const l = this.#lagging;
    if (!l || l.dirtyBytes() === 0) return null;
    if (this.#destInFlight > 0) throw new Error(`${this.name}: lagging ranges taken while ${this.#destInFlight} destination writes are still out`);
    this.#lagging = new DirtyBitmap(l.size, l.granularity);
    this.#recorded = null;
    return l;
  }

  stats(): MirrorStats {
    const sorted = [...this.#latencies].sort((a, b) => a - b);
    const p99 = sorted.length ? sorted[Math.min(sorted.length - 1, Math.floor(sorted.length * 0.99))]! : 0;
    return {
      active: this.#active, cursor: this.cursor, mirroredBytes: this.#mirroredBytes, waitedWrites: this.#waitedWrites, error: this.#error?.message ?? null,
      degraded: this.degraded, degradedWrites: this.#degradedWrites, laggingBytes: this.#lagging?.dirtyBytes() ?? 0,
      writes: this.#writes, writeMaxMs: round(this.#writeMaxMs), writeP99Ms: round(p99),
    };
  }

  override write(offset: number, data: Buffer, opts?: WriteOpts): Promise<void> {
    return this.#modify(offset, data.length, (dev) => dev.write(offset, data, opts));
  }
  override writeZeroes(offset: number, length: number, opts?: ZeroOpts): Promise<void> {
    return this.#modify(offset, length, (dev) => dev.writeZeroes(offset, length, opts));
  }
  override trim(offset: number, length: number, opts?: WriteOpts): Promise<void> {
    // A trim mirrored as write-zeroes: the destination must read what the source reads.
    return this.#modify(offset, length, (dev) => (dev === this.inner ? dev.trim(offset, length, opts) : dev.writeZeroes(offset, length)));
  }

  async #modify(offset: number, length: number, op: (dev: BlockDevice) => Promise<void>): Promise<void> {
    if (!this.#active) return op(this.inner);
    const t0 = performance.now();
    try {
      await this.#modifyActive(offset, length, op);
    } finally {
      this.#noteLatency(performance.now() - t0);
    }
  }

  async #modifyActive(offset: number, length: number, op: (dev: BlockDevice) => Promise<void>): Promise<void> {
    const end = offset + length;
    const blocked = () => (this.#window !== null && overlaps(this.#window, offset, end)) || [...this.#inFlight].some((w) => overlaps(w, offset, end));
    if (blocked()) {
      this.#waitedWrites++;
      await this.#until(() => !blocked());
    }
    const span = { start: offset, end };
    this.#inFlight.add(span);
    try {
      // Decided after waiting: a write that waited for the window is behind the cursor now.
      if (this.#active && offset < this.#cursor.mirroredBelow && this.degraded) {
        // Degraded: the destination lacks older writes anyway; this one joins them.
        this.#lagging!.mark(offset, length);
        this.#degradedWrites++;
        const source = op(this.inner);
        if (await this.#degradeRecorded()) await source;
        else await Promise.all([source, this.#toDestination(op, length)]);
      } else if (this.#active && offset < this.#cursor.mirroredBelow) {
        const toDest = this.#toDestination(op, length);
        const source = op(this.inner);
        if (this.#degradeAfterMs === null) await Promise.all([source, toDest]);
        else {
          let timer: NodeJS.Timeout | undefined;
          const late = new Promise<'late'>((r) => { timer = setTimeout(() => r('late'), this.#degradeAfterMs!); });
          const first = await Promise.race([toDest.then(() => 'ok' as const), late]);
          clearTimeout(timer);
          if (first === 'late') {
            // The guest's write is answered by the source alone; the destination may get it
            // late or never: it is copied again once everything out there has settled.
            this.#lagging!.mark(offset, length);
            this.#degradedWrites++;
            if (!(await this.#degradeRecorded())) await toDest;
          }
          await source;
        }
      } else {
        this.pending?.mark(offset, length);
        await op(this.inner);
      }
    } finally {
      this.#inFlight.delete(span);
      this.#wake();
    }
  }

  /** The guest's write to the destination; a failure is the job's, never the guest's. */
  #toDestination(op: (dev: BlockDevice) => Promise<void>, length: number): Promise<void> {
    this.#destInFlight++;
    return op(this.destination).then(
      () => void (this.#mirroredBytes += length),
      (e: Error) => this.#fail(e),
    ).finally(() => { this.#destInFlight--; this.#wake(); });
  }

  /** Once per degradation: true when the job recorded it (or asked for no record). */
  #degradeRecorded(): Promise<boolean> {
    if (!this.#onDegrade) return Promise.resolve(true);
    if (!this.#recorded) {
      const r = this.#onDegrade().then(() => true, () => false);
      this.#recorded = r;
      // A failed record is tried again by the next write that would degrade.
      void r.then((ok) => { if (!ok && this.#recorded === r) this.#recorded = null; });
    }
    return this.#recorded;
  }

  #noteLatency(ms: number): void {
    this.#writes++;
    if (ms > this.#writeMaxMs) this.#writeMaxMs = ms;
    if (this.#latencies.length < LATENCY_SAMPLES) this.#latencies.push(ms);
    else this.#latencies[this.#latencyNext] = ms;
    this.#latencyNext = (this.#latencyNext + 1) % LATENCY_SAMPLES;
  }

  #fail(e: Error): void {
    if (!this.#error) this.#error = new MirrorFailedError(`mirroring to ${this.destination.name} failed: ${e.message}`, { cause: e });
    this.#active = false;
  }

  /** Resolve when `ready()` holds; re-checked whenever a write or the window ends. */
  async #until(ready: () => boolean): Promise<void> {
    while (!ready()) await new Promise<void>((r) => this.#waiters.push(r));
  }

  #wake(): void {
    const w = this.#waiters;
    this.#waiters = [];
    for (const r of w) r();
  }
}

const round = (ms: number) => Math.round(ms * 10) / 10;
