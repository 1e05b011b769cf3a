// Dirty tracking: the sets a Tracker records writes into, and the heat map.
import { BloomDirtySet, type BloomOptions } from './bloom.ts';
import { DirtyBitmap } from './bitmap.ts';
import type { DirtySet } from './dirty-set.ts';

export * from './dirty-set.ts';
export { DirtyBitmap } from './bitmap.ts';
export { BloomDirtySet, type BloomOptions } from './bloom.ts';
export { HeatMap, DEFAULT_REGION_SIZE, type HotRegion } from './heat.ts';

export type DirtySetKind = DirtySet['kind'];

/** A fresh, empty dirty set of the given kind for a device of `size` bytes. */
export function createDirtySet(kind: DirtySetKind, size: number, opts: BloomOptions = {}): DirtySet {
  switch (kind) {
    case 'bitmap':
      return new DirtyBitmap(size, opts.granularity);
    case 'bloom':
      return new BloomDirtySet(size, opts);
    default:
      throw new RangeError(`unknown dirty-set kind ${String(kind)}`);
  }
}
