// DirtyBitmap: one bit per block in a Uint32Array. Exact: a block is dirty if and only if a
// recorded write touched it. 1 TiB at the default 64 KiB granularity takes 2 MiB. Iteration
// skips clean words (and runs through fully dirty ones) 32 blocks at a time, so walking a
// mostly clean bitmap costs little more than scanning its words.
import {
  DEFAULT_GRANULARITY, blockSpan, blocksToRange, checkGranularity, checkSize,
  type DirtyRange, type DirtySet,
} from './dirty-set.ts';

const ALL = 0xffffffff;

/** Index of the lowest set bit of a non-zero 32-bit word. */
function ctz(x: number): number {
  return 31 - Math.clz32(x & -x);
}

function popcount(x: number): number {
  x -= (x >>> 1) & 0x55555555;
  x = (x & 0x33333333) + ((x >>> 2) & 0x33333333);
  return (Math.imul((x + (x >>> 4)) & 0x0f0f0f0f, 0x01010101) >>> 24);
}

/** Bits [from, to) of one word set, 0 <= from < to <= 32. */
function mask(from: number, to: number): number {
  const high = to === 32 ? ALL : ((1 << to) - 1) >>> 0;
  return (high & (ALL << from)) >>> 0;
}

export class DirtyBitmap implements DirtySet {
  readonly kind = 'bitmap' as const;
  readonly granularity: number;
  readonly size: number;
  readonly blocks: number;
  /** The bits; exposed read-only for memory accounting and persistence. */
  readonly words: Uint32Array;
  #dirtyBlocks = 0;

  constructor(size: number, granularity = DEFAULT_GRANULARITY) {
    this.size = checkSize(size);
    this.granularity = checkGranularity(granularity);
    this.blocks = Math.ceil(size / granularity);
    this.words = new Uint32Array(Math.ceil(this.blocks / 32));
  }

  mark(offset: number, length: number): void {
    const span = blockSpan(this, offset, length);
    if (!span) return;
    const [first, last] = span;
    const w0 = first >>> 5, w1 = last >>> 5;
    for (let w = w0; w <= w1; w++) {
      const m = mask(w === w0 ? first & 31 : 0, w === w1 ? (last & 31) + 1 : 32);
      const old = this.words[w]!;
      const now = (old | m) >>> 0;
      if (now !== old) {
        this.#dirtyBlocks += popcount(now) - popcount(old);
        this.words[w] = now;
      }
    }
  }

  has(offset: number, length: number): boolean {
    const span = blockSpan(this, offset, length);
    if (!span) return false;
    const [first, last] = span;
    const w0 = first >>> 5, w1 = last >>> 5;
    for (let w = w0; w <= w1; w++) {
      const m = mask(w === w0 ? first & 31 : 0, w === w1 ? (last & 31) + 1 : 32);
      if ((this.words[w]! & m) !== 0) return true;
    }
    return false;
  }

  /** Whether block `index` is dirty. */
  test(index: number): boolean {
    return index >= 0 && index < this.blocks && (this.words[index >>> 5]! & (1 << (index & 31))) !== 0;
  }

  *ranges(from = 0): IterableIterator<DirtyRange> {
    if (from >= this.size) return;
    const firstBlock = Math.max(0, Math.floor(from / this.granularity));
    const w0 = firstBlock >>> 5;
    let runStart = -1; // block where the current dirty run began, -1 when outside a run
    for (let w = w0; w < this.words.length; w++) {
      let x = this.words[w]!;
      if (w === w0) x = (x & (ALL << (firstBlock & 31))) >>> 0;
      // Fast paths: a clean word outside a run, or a fully dirty word inside one.
      if (runStart < 0 ? x === 0 : x === ALL) continue;
      const base = w * 32;
      let bit = 0;
      while (bit < 32) {
        // Outside a run look for the next set bit; inside one, for the next clear bit.
        const rest = ((runStart < 0 ? x : ~x) & (ALL << bit)) >>> 0;
        if (rest === 0) break;
        bit = ctz(rest);
        if (runStart < 0) {
          runStart = base + bit;
        } else {
          yield blocksToRange(this, runStart, base + bit);
          runStart = -1;
        }
      }
    }
    if (runStart >= 0) yield blocksToRange(this, runStart, this.blocks);
  }

  dirtyBytes(): number {
    if (this.#dirtyBlocks === 0) return 0;
    // Every block is `granularity` long except perhaps the last, which the size clamps.
    const lastPartial = this.size % this.granularity;
    const lastDirty = lastPartial !== 0 && this.test(this.blocks - 1);
    return this.#dirtyBlocks * this.granularity - (lastDirty ? this.granularity - lastPartial : 0);
  }

  /** Number of dirty blocks. */
  dirtyBlocks(): number {
    return this.#dirtyBlocks;
  }

  clear(): void {
    this.words.fill(0);
    this.#dirtyBlocks = 0;
  }
}
