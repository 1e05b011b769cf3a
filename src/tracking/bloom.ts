// BloomDirtySet: a dirty set in small, fixed memory for very large disks. Each marked block
// index sets k bits chosen by double hashing; has() answers "maybe dirty" when all k bits of
// some block are set. It never misses a marked block; it may report clean blocks as dirty
// (they get copied again, which is safe). The false-positive rate grows as more blocks are
// marked than it was sized for: `estimatedFalsePositiveRate()` tells the copier when a
// bitmap or a full pass would be cheaper.
import {
  DEFAULT_GRANULARITY, blockSpan, blocksToRange, checkGranularity, checkSize,
  type DirtyRange, type DirtySet,
} from './dirty-set.ts';

export interface BloomOptions {
  granularity?: number;
  /** Dirty blocks the set is sized for; default 1/16 of the device's blocks (at least 1024). */
  expectedBlocks?: number;
  /** Target false-positive rate at `expectedBlocks` marked blocks; default 1%. */
  falsePositiveRate?: number;
}

/** murmur3's 32-bit finalizer: a cheap, well-mixing hash step. */
function fmix32(h: number): number {
  h ^= h >>> 16;
  h = Math.imul(h, 0x85ebca6b);
  h ^= h >>> 13;
  h = Math.imul(h, 0xc2b2ae35);
  h ^= h >>> 16;
  return h >>> 0;
}

export class BloomDirtySet implements DirtySet {
  readonly kind = 'bloom' as const;
  readonly granularity: number;
  readonly size: number;
  readonly blocks: number;
  /** Number of filter bits (m) and hash functions (k). */
  readonly bitCount: number;
  readonly hashes: number;
  readonly words: Uint32Array;
  #setBits = 0;

  constructor(size: number, opts: BloomOptions = {}) {
    this.size = checkSize(size);
    this.granularity = checkGranularity(opts.granularity ?? DEFAULT_GRANULARITY);
    this.blocks = Math.ceil(size / this.granularity);
    const n = Math.max(1, Math.ceil(opts.expectedBlocks ?? Math.max(1024, this.blocks / 16)));
    const p = opts.falsePositiveRate ?? 0.01;
    if (!(p > 0 && p < 1)) throw new RangeError(`Bloom false-positive rate must be in (0, 1), got ${p}`);
    // The textbook optimum: m = -n ln p / (ln 2)^2 bits, k = (m / n) ln 2 hashes.
    const m = Math.max(64, Math.ceil((-n * Math.log(p)) / (Math.LN2 * Math.LN2)));
    this.words = new Uint32Array(Math.ceil(m / 32));
    this.bitCount = this.words.length * 32;
    this.hashes = Math.min(16, Math.max(1, Math.round((this.bitCount / n) * Math.LN2)));
  }

  // The two base hashes of the block being marked or tested (Kirsch-Mitzenmacher double
  // hashing: bit i = h1 + i*h2 mod m). Fields rather than a returned pair: no allocation
  // per block in the hot loop of ranges().
  #h1 = 0;
  #h2 = 0;

  #hash(index: number): void {
    const lo = index >>> 0;
    const hi = Math.floor(index / 0x100000000);
    this.#h1 = fmix32(lo ^ fmix32(hi ^ 0x9e3779b9));
    this.#h2 = fmix32(this.#h1 ^ lo ^ 0x7f4a7c15) | 1;
  }

  #bit(i: number): number {
    return ((this.#h1 + Math.imul(i, this.#h2)) >>> 0) % this.bitCount;
  }

  #markBlock(index: number): void {
    this.#hash(index);
    for (let i = 0; i < this.hashes; i++) {
      const bit = this.#bit(i), w = bit >>> 5, m = 1 << (bit & 31);
      if ((this.words[w]! & m) === 0) {
        this.words[w]! |= m;
        this.#setBits++;
      }
    }
  }

  /** Whether block `index` may be dirty. */
  test(index: number): boolean {
    this.#hash(index);
    for (let i = 0; i < this.hashes; i++) {
      const bit = this.#bit(i);
      if ((this.words[bit >>> 5]! & (1 << (bit & 31))) === 0) return false;
    }
    return true;
  }

  mark(offset: number, length: number): void {
    const span = blockSpan(this, offset, length);
    if (!span) return;
    for (let b = span[0]; b <= span[1]; b++) this.#markBlock(b);
  }

  has(offset: number, length: number): boolean {
    const span = blockSpan(this, offset, length);
    if (!span) return false;
    for (let b = span[0]; b <= span[1]; b++) if (this.test(b)) return true;
    return false;
  }

  /** Tests every block from `from` on: O(blocks x k), fine for a copier pass. */
  *ranges(from = 0): IterableIterator<DirtyRange> {
    if (this.#setBits === 0 || from >= this.size) return;
    let runStart = -1;
    for (let b = Math.max(0, Math.floor(from / this.granularity)); b < this.blocks; b++) {
      const dirty = this.test(b);
      if (dirty && runStart < 0) runStart = b;
      else if (!dirty && runStart >= 0) {
        yield blocksToRange(this, runStart, b);
        runStart = -1;
      }
    }
    if (runStart >= 0) yield blocksToRange(this, runStart, this.blocks);
  }

  /** Distinct blocks marked, estimated from the fill ratio (Swamidass and Baldi). */
  estimatedBlocks(): number {
    const x = this.#setBits, m = this.bitCount;
    if (x === 0) return 0;
    if (x >= m) return this.blocks;
    return Math.min(this.blocks, Math.round((-m / this.hashes) * Math.log(1 - x / m)));
  }

  /** An estimate: the copier uses it to judge convergence, not to size a buffer exactly. */
  dirtyBytes(): number {
    return Math.min(this.size, this.estimatedBlocks() * this.granularity);
  }

  /** The chance that an unmarked block tests dirty now: (fraction of bits set)^k. */
  estimatedFalsePositiveRate(): number {
    return (this.#setBits / this.bitCount) ** this.hashes;
  }

  clear(): void {
    this.words.fill(0);
    this.#setBits = 0;
  }
}
