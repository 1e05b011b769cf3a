// HeatMap: how often each region of the disk is written, with decay. The copier records
// every guest write, calls decay() once per pass, and leaves hot regions for the last pass
// instead of copying them again and again (idea 2 in DESIGN.md). Sparse: a count per region
// written (a Map), so a large, mostly idle disk costs what its written regions cost, and
// decay() and hotRegions() walk only those.
import { checkSize } from './dirty-set.ts';

export interface HotRegion {
  offset: number;
  length: number;
  /** Decayed write count. */
  writes: number;
}

export const DEFAULT_REGION_SIZE = 1024 * 1024;
/** A write spanning more regions than this (a large discard) is counted in none: it is not a rewrite pattern. */
const MAX_REGIONS_PER_WRITE = 64;

export class HeatMap {
  readonly size: number;
  readonly regionSize: number;
  /** Decayed write count by region index; regions never written (or decayed away) are absent. */
  readonly counts = new Map<number, number>();

  constructor(size: number, regionSize = DEFAULT_REGION_SIZE) {
    this.size = checkSize(size);
    if (!Number.isSafeInteger(regionSize) || regionSize < 1) throw new RangeError(`heat-map region size must be a positive integer, got ${regionSize}`);
    this.regionSize = regionSize;
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
    if (!span || span[1] - span[0] >= MAX_REGIONS_PER_WRITE) return;
    for (let r = span[0]; r <= span[1]; r++) this.counts.set(r, (this.counts.get(r) ?? 0) + 1);
  }

  /** Multiply every count by `factor` (0..1): old writes matter less than recent ones. */
  decay(factor = 0.5): void {
    if (!(factor >= 0 && factor <= 1)) throw new RangeError(`heat decay factor must be in [0, 1], got ${factor}`);
    for (const [r, c] of this.counts) {
      // Drop tiny leftovers so cold regions stop showing up (and costing memory) at all.
      if (c * factor < 1e-3) this.counts.delete(r);
      else this.counts.set(r, c * factor);
    }
  }

  /** The hottest count of any region touching the range. */
  heat(offset: number, length: number): number {
    const span = this.#span(offset, length);
    let max = 0;
    if (!span) return 0;
    if (span[1] - span[0] > this.counts.size) {
      for (const [r, c] of this.counts) if (r >= span[0] && r <= span[1]) max = Math.max(max, c);
    } else {
      for (let r = span[0]; r <= span[1]; r++) max = Math.max(max, this.counts.get(r) ?? 0);
    }
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
    for (const [r, w] of this.counts) {
      if (w <= 0 || (top.length === limit && w < top[top.length - 1]!.writes)) continue;
      // Insertion into a short sorted list: limit is small (5 for status, tens for the copier).
      let i = top.length;
      while (i > 0 && (top[i - 1]!.writes < w || (top[i - 1]!.writes === w && top[i - 1]!.region > r))) i--;
      top.splice(i, 0, { region: r, writes: w });
      if (top.length > limit) top.pop();
    }
    return top.map(({ region, writes }) => {
      const offset = region * this.regionSize;
      return { offset, length: Math.min(this.regionSize, this.size - offset), writes };
    });
  }

  /** Regions with a count (the map's memory grows with these). */
  get regions(): number {
    return this.counts.size;
  }

  clear(): void {
    this.counts.clear();
  }
}
