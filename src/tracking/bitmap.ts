// DirtyBitmap: one bit per block, exact: a block is dirty if and only if a recorded write
// touched it. Sparse, in two levels, so that its memory and the cost of walking it grow
// with what was written, not with the disk's size:
//   - leaves of LEAF_BLOCKS bits (1 KiB), allocated on the first write into them and kept
//     in a Map by leaf index; a leaf marked whole in one write shares one read-only FULL
//     leaf (a guest's discard of the whole disk costs a Map entry per leaf, no bits);
//   - the sorted list of allocated leaf indexes is the summary: ranges() jumps from leaf
//     to leaf, and inside a leaf skips clean words (and runs through fully dirty ones) 32
//     blocks at a time.
// A 16 TiB disk at 64 KiB blocks with nothing written costs a few hundred bytes; fully
// written, 32 MiB plus the Map's entries (docs/performance.md has the figures).
import {
  DEFAULT_GRANULARITY, blockSpan, blocksToRange, checkGranularity, checkSize,
  type DirtyRange, type DirtySet,
} from './dirty-set.ts';

const ALL = 0xffffffff;
/** Blocks per leaf (a power of two): 8192 bits, 1 KiB. */
export const LEAF_BLOCKS = 8192;
const LEAF_SHIFT = 13;
const LEAF_WORDS = LEAF_BLOCKS / 32;
/** The shared leaf of a fully dirty stretch; never written (marks on it change nothing). */
const FULL = new Uint32Array(LEAF_WORDS).fill(ALL);
/** What one Map entry and its leaf's object header cost beyond the bits (an estimate for accounting). */
const ENTRY_OVERHEAD = 96;

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

/** First index in the ascending `keys` that is >= `x` (keys.length when none). */
function lowerBound(keys: number[], x: number): number {
  let lo = 0, hi = keys.length;
  while (lo < hi) {
    const mid = (lo + hi) >>> 1;
    if (keys[mid]! < x) lo = mid + 1;
    else hi = mid;
  }
  return lo;
}

export class DirtyBitmap implements DirtySet {
  readonly kind = 'bitmap' as const;
  readonly granularity: number;
  readonly size: number;
  readonly blocks: number;
  readonly #leaves = new Map<number, Uint32Array>();
  /** Allocated leaf indexes, ascending (the summary level). */
  #keys: number[] = [];
  #dirtyBlocks = 0;
  /** Words ranges() has read so far: its cost, for tests (it must not grow with the size). */
  scannedWords = 0;

  constructor(size: number, granularity = DEFAULT_GRANULARITY) {
    this.size = checkSize(size);
    this.granularity = checkGranularity(granularity);
    this.blocks = Math.ceil(size / granularity);
  }

