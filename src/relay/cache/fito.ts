// The first-in touch-out (FITO) list that sizes the memory cache (issue 14, the "memory
// compression policies" idea). Every cached page records when it entered (a logical clock:
// one tick per page record the reader sees). A page leaves the list when it is touched (QEMU
// sends it again): the age it had then is what the sizing learns from. The list is ordered by
// entry (a Map keeps insertion order), so the head is always the oldest entry.
//
// Sizing, every `adjustEvery` ticks: take the age below which `quantile` of recent touches
// happened. Entries older than that are unlikely to be touched again: the target is the number
// of entries younger than it (plus a little headroom). Touches of pages evicted a short while
// ago (remembered, without their data, in a ghost list) count with the age they would have
// had: when those are common the quantile age lies beyond the oldest entry, and the target
// grows in proportion. The target always stays within [minEntries, maxEntries] (the budget).
//
// The list holds only keys, entry times and the owner's value (a slot number): the pages
// themselves live in the cache that owns the list.

export interface FitoOptions {
  /** The memory budget, in entries. */
  maxEntries: number;
  /** The smallest target (default 256 or maxEntries). */
  minEntries?: number;
  /** Recompute the target after this many ticks (default 4096). */
  adjustEvery?: number;
  /** The share of touches the cache should still catch (default 0.95). */
  quantile?: number;
  /** How many recent touch ages the sizing looks at (default 16384). */
  window?: number;
  /** Where the target starts (default maxEntries: the budget is there to be used until the ages say otherwise). */
  initialTarget?: number;
}

export interface FitoSample { tick: number; size: number; target: number }

interface Node<K, V> { key: K; entered: number; value: V; live: boolean }

/**
 * Oldest-first queue with removal from anywhere: removed nodes are marked and skipped when they
 * reach the head (each once), so every operation is O(1) amortized. (A Map's insertion order
 * would do the same, but deleting at its head over and over makes V8 skip the holes on every
 * `keys().next()`: quadratic.)
 */
class AgeQueue<K, V> {
  private q: Node<K, V>[] = [];
  private head = 0;
  readonly byKey = new Map<K, Node<K, V>>();

  get size(): number { return this.byKey.size; }

  push(key: K, entered: number, value: V): void {
    const n = { key, entered, value, live: true };
    this.byKey.set(key, n);
    this.q.push(n);
  }

  take(key: K): Node<K, V> | undefined {
    const n = this.byKey.get(key);
    if (!n) return undefined;
    this.byKey.delete(key);
    n.live = false;
    return n;
  }

  /** The oldest live node (not removed). */
  oldest(): Node<K, V> | undefined {
    while (this.head < this.q.length && !this.q[this.head]!.live) this.head++;
    if (this.head > 4096 && this.head * 2 > this.q.length) { this.q = this.q.slice(this.head); this.head = 0; }
    return this.q[this.head];
  }

  shift(): Node<K, V> | undefined {
    const n = this.oldest();
    if (n) this.take(n.key);
    return n;
  }

  /** Live nodes, oldest first. */
  *values(): Generator<Node<K, V>> {
    for (let i = this.head; i < this.q.length; i++) if (this.q[i]!.live) yield this.q[i]!;
  }
}

export class FitoList<K, V> {
  private entries = new AgeQueue<K, V>();
  private ghosts = new AgeQueue<K, null>();
  private ages: number[] = [];
  private agePos = 0;
  private tick = 0;
  private sinceAdjust = 0;
  readonly max: number;
  readonly min: number;
  private readonly adjustEvery: number;
  private readonly quantile: number;
  private readonly window: number;
  target: number;
  /**
   * The budget is full and pages come back later than the oldest entry went in (the quantile
   * age lies beyond it): evicting the oldest for each new page would evict every page just
   * before it comes back (a cycle longer than the list: first-in-first-out then hits nothing).
   * The owner should keep what it has and not cache new pages while this holds.
   */
  outgrown = false;
  readonly stats = { hits: 0, misses: 0, ghostHits: 0, evictions: 0 };
  /** The size over time: one sample per adjustment (the last 512 kept). */
  readonly history: FitoSample[] = [];

