// Iterative pre-copy (idea 1) with cheaper tracking (idea 2): a full first pass while the
// tracker records writes, then passes over what was dirtied, until the rest can be copied
// within the downtime budget at the measured copy rate.
//  - incremental: during pass 1 the tracker's cursor follows the copier, so writes ahead of
//    it are not marked (their data is copied when the copier gets there anyway);
//  - heat: regions the guest keeps rewriting are left out of intermediate passes (up to what
//    the final stall can absorb) and copied once, at the switch-over;
//  - convergence policy: the job stops iterating when the estimated stall fits the budget;
//    `auto` gives up on pre-copy when a pass does not shrink the dirty set enough (the
//    writes outpace the copy) and `precopy` when the pass limit is hit.
import { DirtyBitmap } from '../tracking/bitmap.ts';
import type { DirtyRange, DirtySet } from '../tracking/dirty-set.ts';
import { throwIfAborted } from './copier.ts';
import { splitAt, unionRanges } from './ranges.ts';
import type { JobContext } from './context.ts';

/** A pass must leave at most this fraction of what it copied dirty, or auto mirrors. */
export const SHRINK_REQUIRED = 0.6;
/**
 * auto also mirrors when another pass would take what it wrote past this multiple of the
 * first pass: every recopied block is a byte the destination did not need twice, and the
 * mirror copies what is still dirty exactly once (measured: precopy reached 1.27x the disk
 * at 32 MiB/s of Zipf writes, mirroring 1.06x).
 */
export const BYTE_BUDGET = 1.05;
/** Decayed writes per heat region that make it "hot". */
export const HOT_WRITES = 4;
/** Dirty sets of at most this many ranges may switch over on pass 1's rate. */
const FEW_RANGES = 16;
/** Share of the downtime budget heat deferral may fill. */
const DEFER_SHARE = 0.5;

export interface PrecopyOutcome {
  /** converged: fits the budget; diverging: auto should mirror; limit: pass limit hit. */
  kind: 'converged' | 'diverging' | 'limit';
  /** Dirty sets still to copy (the switch-over or the mirror pass takes them). */
  carry: DirtySet[];
}

export async function precopy(ctx: JobContext): Promise<PrecopyOutcome> {
  const { tracker, copier, opts, figures, cursors } = ctx;
  ctx.setPhase('precopy');
  // auto always tracks incrementally in pass 1: writes ahead of the copier cost nothing then.
  const incremental = opts.tracker === 'incremental' || opts.mode === 'auto';
  // Nothing is copied yet: from here on a write ahead of the copier is not marked. (The job
  // started with the cursor at Infinity: writes before this point were marked, which only
  // costs a second copy.)
  if (incremental) cursors.trackBehindCopier();
  let skippedBytes = 0;
  const unlisten = incremental ? tracker.onWrite((offset, length) => {
    if (offset >= cursors.trackBelow) skippedBytes += length;
  }) : () => {};
  const skippedBefore = tracker.stats().skippedAhead;
  let prevCopied: number;
  // How much data pass 1 has (for its ETA), measured beside the copy: block status only.
  void copier.dataBytesIn(0, ctx.size).then((n) => {
    if (figures.pass === 1 && figures.phase === 'precopy') figures.passDataBytes = n;
  }, () => {});
  try {
    prevCopied = await timedPass(ctx, 1, ctx.size, null, () =>
      copier.copy([{ offset: 0, length: ctx.size }], {
        destIsZero: ctx.dest.initiallyZero,
        // Set BEFORE the chunk is read: writes into it count as behind the cursor.
        beforeChunk: incremental ? (_start, end) => cursors.copierReaches(end) : undefined,
      }));
  } finally {
    cursors.trackEverything();
    unlisten();
  }
  figures.savings.incrementalSkippedWrites = tracker.stats().skippedAhead - skippedBefore;
  figures.savings.incrementalSkippedBytes = skippedBytes;

  const firstPass = Math.max(prevCopied, 1);
  let deferred: DirtyBitmap | null = null;
  for (let pass = 2; ; pass++) {
    throwIfAborted(ctx.signal);
    const set = tracker.swap();
    ctx.noteSet(set);
    if (deferred) figures.savings.heatSavedBytes += rewritten(deferred, set);
    const carry = deferred ? [set, deferred] : [set];
    const toCopy = set.dirtyBytes() + (deferred?.dirtyBytes() ?? 0);
    figures.dirtyBytes = toCopy;
    const stallMs = figures.passRate > 0 ? (toCopy / figures.passRate) * 1000 : toCopy === 0 ? 0 : Infinity;
    // Pass 1's rate is that of large sequential chunks; scattered dirty blocks copy far
    // slower (measured: a "fits in 50 ms" set of 4 KiB blocks stalled 280-390 ms). So the
    // estimate is trusted only once a dirty pass has measured the rate, unless the set is
    // only a handful of ranges.
    const rateKnown = pass > 2 || fewRanges(carry, FEW_RANGES);
    if (stallMs <= opts.maxDowntimeMs && rateKnown) return { kind: 'converged', carry };
    if (opts.mode === 'auto' && toCopy > SHRINK_REQUIRED * prevCopied) return { kind: 'diverging', carry };
    if (opts.mode === 'auto' && copier.writtenBytes + toCopy > BYTE_BUDGET * firstPass) return { kind: 'diverging', carry };
    if (pass > opts.maxPasses) return { kind: 'limit', carry };

    const next = opts.heat ? new DirtyBitmap(ctx.size, ctx.granularity) : null;
    const work = next ? deferHot(ctx, unionRanges(carry.map((s) => s.ranges())), next) : unionRanges(carry.map((s) => s.ranges()));
    prevCopied = await timedPass(ctx, pass, toCopy, toCopy, () => copier.copy(work, { destIsZero: false }));
    deferred = next && next.dirtyBytes() > 0 ? next : null;
    tracker.heat?.decay(0.5);
  }
}

