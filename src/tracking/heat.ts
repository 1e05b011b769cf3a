// HeatMap: how often each region of the disk is written, with decay. The copier records
// every guest write, calls decay() once per pass, and leaves hot regions for the last pass
// instead of copying them again and again (idea 2 in DESIGN.md). Sparse, in two levels: a
// Float32 per region, in leaves of LEAF_REGIONS regions (1 KiB, 256 MiB of disk at 1 MiB
// regions) allocated on the first write into them, so a large, mostly idle disk costs what
// its written stretches cost, decay() and hotRegions() walk only those, and the worst case
// (every leaf written) stays that of one dense array (64 MiB at 16 TiB) plus an entry a leaf.
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
/** Regions per leaf. */
const LEAF_REGIONS = 256;

export class HeatMap {
  readonly size: number;
  readonly regionSize: number;
  /** Decayed write counts by leaf (region index / LEAF_REGIONS); leaves never written (or decayed away) are absent. */
  readonly #leaves = new Map<number, Float32Array>();

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
    for (let r = span[0]; r <= span[1]; r++) {
      const l = Math.floor(r / LEAF_REGIONS);
      let leaf = this.#leaves.get(l);
      if (!leaf) this.#leaves.set(l, (leaf = new Float32Array(LEAF_REGIONS)));
      leaf[r - l * LEAF_REGIONS]! += 1;
    }
  }

  /** Multiply every count by `factor` (0..1): old writes matter less than recent ones. */
  decay(factor = 0.5): void {
    if (!(factor >= 0 && factor <= 1)) throw new RangeError(`heat decay factor must be in [0, 1], got ${factor}`);
    for (const [l, leaf] of this.#leaves) {
      let live = false;
      for (let i = 0; i < LEAF_REGIONS; i++) {
        const c = leaf[i]!;
        if (c === 0) continue;
        // Flush tiny leftovers to zero so cold regions stop showing up at all.
        leaf[i] = c * factor < 1e-3 ? 0 : c * factor;
        live ||= leaf[i] !== 0;
      }
      if (!live) this.#leaves.delete(l); // and a cold stretch stops costing memory
    }
  }

  /** The hottest count of any region touching the range. */
  heat(offset: number, length: number): number {
    const span = this.#span(offset, length);
    let max = 0;
    if (!span) return 0;
    for (let r = span[0]; r <= span[1]; ) {
      const leaf = this.#leaves.get(Math.floor(r / LEAF_REGIONS));
      const leafEnd = Math.min(span[1] + 1, (Math.floor(r / LEAF_REGIONS) + 1) * LEAF_REGIONS);
      if (leaf) for (let q = r; q < leafEnd; q++) max = Math.max(max, leaf[q % LEAF_REGIONS]!);
      r = leafEnd;
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
    for (const [l, leaf] of this.#leaves) for (let q = 0; q < LEAF_REGIONS; q++) {
      const r = l * LEAF_REGIONS + q, w = leaf[q]!;
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

  /** Regions with a count. */
  get regions(): number {
    let n = 0;
    for (const leaf of this.#leaves.values()) for (let i = 0; i < LEAF_REGIONS; i++) if (leaf[i] !== 0) n++;
    return n;
  }

  /** Memory the counts hold, estimated: each allocated leaf and its entry. */
  memoryBytes(): number {
    return this.#leaves.size * (LEAF_REGIONS * 4 + 96);
  }

  clear(): void {
    this.#leaves.clear();
  }
}