  constructor(o: FitoOptions, private readonly onEvict: (key: K, value: V) => void = () => {}) {
    this.max = Math.max(1, Math.floor(o.maxEntries));
    this.min = Math.min(this.max, o.minEntries ?? 256);
    this.adjustEvery = o.adjustEvery ?? 4096;
    this.quantile = o.quantile ?? 0.95;
    this.window = o.window ?? 16384;
    this.target = Math.min(this.max, Math.max(this.min, o.initialTarget ?? this.max));
  }

  get size(): number { return this.entries.size; }

  /**
   * A page record for `key`: returns the value it had in the list (a hit: it leaves the list
   * and the caller re-adds it with `add`) or undefined (a miss). Advances the clock.
   */
  touch(key: K): V | undefined {
    this.tick++;
    if (++this.sinceAdjust >= this.adjustEvery) this.adjust();
    const e = this.entries.take(key);
    if (e) {
      this.stats.hits++;
      this.learn(this.tick - e.entered);
      return e.value;
    }
    this.stats.misses++;
    const g = this.ghosts.take(key);
    if (g) {
      this.stats.ghostHits++;
      this.learn(this.tick - g.entered);
    }
    return undefined;
  }

  /** Drop `key` without learning from it (its copy became stale another way). */
  remove(key: K): V | undefined {
    return this.entries.take(key)?.value;
  }

  /** Add `key` as the newest entry; evicts from the head while the list is above its target. */
  add(key: K, value: V): void {
    this.entries.take(key);
    this.entries.push(key, this.tick, value);
    while (this.entries.size > this.target) this.evictOldest();
  }

  /** Drop every entry without learning from them (all copies went stale at once); returns their values. */
  clear(): V[] {
    const values: V[] = [];
    for (const n of this.entries.values()) values.push(n.value);
    this.entries = new AgeQueue<K, V>();
    return values;
  }

  /** Whether `add` would have to evict to make room. */
  get full(): boolean { return this.entries.size >= this.target; }

  /** Evict the oldest entry; returns its value (the caller reuses its slot). */
  evictOldest(): V | undefined {
    const e = this.entries.shift();
    if (!e) return undefined;
    this.stats.evictions++;
    this.ghosts.take(e.key);
    this.ghosts.push(e.key, e.entered, null);
    // Ghosts cost ~100 bytes each, no page: keep as many as the budget has entries.
    if (this.ghosts.size > this.max) this.ghosts.shift();
    this.onEvict(e.key, e.value);
    return e.value;
  }

  private learn(age: number): void {
    if (this.ages.length < this.window) this.ages.push(age);
    else { this.ages[this.agePos] = age; this.agePos = (this.agePos + 1) % this.window; }
  }

  /** Recompute the target from the ages pages had when touched. */
  adjust(): void {
    this.sinceAdjust = 0;
    if (this.ages.length >= 64) {
      const sorted = Float64Array.from(this.ages).sort();
      const q = sorted[Math.min(sorted.length - 1, Math.floor(sorted.length * this.quantile))]!;
      // Entries older than q (the list is oldest first), and the age of the oldest.
      let older = 0;
      let oldestAge = 0;
      for (const e of this.entries.values()) {
        const age = this.tick - e.entered;
        if (older === 0) oldestAge = age;
        if (age > q) older++;
        else break;
      }
      const size = this.entries.size;
      this.outgrown = size >= this.max && q > oldestAge;
      let want: number;
      if (size > 0 && q > oldestAge && oldestAge > 0) want = Math.ceil(size * (q / oldestAge)); // touches beyond the list: grow
      else want = size - older;
      this.target = Math.min(this.max, Math.max(this.min, Math.ceil(want * 1.1)));
      while (this.entries.size > this.target) this.evictOldest();
    }
    this.history.push({ tick: this.tick, size: this.entries.size, target: this.target });
    if (this.history.length > 512) this.history.splice(0, this.history.length - 512);
  }
}
