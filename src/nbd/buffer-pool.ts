// Payload buffers for the NBD server, reused instead of allocated per request. A new 1 MiB
// Buffer per READ reply and per WRITE payload is garbage that V8 frees only at its next GC:
// under 1 MiB sequential I/O tens of MiB of them piled up between collections.
//
// take() lends a buffer, give() takes it back. Buffers come in power-of-two size classes
// (4 KiB .. 4 MiB by default); a request outside them gets a plain new buffer that the pool
// never sees again. The pool keeps at most `maxIdleBytes` of buffers that nobody holds and
// drops (leaves to the GC) whatever comes back beyond that.
//
// The one rule for callers: give a buffer back exactly once, and only when nothing uses it
// any more. The server gives a READ buffer back in the socket write's callback, a WRITE
// buffer when the device write resolved, and never after a device error (the device may still
// be using it: forget() leaves it to the GC). The pool refuses a buffer it did not lend, or one
// given back twice in a row, but it cannot tell a late second give from the give of a
// buffer lent again in between: callers release through one idempotent holder per request.

export interface BufferPoolOptions {
  /** Smallest pooled class (default 4 KiB); smaller requests get a new buffer each time. */
  minSize?: number;
  /** Largest pooled class (default 4 MiB); larger requests get a new buffer each time. */
  maxSize?: number;
  /** Bytes of idle buffers kept for reuse (default 8 MiB). */
  maxIdleBytes?: number;
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
  }

  /** A buffer of exactly `length` bytes (contents undefined), pooled when its class is. */
  take(length: number): Buffer {
    const size = classOf(length);
    if (length <= 0 || size < this.minSize || size > this.maxSize) return Buffer.allocUnsafeSlow(length);
    let buf = this.#idle.get(size)?.pop();
    if (buf) {
      this.#idleBytes -= size;
      this.#reused++;
    } else {
      // allocUnsafeSlow: a backing store of its own (never a slice of Node's shared slab),
      // so the ArrayBuffer identifies the lent buffer.
      buf = Buffer.allocUnsafeSlow(size);
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
    if (this.#idleBytes + size > this.maxIdleBytes) return; // full: left to the GC
    let list = this.#idle.get(size);
    if (!list) this.#idle.set(size, (list = []));
    list.push(Buffer.from(ab, 0, size));
    this.#idleBytes += size;
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

/** The power of two at or above n (n < 2^32, as NBD lengths are). */
function classOf(n: number): number {
  return n <= 1 ? 1 : 2 ** (32 - Math.clz32(n - 1));
}
