// Tracker: records which blocks the guest writes, for the copier's iterative pre-copy.
// What it changes: nothing on the data path; after each write, write-zeroes or trim
// completes (or fails: a failed write may have changed part of its range) it marks the
// range in the current dirty set and records it in the heat map.
//
// Why marking happens after completion: the copier calls swap() to take the set of writes
// made so far and then reads those blocks. A write that completes after the swap lands in
// the new set, so the next pass copies it; one that completed before the swap is in the old
// set and its data is on the device before the copier reads. No write can fall between.
//
// Incremental tracking (`cursor`): during the first full pass, a write that starts at or
// beyond the cursor is not marked: the copier has not read that part yet and will copy its
// new data anyway. The copier moves the cursor to the END of the chunk it is about to read
// BEFORE it reads, so writes to the chunk in flight count as behind. The cursor is checked
// at completion time, so a write that was ahead when issued but completes after the cursor
// passed it is still marked. The tracker only reads the cursor: it belongs to the job
// (src/migrate/cursors.ts), which moves it and the mirror's together; without one the
// tracker marks every write.
import type { BlockDevice, WriteOpts, ZeroOpts } from './device.ts';
import { Layer } from './layer.ts';
import { createDirtySet, HeatMap, DEFAULT_GRANULARITY, DEFAULT_REGION_SIZE, type DirtySet, type HotRegion } from '../tracking/index.ts';

export interface TrackerOptions {
  kind: 'bitmap' | 'bloom' | 'none';
  /** Dirty-set block size; default 64 KiB. */
  granularity?: number;
  /** Keep a heat map of write counts (region size `heatRegionSize`, default 1 MiB). */
  heat?: boolean;
  heatRegionSize?: number;
  /** Bloom sizing (kind 'bloom' only): see BloomOptions. */
  expectedBlocks?: number;
  falsePositiveRate?: number;
  /** The job's cursor (incremental tracking); default: mark everything. */
  cursor?: TrackingCursor;
}

export interface TrackerStats {
  /** Write-type requests seen (writes, write-zeroes, trims). */
  writes: number;
  bytesWritten: number;
  /** Requests recorded in the dirty set. */
  marked: number;
  /** Requests not recorded because they started at or ahead of the cursor. */
  skippedAhead: number;
  /** Bytes the current dirty set covers. */
  dirtyBytes: number;
  hot: HotRegion[];
}

export type WriteListener = (offset: number, length: number) => void;

/** Where the tracker stops marking: writes starting at or beyond `trackBelow` are not marked. */
export interface TrackingCursor {
  readonly trackBelow: number;
}

/** Mark every write (no job moves a cursor). */
const TRACK_ALL: TrackingCursor = Object.freeze({ trackBelow: Infinity });

export class Tracker extends Layer {
  readonly #cursor: TrackingCursor;
  readonly granularity: number;
  readonly kind: TrackerOptions['kind'];
  readonly heat: HeatMap | undefined;
  #set: DirtySet | null;
  #newSet: () => DirtySet | null;
  #listeners = new Set<WriteListener>();
  #writes = 0;
  #bytes = 0;
  #marked = 0;
  #skipped = 0;

  constructor(inner: BlockDevice, opts: TrackerOptions) {
    super(inner);
    this.kind = opts.kind;
    this.#cursor = opts.cursor ?? TRACK_ALL;
    this.granularity = opts.granularity ?? DEFAULT_GRANULARITY;
    const { granularity, expectedBlocks, falsePositiveRate } = opts;
    this.#newSet = opts.kind === 'none'
      ? () => null
      : () => createDirtySet(opts.kind as DirtySet['kind'], inner.size, { granularity, expectedBlocks, falsePositiveRate });
    this.#set = this.#newSet();
    this.heat = opts.heat ? new HeatMap(inner.size, opts.heatRegionSize ?? DEFAULT_REGION_SIZE) : undefined;
  }

  override get layerName(): string {
    return 'tracker';
  }
  override describe(): string {
    const below = this.#cursor.trackBelow;
    return `tracker ${this.kind}${this.kind === 'none' ? '' : ` ${this.granularity / 1024} KiB`}${this.heat ? ' +heat' : ''}${below === Infinity ? '' : ` below ${below}`}`;
  }

  /** Writes starting at or beyond this offset are not marked (see the file comment). */
  get cursor(): number {
    return this.#cursor.trackBelow;
  }

  /** The set currently being filled (null for kind 'none'). */
  get dirty(): DirtySet | null {
    return this.#set;
  }

  /** Install a fresh empty set and return the one filled so far, for the copier to walk. */
  swap(): DirtySet {
    const old = this.#set;
    if (!old) throw new Error(`tracker ${this.name}: swap() needs a dirty set, but kind is 'none'`);
    this.#set = this.#newSet();
    return old;
  }

  /** Call `fn` after every completed write-type request; returns an unsubscribe function. */
  onWrite(fn: WriteListener): () => void {
    this.#listeners.add(fn);
    return () => this.#listeners.delete(fn);
  }

  stats(): TrackerStats {
    return {
      writes: this.#writes,
      bytesWritten: this.#bytes,
      marked: this.#marked,
      skippedAhead: this.#skipped,
      dirtyBytes: this.#set?.dirtyBytes() ?? 0,
      hot: this.heat?.hotRegions(5) ?? [],
    };
  }

  override async write(offset: number, data: Buffer, opts?: WriteOpts): Promise<void> {
    try {
      await this.inner.write(offset, data, opts);
    } finally {
      this.#record(offset, data.length);
    }
  }

  override async writeZeroes(offset: number, length: number, opts?: ZeroOpts): Promise<void> {
    try {
      await this.inner.writeZeroes(offset, length, opts);
    } finally {
      this.#record(offset, length);
    }
  }

  override async trim(offset: number, length: number, opts?: WriteOpts): Promise<void> {
    try {
      await this.inner.trim(offset, length, opts);
    } finally {
      this.#record(offset, length);
    }
  }

  #record(offset: number, length: number): void {
    this.#writes++;
    this.#bytes += length;
    this.heat?.record(offset, length);
    if (this.#set) {
      if (offset < this.#cursor.trackBelow) {
        this.#set.mark(offset, length);
        this.#marked++;
      } else {
        this.#skipped++;
      }
    }
    for (const fn of this.#listeners) {
      try {
        fn(offset, length);
      } catch {
        // A status listener must never fail a guest write.
      }
    }
  }
}