/** Run one pass, measure its copy rate, and return the bytes it wrote to the destination. */
async function timedPass(ctx: JobContext, pass: number, total: number, dataBytes: number | null, run: () => Promise<void>): Promise<number> {
  const { copier, figures } = ctx;
  ctx.startPass(pass, total, dataBytes);
  const written0 = copier.writtenBytes, processed0 = copier.stats.processedBytes, extent0 = copier.stats.extentBytes;
  const started = performance.now();
  const tick = setInterval(() => {
    figures.passDone = copier.stats.processedBytes - processed0;
    ctx.progress();
  }, 250);
  try {
    await run();
  } finally {
    clearInterval(tick);
  }
  const secs = Math.max((performance.now() - started) / 1000, 1e-3);
  const written = copier.writtenBytes - written0;
  // A pass that wrote little measures the rate poorly: count the data it read. Never the
  // holes it jumped over (terabytes a second would make every stall estimate zero).
  const basis = written >= 1024 * 1024 ? written : copier.stats.extentBytes - extent0;
  if (basis > 0) figures.passRate = basis / secs;
  figures.passDone = copier.stats.processedBytes - processed0;
  ctx.progress(true);
  return written;
}

/**
 * Leave the hottest regions out of this pass (marking them in `deferred`), as many as fit
 * in a share of the downtime budget at the measured rate; yield the rest.
 */
function* deferHot(ctx: JobContext, ranges: Iterable<DirtyRange>, deferred: DirtyBitmap): Generator<DirtyRange> {
  const heat = ctx.tracker.heat;
  if (!heat) return yield* ranges;
  const budget = DEFER_SHARE * ctx.figures.passRate * (ctx.opts.maxDowntimeMs / 1000);
  const hot = new Set<number>();
  let room = budget;
  for (const r of heat.hotRegions(64)) {
    if (r.writes < HOT_WRITES || r.length > room) break;
    hot.add(r.offset);
    room -= r.length;
  }
  for (const piece of splitAt(ranges, heat.regionSize)) {
    if (hot.has(Math.floor(piece.offset / heat.regionSize) * heat.regionSize)) {
      deferred.mark(piece.offset, piece.length);
      ctx.figures.savings.heatDeferredBytes += piece.length;
    } else yield piece;
  }
}

/** Deferred bytes the guest wrote again since: copies heat deferral did not have to make. */
function rewritten(deferred: DirtyBitmap, set: DirtySet): number {
  let n = 0;
  for (const r of deferred.ranges()) {
    for (let pos = r.offset; pos < r.offset + r.length; pos += deferred.granularity) {
      if (set.has(pos, 1)) n += Math.min(deferred.granularity, r.offset + r.length - pos);
    }
  }
  return n;
}

/** Whether the union of the sets has at most `n` ranges (stops counting past n). */
function fewRanges(sets: DirtySet[], n: number): boolean {
  let count = 0;
  for (const _ of unionRanges(sets.map((s) => s.ranges()))) if (++count > n) return false;
  return true;
}
