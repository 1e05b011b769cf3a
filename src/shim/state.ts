// A shim's durable record of which device it serves. The origin is what the operator first
// gave; the backing is where the disk lives now (it changes only at a switch-over, and is
// written with write-then-rename before the devices are swapped). A restarted shim reads it,
// so it serves the migrated disk, not the stale source.
// This file is THE record of where a disk lives: vmshiftd keeps it when the shim stops (if it
// records a move), follows it into its registry and into a libvirt domain's XML, and a later
// start that names any earlier path of the same disk serves the backing recorded here.
import { z } from 'zod';
import { prepareFileAtomic, readJsonIfExists, type PreparedFile } from '../util/atomic-file.ts';

export const ShimStateSchema = z.object({
  version: z.literal(1),
  origin: z.string().min(1),
  backing: z.string().min(1),
  updatedAt: z.string(),
  history: z.array(z.object({ from: z.string(), to: z.string(), at: z.string() })).default([]),
});
export type ShimState = z.infer<typeof ShimStateSchema>;

export async function loadShimState(path: string): Promise<ShimState | undefined> {
  const raw = await readJsonIfExists<unknown>(path);
  if (raw === undefined) return undefined;
  const parsed = ShimStateSchema.safeParse(raw);
  if (!parsed.success) throw new Error(`${path}: not a vmshift shim state file: ${parsed.error.issues[0]?.message}`);
  return parsed.data;
}

export async function saveShimState(path: string, state: ShimState): Promise<void> {
  await (await prepareShimState(path, state)).commit();
}

/** Write the new state beside the old one, to be renamed into place later (see prepareFileAtomic). */
export function prepareShimState(path: string, state: ShimState): Promise<PreparedFile> {
  return prepareFileAtomic(path, JSON.stringify(state, null, 2) + '\n');
}

/** Every path the disk has been known by (origin, each move's ends, the backing). */
export function lineage(state: ShimState): Set<string> {
  const paths = new Set([state.origin, state.backing]);
  for (const h of state.history) {
    paths.add(h.from);
    paths.add(h.to);
  }
  return paths;
}
