// The dirty set: which blocks of a disk were written since the copier last looked. Two
// implementations share this interface: DirtyBitmap (exact, one bit per block) and
// BloomDirtySet (small and fixed memory, may over-report, never misses). The copier only
// needs `ranges()` to know what to copy again and `dirtyBytes()` to judge convergence.

export interface DirtyRange {
  offset: number;
  length: number;
}

export interface DirtySet {
  readonly kind: 'bitmap' | 'bloom';
  /** Bytes per block: the unit in which writes are recorded. */
  readonly granularity: number;
  /** Size of the tracked device in bytes. */
  readonly size: number;
  /** Record that [offset, offset+length) was written; clamped to the device. */
  mark(offset: number, length: number): void;
  /** True when any block touching [offset, offset+length) may be dirty. */
  has(offset: number, length: number): boolean;
  /** Dirty runs from the block containing `from` on: merged, ascending, block aligned, clamped to size. */
  ranges(from?: number): Iterable<DirtyRange>;
  /** Bytes the dirty blocks cover (an estimate for Bloom sets). */
  dirtyBytes(): number;
  clear(): void;
}

export const DEFAULT_GRANULARITY = 64 * 1024;

/** Throws unless `granularity` is a power of two of at least 512 bytes. */
export function checkGranularity(granularity: number): number {
  if (!Number.isSafeInteger(granularity) || granularity < 512 || (granularity & (granularity - 1)) !== 0 || granularity > 2 ** 30) {
    throw new RangeError(`dirty-set granularity must be a power of two between 512 and 2^30, got ${granularity}`);
  }
  return granularity;
}

export function checkSize(size: number): number {
  if (!Number.isSafeInteger(size) || size < 0) throw new RangeError(`dirty-set size must be a non-negative safe integer, got ${size}`);
  return size;
}

/**
 * The blocks [first, last] that [offset, offset+length) touches, clamped to the device, or
 * null when the range is empty or lies past the end. Offsets may exceed 2^32, so this
 * divides rather than shifts (exact for powers of two).
 */
export function blockSpan(set: { granularity: number; size: number }, offset: number, length: number): [number, number] | null {
  const start = Math.max(0, offset);
  const end = Math.min(set.size, offset + length);
  if (!(end > start)) return null;
  return [Math.floor(start / set.granularity), Math.floor((end - 1) / set.granularity)];
}

/** The byte range of blocks [first, endBlock), clamped to the device size. */
export function blocksToRange(set: { granularity: number; size: number }, first: number, endBlock: number): DirtyRange {
  const offset = first * set.granularity;
  return { offset, length: Math.min(endBlock * set.granularity, set.size) - offset };
}
