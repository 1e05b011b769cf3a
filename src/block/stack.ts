// The stack recipes, written once. A served disk is
//     Gate -> Tracker -> bottom device
// and, while a storage migration runs, the job's own
//     Gate -> Tracker (the job's kind and grain, reading the job's cursor) -> Mirror -> bottom
//                                                                              \-> destination
// The shim builds the first at start and after a switch-over; the job builds the second.
// describeStack walks any stack top-down by each layer's own name (nbdkit's backend chain
// does the same), for `vmshift status` and for errors.
import type { BlockDevice } from './device.ts';
import { Gate } from './gate.ts';
import { Layer } from './layer.ts';
import { Mirror, type MirrorCursor } from './mirror.ts';
import { Tracker, type TrackingCursor } from './tracker.ts';

export type TrackKind = 'bitmap' | 'bloom' | 'none';

/** How a served disk tracks writes: the same below the gate before and after a switch-over. */
export interface TrackRecipe {
  track: TrackKind;
  granularity: number;
}

/** What sits under the gate of a served disk: its tracker (heat on, for status and jobs). */
export function servingStack(bottom: BlockDevice, recipe: TrackRecipe): Tracker {
  return new Tracker(bottom, { kind: recipe.track, granularity: recipe.granularity, heat: true });
}

/** A served disk: the gate on top of servingStack. */
export function servedDisk(bottom: BlockDevice, recipe: TrackRecipe): Gate {
  return new Gate(servingStack(bottom, recipe));
}

export interface MigratingRecipe {
  kind: 'bitmap' | 'bloom';
  granularity: number;
  heat: boolean;
  /** The job's cursors (src/migrate/cursors.ts), read by both layers. */
  cursors: TrackingCursor & MirrorCursor;
  /** A peer behind a link: mirrored writes the destination leaves unanswered this long are answered by the source alone (Mirror). */
  degradeAfterMs?: number | null;
  /** Recorded durably before the first write is answered by the source alone (Mirror). */
  onDegrade?: () => Promise<void>;
}

/** What a migration job puts under the gate: its tracker over an (inactive) mirror over the source. */
export function migratingStack(source: BlockDevice, destination: BlockDevice, recipe: MigratingRecipe): { tracker: Tracker; mirror: Mirror } {
  const mirror = new Mirror(source, destination, recipe.cursors, { degradeAfterMs: recipe.degradeAfterMs ?? null, granularity: recipe.granularity, onDegrade: recipe.onDegrade });
  const tracker = new Tracker(mirror, { kind: recipe.kind, granularity: recipe.granularity, heat: recipe.heat, cursor: recipe.cursors });
  return { tracker, mirror };
}

/** The stack from `top` down, one entry per layer and the bottom device last. */
export function describeStack(top: BlockDevice): string[] {
  const out: string[] = [];
  let dev: BlockDevice = top;
  // Bounded: a stack is a handful of layers; a cycle would be a bug, not a reason to hang.
  for (let i = 0; i < 32; i++) {
    if (!(dev instanceof Layer)) {
      out.push(dev.name);
      return out;
    }
    out.push(dev.describe());
    dev = dev.next;
  }
  out.push('...');
  return out;
}
