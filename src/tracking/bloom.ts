// BloomDirtySet: a dirty set in small, fixed memory for very large disks. Each marked block
// index sets k bits chosen by double hashing; has() answers "maybe dirty" when all k bits of
// some block are set. It never misses a marked block; it may report clean blocks as dirty
// (they get copied again, which is safe). The false-positive rate grows as more blocks are
// marked than it was sized for: `estimatedFalsePositiveRate()` tells the copier when a
// bitmap or a full pass would be cheaper.
// Walking it costs what was written, not the disk's size: an exact sparse summary (a
// DirtyBitmap of SUMMARY_FACTOR blocks a bit) says which stretches were marked at all, and
// ranges() tests blocks only there. Marks that cover whole summary blocks (a guest's
// discard of a large range) go into a second exact sparse set instead of k bits per block.
import { DirtyBitmap } from './bitmap.ts';
import {
  DEFAULT_GRANULARITY, blockSpan, blocksToRange, checkGranularity, checkSize,
  type DirtyRange, type DirtySet,
} from './dirty-set.ts';

export interface BloomOptions {
  granularity?: number;
  /** Dirty blocks the set is sized for; default 1/16 of the device's blocks, at least 1024 and at most 2^20 (1.2 MiB at 1%). */
  expectedBlocks?: number;
  /** Target false-positive rate at `expectedBlocks` marked blocks; default 1%. */
  falsePositiveRate?: number;
}

/** Blocks per bit of the summary (and of the whole-stretch set). */
export const SUMMARY_FACTOR = 64;
/** The default sizing's ceiling: the filter's memory stays fixed however large the disk. */
const MAX_DEFAULT_EXPECTED = 2 ** 20;

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
  /** Exact, coarse: every summary block any mark touched. */
  readonly #summary: DirtyBitmap;
  /** Exact, coarse: summary blocks marked whole (not hashed into the filter). */
  readonly #whole: DirtyBitmap;

  constructor(size: number, opts: BloomOptions = {}) {
    this.size = checkSize(size);
    this.granularity = checkGranularity(opts.granularity ?? DEFAULT_GRANULARITY);
    this.blocks = Math.ceil(size / this.granularity);
    const n = Math.max(1, Math.ceil(opts.expectedBlocks ?? Math.min(MAX_DEFAULT_EXPECTED, Math.max(1024, this.blocks / 16))));
    const p = opts.falsePositiveRate ?? 0.01;
    if (!(p > 0 && p < 1)) throw new RangeError(`Bloom false-positive rate must be in (0, 1), got ${p}`);
    // The textbook optimum: m = -n ln p / (ln 2)^2 bits, k = (m / n) ln 2 hashes.
    const m = Math.max(64, Math.ceil((-n * Math.log(p)) / (Math.LN2 * Math.LN2)));
    this.words = new Uint32Array(Math.ceil(m / 32));
    this.bitCount = this.words.length * 32;
    this.hashes = Math.min(16, Math.max(1, Math.round((this.bitCount / n) * Math.LN2)));
    const coarse = Math.min(2 ** 30, this.granularity * SUMMARY_FACTOR);
    this.#summary = new DirtyBitmap(size, coarse);
    this.#whole = new DirtyBitmap(size, coarse);
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
    if (this.#whole.test(Math.floor(index / this.#factor))) return true;
    return this.#testBits(index);
  }

  /** Blocks per summary bit (SUMMARY_FACTOR unless the granularity is huge). */
  get #factor(): number {
    return this.#summary.granularity / this.granularity;
  }

  /** Blocks whose filter bits were tested so far: the cost of ranges(), for tests. */
  testedBlocks = 0;

  #testBits(index: number): boolean {
    this.testedBlocks++;
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
    this.#summary.mark(offset, length);
    const [first, last] = span, f = this.#factor;
    // Summary blocks the mark covers whole (the device's last, short one counts when it ends there).
    const cFirst = Math.ceil(first / f);
    const cEnd = last + 1 === this.blocks ? Math.ceil(this.blocks / f) : Math.floor((last + 1) / f);
    if (cEnd > cFirst) {
      this.#whole.mark(cFirst * this.#summary.granularity, (cEnd - cFirst) * this.#summary.granularity);
      for (let b = first; b < cFirst * f; b++) this.#markBlock(b);
      for (let b = cEnd * f; b <= last; b++) this.#markBlock(b);
    } else {
      for (let b = first; b <= last; b++) this.#markBlock(b);
    }
  }

  has(offset: number, length: number): boolean {
    const span = blockSpan(this, offset, length);
    if (!span || !this.#summary.has(offset, length)) return false;
    const first = this.ranges(span[0] * this.granularity).next();
    return !first.done && first.value.offset <= span[1] * this.granularity;
  }

  /**
   * Tests the blocks of the stretches the summary says were marked (k hashes each), and
   * takes whole-marked stretches in one step: O(marked stretches x SUMMARY_FACTOR x k).
   */
  *ranges(from = 0): IterableIterator<DirtyRange> {
    if (from >= this.size) return;
    const f = this.#factor, first = Math.max(0, Math.floor(from / this.granularity));
    let runStart = -1, runEnd = -1;
    for (const r of this.#summary.ranges(from)) {
      const cFrom = r.offset / this.#summary.granularity;
      const cTo = Math.ceil((r.offset + r.length) / this.#summary.granularity);
      for (let c = cFrom; c < cTo; c++) {
        const lo = Math.max(first, c * f), hi = Math.min(this.blocks, (c + 1) * f);
        const whole = this.#whole.test(c);
        for (let b = lo; b < hi; b++) {
          if (whole || this.#testBits(b)) {
            if (runStart >= 0 && runEnd === b) runEnd = whole ? hi : b + 1;
            else {
              if (runStart >= 0) yield blocksToRange(this, runStart, runEnd);
              runStart = b;
              runEnd = whole ? hi : b + 1;
            }
            if (whole) break;
          }
        }
      }
    }
    if (runStart >= 0) yield blocksToRange(this, runStart, runEnd);
  }

  /** Distinct blocks marked, estimated from the fill ratio (Swamidass and Baldi), plus whole-marked stretches. */
  estimatedBlocks(): number {
    const x = this.#setBits, m = this.bitCount;
    const whole = this.#whole.dirtyBlocks() * this.#factor;
    if (x === 0) return Math.min(this.blocks, whole);
    if (x >= m) return this.blocks;
    return Math.min(this.blocks, whole + Math.round((-m / this.hashes) * Math.log(1 - x / m)));
  }

  /** Memory the set holds: the filter's fixed bits and the summaries' leaves. */
  memoryBytes(): number {
    return this.words.byteLength + this.#summary.memoryBytes() + this.#whole.memoryBytes();
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
    this.#summary.clear();
    this.#whole.clear();
  }
}
