// Payload buffers for the NBD server, reused instead of allocated per request. A new 1 MiB
// Buffer per READ reply and per WRITE payload is garbage that V8 frees only at its next GC:
// under 1 MiB sequential I/O tens of MiB of them piled up between collections.
//
// take() lends a buffer, give() takes it back. Buffers come in power-of-two size classes
// (4 KiB .. 4 MiB by default); a request outside them gets a plain new buffer that the pool
// never sees again. Buffers that come back are kept for reuse: while clients keep the server
// busy every buffer is reused (none is allocated, none left to the GC: under nbdcopy's 4
// connections, dropping those beyond 8 MiB meant new ones all the time, fresh pages to fault
// in and GCs to free the old). Once the pool has been idle above `maxIdleBytes` for
// `trimAfterMs`, it drops the buffers beyond that (and asks for a GC where gc() is exposed),
// so memory comes back after a burst. What it can hold is bounded by what the server lets
// clients hold at once (server-budget.ts).
//
// The one rule for callers: give a buffer back exactly once, and only when nothing uses it
// any more. The server gives a READ buffer back in the socket write's callback, a WRITE
// buffer when the device write resolved, and never after a device error (the device may still
// be using it: forget() leaves it to the GC). The pool refuses a buffer it did not lend, or one
// given back twice in a row, but it cannot tell a late second give from the give of a
// buffer lent again in between: callers release through one idempotent holder per request.

import { loadNative } from '../block/file.ts';

export interface BufferPoolOptions {
  /** Smallest pooled class (default 4 KiB); smaller requests get a new buffer each time. */
  minSize?: number;
  /** Largest pooled class (default 4 MiB); larger requests get a new buffer each time. */
  maxSize?: number;
  /** Bytes of idle buffers kept for reuse for good (default 8 MiB). */
  maxIdleBytes?: number;
  /** Idle buffers beyond maxIdleBytes are dropped after this long without a take (default 1000 ms). */
  trimAfterMs?: number;
}

export interface BufferPoolStats {
  /** Pooled buffers lent out now. */
  lent: number;
  /** Bytes of idle buffers kept. */
  idleBytes: number;
  /** Pooled buffers allocated so far, and takes served from an idle one. */
  allocated: number;
  reused: number;
}

export class BufferPool {
  readonly minSize: number;
  readonly maxSize: number;
  readonly maxIdleBytes: number;
  readonly trimAfterMs: number;
  #trimTimer: NodeJS.Timeout | null = null;
  #lastTake = 0;
  /** Idle buffers by class size (each a whole class-sized buffer). */
  readonly #idle = new Map<number, Buffer[]>();
  /** Backing stores lent out now (weak: a buffer dropped after an error is not kept alive). */
  readonly #lent = new WeakSet<object>();
  #lentCount = 0;
  #idleBytes = 0;
  #allocated = 0;
  #reused = 0;

  constructor(opts: BufferPoolOptions = {}) {
    this.minSize = opts.minSize ?? 4096;
    this.maxSize = opts.maxSize ?? 4 * 1024 * 1024;
    this.maxIdleBytes = opts.maxIdleBytes ?? 8 * 1024 * 1024;
    this.trimAfterMs = opts.trimAfterMs ?? 1000;
  }

  /** A buffer of exactly `length` bytes (contents undefined), pooled when its class is. */
  take(length: number): Buffer {
    const size = classOf(length);
    if (length <= 0 || size < this.minSize || size > this.maxSize) return Buffer.allocUnsafeSlow(length);
    // Only a pending trim asks when the last take was (takes before it was scheduled are older than its delay).
    if (this.#trimTimer) this.#lastTake = performance.now();
    let buf = this.#idle.get(size)?.pop();
    if (buf) {
      this.#idleBytes -= size;
      this.#reused++;
    } else {
      buf = allocate(size);
      this.#allocated++;
    }
    this.#lent.add(buf.buffer);
    this.#lentCount++;
    return length === size ? buf : buf.subarray(0, length);
  }

  /** Take back a buffer from take() (any view of it). Others, and a second give, are ignored. */
  give(buf: Buffer): void {
    const ab = buf.buffer as ArrayBuffer;
    if (!this.#lent.delete(ab)) return;
    this.#lentCount--;
    const size = ab.byteLength;
    let list = this.#idle.get(size);
    if (!list) this.#idle.set(size, (list = []));
    list.push(Buffer.from(ab, 0, size));
    this.#idleBytes += size;
    if (this.#idleBytes > this.maxIdleBytes && !this.#trimTimer) this.#scheduleTrim(this.trimAfterMs);
  }

  #scheduleTrim(ms: number): void {
    this.#trimTimer = setTimeout(() => {
      this.#trimTimer = null;
      const quiet = performance.now() - this.#lastTake;
      if (quiet < this.trimAfterMs) return this.#scheduleTrim(this.trimAfterMs - quiet);
      this.trim();
    }, ms);
    this.#trimTimer.unref();
  }

  /** Drop idle buffers beyond maxIdleBytes, largest first (the GC frees them). */
  trim(): void {
    if (this.#idleBytes <= this.maxIdleBytes) return;
    for (const size of [...this.#idle.keys()].sort((a, b) => b - a)) {
      const list = this.#idle.get(size)!;
      while (list.length && this.#idleBytes > this.maxIdleBytes) {
        list.pop();
        this.#idleBytes -= size;
      }
    }
    collectSoon();
  }

  /**
   * Give up on a lent buffer that may still be in use (a device failed while holding it): it
   * is never reused, and the GC frees it once its last user lets go.
   */
  forget(buf: Buffer): void {
    if (this.#lent.delete(buf.buffer as ArrayBuffer)) this.#lentCount--;
  }

  stats(): BufferPoolStats {
    return { lent: this.#lentCount, idleBytes: this.#idleBytes, allocated: this.#allocated, reused: this.#reused };
  }
}

/**
 * A new class-sized buffer with a backing store of its own (never a slice of Node's shared
 * slab), so that its ArrayBuffer identifies the lent buffer: page-aligned pages of its own
 * where the addon is built (the kernel's copies into a buffer 16 bytes off a cache line, as
 * large malloc'd ones are, cost ~2.4x the CPU: native alignedBuffer), else from the heap.
 */
function allocate(size: number): Buffer {
  const native = loadNative();
  return native?.alignedBuffer ? native.alignedBuffer(size) : Buffer.allocUnsafeSlow(size);
}

type Gc = (opts?: { type?: 'minor' | 'major'; execution?: 'sync' | 'async' }) => void;

/**
 * Free what trim() dropped now rather than at V8's next full GC, which it starts for
 * off-heap memory only after ~64 MiB more of it (where gc() is exposed: `vmshift serve`).
 * The dropped buffers lived long enough to be in the old generation: a full collection.
 */
function collectSoon(): void {
  const gc = (globalThis as { gc?: Gc }).gc;
  if (gc) gc({ type: 'major', execution: 'async' });
}

/** The power of two at or above n (n < 2^32, as NBD lengths are). */
function classOf(n: number): number {
  return n <= 1 ? 1 : 2 ** (32 - Math.clz32(n - 1));
}
