// Selective mirroring (idea 4): one pass from offset 0 to the end with the Mirror layer
// active. Behind the copier's cursor every guest write goes to both devices; ahead of it,
// to the source only (and into the Mirror's `pending` set); writes into the window being
// copied wait for it. When the cursor reaches the end the destination equals the source,
// whatever the write rate: no second pass.
//  - `full` (mode mirror): every chunk is copied (holes skipped via block status);
//  - `dirty` (auto, after pre-copy): only what the carried dirty sets and `pending` name
//    is copied; clean stretches are skipped in one step.
import { DirtyBitmap } from '../tracking/bitmap.ts';
import type { DirtySet } from '../tracking/dirty-set.ts';
import { throwIfAborted } from './copier.ts';
import { firstDirty, unionRanges } from './ranges.ts';
import type { JobContext } from './context.ts';

/** Bytes the copier holds at a time: guest writes into it wait at most one window's copy. */
export const MIRROR_WINDOW = 1024 * 1024;

/**
 * Activate the mirror with the gate paused (no write in flight may straddle the change) and
 * take the tracker's set into `carry` so nothing written so far is missed.
 */
export async function startMirroring(ctx: JobContext, carry: DirtySet[] | null, from = 0): Promise<DirtySet[] | null> {
  const { gate, tracker, mirror, cursors } = ctx;
  await gate.pause();
  try {
    if (carry) {
      const set = tracker.swap();
      ctx.noteSet(set);
      carry = [...carry, set];
    }
    // From here on the mirror decides what the destination needs; tracking would only
    // make the switch-over recopy mirrored blocks.
    cursors.trackNothing();
    cursors.mirrorFromStart();
    // A resumed job: the destination is in step below `from` already (resume-state.ts).
    if (from > 0) cursors.mirroredUpTo(from);
    mirror.start(carry ? new DirtyBitmap(ctx.size, ctx.granularity) : null);
  } finally {
    gate.resume();
  }
  return carry;
}

/** The mirror pass: `carry` null copies everything, else only the carried sets and pending. */
export async function mirrorPass(ctx: JobContext, carry: DirtySet[] | null, phase: 'mirror' | 'catching-up' = 'mirror'): Promise<void> {
  const { mirror, copier, figures, size, cursors } = ctx;
  ctx.setPhase(phase);
  const sets = carry ? [...carry, mirror.pending!] : null;
  ctx.startPass(figures.pass + 1, size, sets ? sets.reduce((n, set) => n + set.dirtyBytes(), 0) : null);
  // Copying everything: how much data that is (for the ETA), measured beside the copy.
  if (!sets) void copier.dataBytesIn(0, size).then((n) => {
    if (figures.phase === 'mirror') figures.passDataBytes = n;
  }, () => {});
  const started = performance.now();
  const written0 = copier.writtenBytes;
  let lastTick = 0;
  while (cursors.mirroredBelow < size) {
    throwIfAborted(ctx.signal);
    if (mirror.error) throw mirror.error;
    // Choosing the next start and moving the cursor happen in one synchronous step: a write
    // that started before has already marked `pending`, so nothing is skipped over.
    const start = sets ? firstDirty(sets, cursors.mirroredBelow) : cursors.mirroredBelow;
    if (start < 0) {
      cursors.mirroredUpTo(size);
      break;
    }
    cursors.mirroredUpTo(start);
    // Copying everything: a hole or zero extent ahead is passed in one step, not window by window.
    if (!sets && (await skipZeroExtent(ctx))) continue;
    // A window never straddles destZeroFrom: below it the destination may hold old data.
    const end = Math.min(size, start + MIRROR_WINDOW, start < ctx.destZeroFrom ? ctx.destZeroFrom : Infinity);
    // Pay the bandwidth limit before taking the window, not while holding it: a guest
    // write into the window then waits for one window's I/O, never for the limiter.
    await copier.opts.limiter?.ready(ctx.signal);
    throwIfAborted(ctx.signal);
    const persisting = ctx.willWrite(end);
    if (persisting) await persisting;
    await mirror.hold(start, end);
    try {
      const work = sets ? unionRanges(sets.map((s) => s.ranges(start)), start, end) : [{ offset: start, length: end - start }];
      await copier.copy(work, { destIsZero: !carry && destIsZeroAt(ctx, start), chunkSize: Math.max(64 * 1024, MIRROR_WINDOW / copier.concurrency), deferLimit: true });
      cursors.mirroredUpTo(end);
    } finally {
      mirror.release();
    }
    figures.passDone = cursors.mirroredBelow;
    figures.dirtyBytes = sets ? remaining(sets, cursors.mirroredBelow) : size - cursors.mirroredBelow;
    figures.mirroredBytes = mirror.stats().mirroredBytes;
    const now = performance.now();
    if (now - lastTick > 250) {
      lastTick = now;
      const secs = (now - started) / 1000;
      if (secs > 0.5 && copier.writtenBytes > written0) figures.passRate = (copier.writtenBytes - written0) / secs;
      ctx.progress();
    }
  }
  if (mirror.error) throw mirror.error;
  figures.passDone = size;
  figures.dirtyBytes = 0;
  ctx.progress(true);
}