  /** Blocks of leaf `leaf` that exist (the last leaf may be short). */
  #leafBlocks(leaf: number): number {
    return Math.min(LEAF_BLOCKS, this.blocks - leaf * LEAF_BLOCKS);
  }

  #leaf(index: number): Uint32Array {
    let leaf = this.#leaves.get(index);
    if (!leaf) {
      leaf = new Uint32Array(LEAF_WORDS);
      this.#insert(index, leaf);
    }
    return leaf;
  }

  #insert(index: number, leaf: Uint32Array): void {
    this.#leaves.set(index, leaf);
    const at = lowerBound(this.#keys, index);
    if (this.#keys[at] !== index) this.#keys.splice(at, 0, index);
  }

  mark(offset: number, length: number): void {
    const span = blockSpan(this, offset, length);
    if (!span) return;
    const [first, last] = span;
    for (let l = Math.floor(first / LEAF_BLOCKS), lEnd = Math.floor(last / LEAF_BLOCKS); l <= lEnd; l++) {
      const base = l * LEAF_BLOCKS;
      const from = Math.max(first, base) - base, to = Math.min(last, base + LEAF_BLOCKS - 1) - base; // inclusive, in the leaf
      const old = this.#leaves.get(l);
      if (old === FULL) continue;
      if (from === 0 && to === this.#leafBlocks(l) - 1) {
        // The whole leaf: share FULL, and count only the bits that were clear.
        this.#dirtyBlocks += this.#leafBlocks(l) - (old ? countLeaf(old) : 0);
        this.#insert(l, FULL);
        continue;
      }
      const leaf = old ?? this.#leaf(l);
      const w0 = from >>> 5, w1 = to >>> 5;
      for (let w = w0; w <= w1; w++) {
        const m = mask(w === w0 ? from & 31 : 0, w === w1 ? (to & 31) + 1 : 32);
        const was = leaf[w]!;
        const now = (was | m) >>> 0;
        if (now !== was) {
          this.#dirtyBlocks += popcount(now) - popcount(was);
          leaf[w] = now;
        }
      }
    }
  }

  has(offset: number, length: number): boolean {
    const span = blockSpan(this, offset, length);
    if (!span) return false;
    const [first, last] = span;
    // Only the allocated leaves the span touches are looked at.
    const keys = this.#keys, lEnd = Math.floor(last / LEAF_BLOCKS);
    for (let i = lowerBound(keys, Math.floor(first / LEAF_BLOCKS)); i < keys.length && keys[i]! <= lEnd; i++) {
      const l = keys[i]!, leaf = this.#leaves.get(l)!, base = l * LEAF_BLOCKS;
      if (leaf === FULL) return true;
      const from = Math.max(first, base) - base, to = Math.min(last, base + LEAF_BLOCKS - 1) - base;
      const w0 = from >>> 5, w1 = to >>> 5;
      for (let w = w0; w <= w1; w++) {
        const m = mask(w === w0 ? from & 31 : 0, w === w1 ? (to & 31) + 1 : 32);
        if ((leaf[w]! & m) !== 0) return true;
      }
    }
    return false;
  }

  /** Whether block `index` is dirty. */
  test(index: number): boolean {
    if (!(index >= 0 && index < this.blocks)) return false;
    const leaf = this.#leaves.get(Math.floor(index / LEAF_BLOCKS));
    const bit = index & (LEAF_BLOCKS - 1);
    return leaf !== undefined && (leaf[bit >>> 5]! & (1 << (bit & 31))) !== 0;
  }

  *ranges(from = 0): IterableIterator<DirtyRange> {
    if (from >= this.size || this.#dirtyBlocks === 0) return;
    const firstBlock = Math.max(0, Math.floor(from / this.granularity));
    const keys = this.#keys;
    let runStart = -1; // block where the current dirty run began, -1 when outside a run
    let prevEnd = -1; // first block after the previous leaf walked
    for (let i = lowerBound(keys, firstBlock >>> LEAF_SHIFT); i < keys.length; i++) {
      const l = keys[i]!, leaf = this.#leaves.get(l)!, base = l * LEAF_BLOCKS;
      // A run open at the end of the previous leaf ends there unless this leaf follows it.
      if (runStart >= 0 && base !== prevEnd) {
        yield blocksToRange(this, runStart, prevEnd);
        runStart = -1;
      }
      prevEnd = base + this.#leafBlocks(l);
      const startBit = base < firstBlock ? firstBlock - base : 0;
      for (let w = startBit >>> 5; w < LEAF_WORDS; w++) {
        let x = leaf[w]!;
        this.scannedWords++;
        if (w === startBit >>> 5) x = (x & (ALL << (startBit & 31))) >>> 0;
        // Fast paths: a clean word outside a run, or a fully dirty word inside one.
        if (runStart < 0 ? x === 0 : x === ALL) continue;
        let bit = 0;
        while (bit < 32) {
          // Outside a run look for the next set bit; inside one, for the next clear bit.
          const rest = ((runStart < 0 ? x : ~x) & (ALL << bit)) >>> 0;
          if (rest === 0) break;
          bit = ctz(rest);
          if (runStart < 0) runStart = base + w * 32 + bit;
          else {
            yield blocksToRange(this, runStart, base + w * 32 + bit);
            runStart = -1;
          }
        }
      }
    }
    if (runStart >= 0) yield blocksToRange(this, runStart, Math.min(prevEnd, this.blocks));
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

  /** Leaves allocated (FULL ones included: they cost an entry, not bits). */
  get leaves(): number {
    return this.#leaves.size;
  }

  /** Memory the set holds, estimated: own bits of each allocated leaf plus its entry. */
  memoryBytes(): number {
    let n = this.#keys.length * 8;
    for (const leaf of this.#leaves.values()) n += ENTRY_OVERHEAD + (leaf === FULL ? 0 : leaf.byteLength);
    return n;
  }

  /** What a dense bitmap of the same size and granularity would take. */
  denseBytes(): number {
    return Math.ceil(this.blocks / 32) * 4;
  }

  clear(): void {
    this.#leaves.clear();
    this.#keys = [];
    this.#dirtyBlocks = 0;
  }
}

function countLeaf(leaf: Uint32Array): number {
  let n = 0;
  for (let w = 0; w < leaf.length; w++) if (leaf[w] !== 0) n += popcount(leaf[w]!);
  return n;
}
