// The job's cursors, in one object the job owns. The Tracker and the Mirror under the gate
// only read them (TrackingCursor, MirrorCursor); the phases move them through the methods
// here, each of which says what it means, instead of writing public fields of two layers
// from three modules. (QEMU's mirror: the filter node holds a handle to its job; the job
// owns the bitmaps and the cursor.)
//   trackBelow   the tracker marks writes starting below it (Infinity: every write).
//                Incremental pre-copy moves it up with the copier; while the mirror
//                decides what the destination needs it is 0 (nothing is marked).
//   mirroredBelow the destination is in step below it: the mirror writes guest writes there
//                to both devices. Only the mirror pass moves it, from 0 to the disk's end.
import type { TrackingCursor } from '../block/tracker.ts';
import type { MirrorCursor } from '../block/mirror.ts';

export class JobCursors implements TrackingCursor, MirrorCursor {
  #trackBelow = Infinity;
  #mirroredBelow = 0;

  get trackBelow(): number {
    return this.#trackBelow;
  }
  get mirroredBelow(): number {
    return this.#mirroredBelow;
  }

  /** Pass 1 of an incremental pre-copy begins: writes ahead of the copier are not marked. */
  trackBehindCopier(): void {
    this.#trackBelow = 0;
  }
  /** The copier is about to read up to `end`: writes below it count as behind (never moves back). */
  copierReaches(end: number): void {
    this.#trackBelow = Math.max(this.#trackBelow, end);
  }
  /** Mark every write again (after pass 1, or when the mirror stops deciding). */
  trackEverything(): void {
    this.#trackBelow = Infinity;
  }
  /** The mirror decides what the destination needs: the tracker marks nothing. */
  trackNothing(): void {
    this.#trackBelow = 0;
  }

  /** The mirror pass starts from the beginning: nothing is known to be in step yet. */
  mirrorFromStart(): void {
    this.#mirroredBelow = 0;
  }
  /** The destination is in step below `offset` (the mirror pass only moves forward). */
  mirroredUpTo(offset: number): void {
    if (offset < this.#mirroredBelow) throw new Error(`mirror cursor moved back from ${this.#mirroredBelow} to ${offset}`);
    this.#mirroredBelow = offset;
  }
}
