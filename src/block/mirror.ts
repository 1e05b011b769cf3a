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
// The cursor is the job's (src/migrate/cursors.ts): the mirror only reads it, as QEMU's
// mirror filter node reads its job's state through a small handle and never owns it.
import type { BlockDevice, WriteOpts, ZeroOpts } from './device.ts';
import { Layer } from './layer.ts';
import type { DirtySet } from '../tracking/dirty-set.ts';

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

  constructor(source: BlockDevice, readonly destination: BlockDevice, cursor: MirrorCursor) {
    super(source);
    this.#cursor = cursor;
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

  stats(): MirrorStats {
    return { active: this.#active, cursor: this.cursor, mirroredBytes: this.#mirroredBytes, waitedWrites: this.#waitedWrites, error: this.#error?.message ?? null };
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
      if (this.#active && offset < this.#cursor.mirroredBelow) {
        const toDest = op(this.destination).then(
          () => void (this.#mirroredBytes += length),
          (e: Error) => this.#fail(e),
        );
        await Promise.all([op(this.inner), toDest]);
      } else {
        this.pending?.mark(offset, length);
        await op(this.inner);
      }
    } finally {
      this.#inFlight.delete(span);
      this.#wake();
    }
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