/**
 * The mirror was degraded (the peer left mirrored writes unanswered: a cut link, Mirror):
 * once every destination write still out has settled (the link is back; a late write can no
 * longer land after its replacement), copy the lagging ranges again with a mirror pass over
 * them alone, the cursor from the start (writes behind it are mirrored again, ahead of it
 * marked pending and copied when it gets there). Repeats if the pass degraded again.
 */
export async function catchUp(ctx: JobContext): Promise<void> {
  const { mirror } = ctx;
  while (mirror.degraded) {
    ctx.setPhase('catching-up');
    await mirror.untilSettled(ctx.signal);
    throwIfAborted(ctx.signal);
    if (mirror.error) throw mirror.error;
    await copyAgain(ctx, () => {
      const lagging = mirror.takeLagging();
      return lagging ? [lagging] : null;
    });
  }
}

/**
 * A mirror pass over the sets `take` returns alone (null: nothing to do), the cursor from the
 * start: writes behind it are mirrored again, ahead of it marked pending and copied when it
 * gets there. `take` runs with the gate paused, so no write straddles taking the sets and
 * moving the cursor back. Holes in the sets are written as zeroes (the destination may hold
 * older data there).
 */
export async function copyAgain(ctx: JobContext, take: () => DirtySet[] | null): Promise<void> {
  const { mirror, gate, cursors } = ctx;
  let sets: DirtySet[] | null;
  await gate.pause();
  try {
    sets = take();
    if (sets) {
      cursors.mirrorFromStart();
      mirror.start(new DirtyBitmap(ctx.size, ctx.granularity));
    }
  } finally {
    gate.resume();
  }
  if (sets) await mirrorPass(ctx, sets, 'catching-up');
}

/** The most a zero extent skipped by the mirror pass covers in one step. */
const SKIP_MAX = 64 * 1024 * 1024 * 1024;

/**
 * If the source reads as zeroes for at least a window from the mirror's cursor, zero that
 * stretch on the destination (nothing when it is a file the job created) and move the
 * cursor past it; true when it did. The stretch is held as the mirror's window while the
 * source is asked and the cursor moves, so no guest write can land in it unseen: one that
 * waited finds itself behind the cursor and is mirrored.
 */
async function skipZeroExtent(ctx: JobContext): Promise<boolean> {
  const { mirror, copier, size, cursors } = ctx;
  if (!copier.source.caps.canBlockStatus) return false;
  const start = cursors.mirroredBelow, end = Math.min(size, start + SKIP_MAX, start < ctx.destZeroFrom ? ctx.destZeroFrom : Infinity);
  await mirror.hold(start, end);
  try {
    const [first] = await copier.source.blockStatus(start, end - start);
    if (!first || !first.zero || first.offset > start) return false;
    const stop = Math.min(end, first.offset + first.length);
    if (stop - start < MIRROR_WINDOW) return false;
    await copier.zeroRange(start, stop - start, destIsZeroAt(ctx, start));
    cursors.mirroredUpTo(stop);
    return true;
  } finally {
    mirror.release();
  }
}

/**
 * After the mirror pass: stop mirroring and track again (with the gate paused, so no write
 * straddles the change). The destination equals the source at that instant; what the guest
 * writes from here is tracked and copied by the switch-over's catch-up rounds. Mirroring on
 * through the switch-over's flushes would write every rewrite of a hot block to the
 * destination again (measured: 1.09x the disk at 32 MiB/s, and a 100 ms flush inside the
 * stall); tracking copies each dirty block once.
 * Except under --bandwidth: a copy limited below the write rate could never catch up on
 * tracked writes, so the mirror stays on and keeps the destination in step to the end.
 */
export async function stopMirroring(ctx: JobContext): Promise<void> {
  const { gate, tracker, mirror, figures, copier, cursors } = ctx;
  if (copier.opts.limiter?.limited) return;
  await gate.pause();
  try {
    if (mirror.error) throw mirror.error;
    mirror.stop();
    tracker.swap(); // empty: nothing was marked while the mirror decided (cursor 0)
    cursors.trackEverything();
    figures.mirroredBytes = mirror.stats().mirroredBytes;
  } finally {
    gate.resume();
  }
}

/** The destination reads as zeroes from `start` (up to the end of a window that does not straddle destZeroFrom). */
function destIsZeroAt(ctx: JobContext, start: number): boolean {
  return ctx.dest.initiallyZero && start >= ctx.destZeroFrom;
}

/** Dirty bytes at or after `from` (an estimate for progress only; bounded work). */
function remaining(sets: DirtySet[], from: number): number {
  let n = 0, i = 0;
  for (const r of unionRanges(sets.map((s) => s.ranges(from)), from)) {
    n += r.length;
    if (++i > 4096) break;
  }
  return n;
}
