// The switch-over, in one place (QEMU's drain -> change -> resume):
//   outside the stall: destination flush; while the writes since the last pass are estimated
//   to take more than half the budget, or the flush was slow (the next one has that long's
//   writes to do), copy them and flush again; write the new shim state (synced, not yet in
//   place);
//   the stall: [QMP stop] -> Gate.pause (drain) -> copy the last dirty blocks -> destination
//   flush -> handover.commit() -> handover.apply() -> Gate.resume [-> QMP cont].
// Until the commit, any failure leaves the stack as it was and the caller rolls back to the
// source; after it, the destination is the disk. The stall (first held request possible to
// resume) is measured, and so is each of its parts.
//
// What the commit point changes is a strategy (Handover), so the sequence around it is
// written once:
//   - swapToLocalFile (here): the new backing is this host's file or export; commit renames
//     the shim state naming it into place, apply swaps the stack onto it;
//   - handing over to the peer's shim (src/hostmove/disks.ts): commit records that the
//     peer's shim is the disk's primary, apply stops serving here.
import type { BlockDevice } from '../block/device.ts';
import type { DirtySet } from '../tracking/dirty-set.ts';
import { QmpClient } from '../qemu/qmp.ts';
import { throwIfAborted } from './copier.ts';
import { unionRanges } from './ranges.ts';
import type { JobContext } from './context.ts';
import type { Destination } from './destination.ts';
import type { MovableDisk, PreparedBacking } from './disk.ts';
import { debuglog } from 'node:util';
import { faultPoint } from '../util/fault-point.ts';

const debug = debuglog('vmshift');
export interface SwitchResult {
  stallMs: number;
  finalBytes: number;
  /** The device the disk was on before (the caller closes it). */
  old: BlockDevice;
}

/** What the switch-over changes at its commit point. */
export interface Handover {
  /** For status and messages: 'local-swap', 'peer-handover'. */
  readonly kind: string;
  /** Outside the stall: make the change durable but not yet in effect. */
  prepare(): Promise<void>;
  /** Inside the stall (gate drained, destination flushed): the commit point. */
  commit(): Promise<void>;
  /** Committed, gate still paused: change the stack; returns the device no longer served. */
  apply(): BlockDevice;
  /** Not committed: undo what prepare() did (safe to call when it did nothing). */
  discard(): Promise<void>;
}

/** The disk moves to `dest` on this host: the shim records it and serves it from now on. */
export function swapToLocalFile(disk: MovableDisk, dest: Destination): Handover {
  let state: PreparedBacking | null = null;
  return {
    kind: 'local-swap',
    prepare: async () => {
      state = await disk.prepareBacking(dest.spec);
    },
    commit: async () => {
      if (!state) throw new Error(`switch-over to ${dest.spec}: commit before prepare`);
      await state.commit();
      state = null;
    },
    apply: () => disk.replaceBottom(dest.device),
    discard: async () => {
      const s = state;
      state = null;
      await s?.discard();
    },
  };
}

/** Catch-up copies outside the stall before the stall is taken whatever the final set's size. */
const MAX_CATCH_UP = 4;
/**
 * The final copy may fill this share of the downtime budget; the rest is for the drain, the
 * flush and the state rename (measured at 32 MiB/s of guest writes: 0.2, 3-6 and 2-3 ms).
 */
const COPY_SHARE = 0.5;
/** The flush inside the stall covers what was copied since the last flush: keep that short. */
const FLUSH_SHARE = 0.25;

/** Thrown after the commit point: the job must not roll back. */
export class CommittedError extends Error {
  override name = 'CommittedError';
  readonly code = 'swap-failed';
}

export async function switchOver(ctx: JobContext, handover: Handover, carry: DirtySet[]): Promise<SwitchResult> {
  const { gate, tracker, mirror, copier, dest, figures } = ctx;
  ctx.setPhase('switchover');
  const qmp = ctx.opts.suspendQmp ? await QmpClient.connect(ctx.opts.suspendQmp, { timeoutMs: 5000 }) : null;
  let stopped = false;
  let prepared = false;
  try {
    // Outside the stall. The flush writes back what the copy left in the page cache (without
    // it the stall's own flush took 1.6-2 s on 1 GiB). The guest keeps writing meanwhile:
    // when what it wrote since the last pass would take more than the copy's share of the
    // budget, copy that too and flush again, rather than stall for it.
    const pending = () => carry.reduce((n, set) => n + set.dirtyBytes(), 0) + (tracker.dirty?.dirtyBytes() ?? 0);
    for (let round = 0; ; round++) {
      const flushStart = performance.now();
      await dest.device.flush();
      const flushMs = performance.now() - flushStart;
      throwIfAborted(ctx.signal);
      const bytes = pending();
      const estimateMs = figures.passRate > 0 ? (bytes / figures.passRate) * 1000 : 0;
      const budget = ctx.opts.maxDowntimeMs;
      debug('switch-over catch-up %d: flush %d ms, %d bytes pending, estimated copy %d ms', round, Math.round(flushMs), bytes, Math.round(estimateMs));
      if (round >= MAX_CATCH_UP || (estimateMs <= COPY_SHARE * budget && flushMs <= FLUSH_SHARE * budget)) break;
      await copier.copy(unionRanges([...carry, tracker.swap()].map((set) => set.ranges())), { destIsZero: false });
      carry = [];
    }
    prepared = true;
    await handover.prepare();
    throwIfAborted(ctx.signal);

    const t0 = performance.now(); // the stall starts here
    if (qmp) {
      await qmp.execute('stop');
      stopped = true;
    }
    await gate.pause();
    throwIfAborted(ctx.signal);
    if (mirror.error) throw mirror.error;
    // Everything not on the destination yet: the carried sets and the writes since the last
    // swap (none are in flight: the gate is drained). After a mirror pass nothing is carried
    // and the tracker holds what was written since mirroring stopped (or, with the mirror
    // kept on under --bandwidth, nothing: it kept the destination in step).
    if (mirror.active && ctx.cursors.mirroredBelow < ctx.size) throw new Error(`switch-over before the mirror pass finished (cursor ${ctx.cursors.mirroredBelow} of ${ctx.size})`);
    const sets = [...carry, tracker.swap()];
    const t1 = performance.now();
    const before = copier.writtenBytes;
    // Charged to --bandwidth but never waiting for it: the guest is held.
    await copier.copy(unionRanges(sets.map((set) => set.ranges())), { destIsZero: false, deferLimit: true });
    if (mirror.error) throw mirror.error;
    const finalBytes = copier.writtenBytes - before;
    const t2 = performance.now();
    await dest.device.flush();
    throwIfAborted(ctx.signal);
    const t3 = performance.now();
    await faultPoint('switchover-before-commit');
    await handover.commit();
    prepared = false;
    await faultPoint('switchover-after-commit');
    // Committed: from here the destination is the disk, whatever happens next.
    let old;
    try {
      mirror.stop();
      old = handover.apply();
    } catch (e) {
      throw new CommittedError(`the new backing ${dest.spec} is recorded but the ${handover.kind} failed: ${(e as Error).message}; restart the shim to serve it`);
    }
    gate.resume();
    const t4 = performance.now();
    const stallMs = t4 - t0;
    figures.stallMs = stallMs;
    figures.stallParts = { drainMs: t1 - t0, copyMs: t2 - t1, flushMs: t3 - t2, commitMs: t4 - t3 };
    return { stallMs, finalBytes, old };
  } finally {
    if (prepared) await handover.discard().catch(() => {});
    if (stopped) await qmp!.execute('cont').catch(() => {});
    await qmp?.close().catch(() => {});
  }
}
