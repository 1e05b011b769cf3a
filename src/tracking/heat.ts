// HeatMap: how often each region of the disk is written, with decay. The copier records
// every guest write, calls decay() once per pass, and leaves hot regions for the last pass
// instead of copying them again and again (idea 2 in DESIGN.md). One Float32 per region:
// 1 TiB at the default 1 MiB region is 4 MiB.
import { checkSize } from './dirty-set.ts';

export interface HotRegion {
  offset: number;
  length: number;
  /** Decayed write count. */
  writes: number;
}

export const DEFAULT_REGION_SIZE = 1024 * 1024;

export class HeatMap {
  readonly size: number;
  readonly regionSize: number;
  readonly counts: Float32Array;

  constructor(size: number, regionSize = DEFAULT_REGION_SIZE) {
    this.size = checkSize(size);
    if (!Number.isSafeInteger(regionSize) || regionSize < 1) throw new RangeError(`heat-map region size must be a positive integer, got ${regionSize}`);
    this.regionSize = regionSize;
    this.counts = new Float32Array(Math.ceil(size / regionSize));
  }

  /** The regions [first, last] that [offset, offset+length) touches, or null if none. */
  #span(offset: number, length: number): [number, number] | null {
    const start = Math.max(0, offset), end = Math.min(this.size, offset + length);
    if (!(end > start)) return null;
    return [Math.floor(start / this.regionSize), Math.floor((end - 1) / this.regionSize)];
  }

  /** One write counts once in each region it touches. */
  record(offset: number, length: number): void {
    const span = this.#span(offset, length);
    if (!span) return;
    for (let r = span[0]; r <= span[1]; r++) this.counts[r]! += 1;
  }

  /** Multiply every count by `factor` (0..1): old writes matter less than recent ones. */
  decay(factor = 0.5): void {
    if (!(factor >= 0 && factor <= 1)) throw new RangeError(`heat decay factor must be in [0, 1], got ${factor}`);
    for (let r = 0; r < this.counts.length; r++) {
      const c = this.counts[r]!;
      // Flush tiny leftovers to zero so cold regions stop showing up at all.
      if (c !== 0) this.counts[r] = c * factor < 1e-3 ? 0 : c * factor;
    }
  }

  /** The hottest count of any region touching the range. */
  heat(offset: number, length: number): number {
    const span = this.#span(offset, length);
    let max = 0;
    if (span) for (let r = span[0]; r <= span[1]; r++) max = Math.max(max, this.counts[r]!);
    return max;
  }

  /** True when some region touching the range has at least `threshold` (decayed) writes. */
  isHot(offset: number, length: number, threshold: number): boolean {
    const h = this.heat(offset, length);
    return h > 0 && h >= threshold;
  }

  /** The `limit` hottest regions, hottest first (ties: lower offset first). */
  hotRegions(limit = 10): HotRegion[] {
    const top: Array<{ region: number; writes: number }> = [];
    if (limit <= 0) return [];
    for (let r = 0; r < this.counts.length; r++) {
      const w = this.counts[r]!;
      if (w <= 0 || (top.length === limit && w <= top[top.length - 1]!.writes)) continue;
      // Insertion into a short sorted list: limit is small (5 for status, tens for the copier).
      let i = top.length;
      while (i > 0 && top[i - 1]!.writes < w) i--;
      top.splice(i, 0, { region: r, writes: w });
      if (top.length > limit) top.pop();
    }
    return top.map(({ region, writes }) => {
      const offset = region * this.regionSize;
      return { offset, length: Math.min(this.regionSize, this.size - offset), writes };
    });
  }

  clear(): void {
    this.counts.fill(0);
  }
}
