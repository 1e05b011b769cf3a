// READ replies of one connection sent straight from the file's page cache (the addon's
// sendFileBatch: sendfile in a worker thread), instead of read into a buffer and written out
// of it. Under nbdcopy those two copies were ~45% of the shim's CPU; without them the shim
// spends less CPU per byte read than qemu-nbd or nbdkit (docs/performance.md).
//
// Replies are batched: every READ that is ready when the event loop gets to it goes in one
// worker-thread job, one job per connection at a time. While a job runs it owns the socket:
// every other write of the connection waits (output()) and goes out after it, in order, so
// that no reply is ever split by another. A job stops at the first reply that does not go
// whole: when the socket is full, the rest of that reply is read now (the file stays open:
// its reply is not settled) and written through the stream ahead of everything else; a
// range with a hole or not in the page cache is not queued (asked on the event loop) and
// goes the usual way.
//
// The worker sends on a descriptor of its own (dupSocket): Node closes its descriptor when
// the connection is destroyed, and a worker still sending on that number could write into
// whatever reuses it.
import { closeSync, readSync } from 'node:fs';
import type { Duplex } from 'node:stream';
import type { NativeFileOps, SendFileResult } from '../block/file.ts';
import type { BufferPool } from './buffer-pool.ts';

/** Most replies and bytes one job sends (the connection's byte budget bounds them too). */
const BATCH_ITEMS = 256;
const BATCH_BYTES = 32 * 1024 * 1024;
/** Socket send buffer asked for: replies in flight to a reader that lags a little, without a copy (the default ~200 KiB holds less than one 256 KiB reply). */
export const SEND_BUFFER = 4 * 1024 * 1024;
const EMPTY = Buffer.alloc(0);
const NOT_SENT: Promise<SendOutcome> = Promise.resolve('not-sent');

/**
 * How a reply went: sent (whole, or 'sent-rest': its rest through the stream), not started (the caller
 * makes it the usual way), cut short because the file could not be read ('failed') or the
 * socket failed ('lost'): either way the stream is lost.
 */
export type SendOutcome = 'sent' | 'sent-rest' | 'not-sent' | 'failed' | 'lost';

interface Item {
  fd: number;
  position: number;
  length: number;
  header: Buffer;
  settle: (outcome: SendOutcome) => void;
}

export class SendfileReplies {
  /** False once the kernel turned out not to say what is cached: the caller stops asking. */
  enabled = true;
  #queue: Item[] = [];
  #running = false;
  #scheduled = false;
  #waitingIdle = false;
  #held: Array<() => void> = [];
  #closed = false;
  #sock: number;

  constructor(
    private readonly stream: Duplex,
    sock: number,
    private readonly native: NativeFileOps,
    private readonly pool: BufferPool,
    /** Send what the connection has corked now (its replies batched for one writev). */
    private readonly uncork: () => void,
  ) {
    this.#sock = native.dupSocket!(sock);
    try {
      native.setSendBuffer?.(this.#sock, SEND_BUFFER);
    } catch {
      // The default buffer works too; replies go whole less often.
    }
  }

  /** Whether a job owns the socket now (writes must go through output()). */
  get busy(): boolean {
    return this.#running;
  }

  /** Run a write of the connection now, or once the running job is done with the socket, in order. */
  output(write: () => void): void {
    if (this.#running) this.#held.push(write);
    else write();
  }

  /**
   * Send a header (made by `header()`, only when the reply goes this way) and `length` bytes
   * of fd at `position` as one reply; settles once the stream is done with it. A range with
   * a hole or not all cached is 'not-sent' at once: asked here, on the event loop, so that
   * it never costs a worker round trip nor waits behind (or holds up) a batch. The worker asks
   * again (pages may go meanwhile), so a reply it sends never waits for the disk.
   */
  send(fd: number, position: number, length: number, header: () => Buffer): Promise<SendOutcome> {
    if (this.#closed || !this.enabled) return NOT_SENT;
    const why = this.native.sendable ? this.native.sendable(fd, position, length) : 0;
    if (why !== 0) {
      if (why === 3) this.enabled = false;
      return NOT_SENT;
    }
    return new Promise((settle) => {
      this.#queue.push({ fd, position, length, header: header(), settle });
      this.#schedule();
    });
  }

  /** The connection closed: replies not yet started are made (and dropped) the usual way. */
  close(): void {
    this.#closed = true;
    for (const it of this.#queue.splice(0)) it.settle('not-sent');
    if (!this.#running) this.#closeSock();
  }

  #schedule(): void {
    if (this.#scheduled || this.#running) return;
    this.#scheduled = true;
    // After the current parse of the socket: every READ it dispatched joins the job.
    queueMicrotask(() => {
      this.#scheduled = false;
      this.#start();
    });
  }

  #start(): void {
    if (this.#running || this.#waitingIdle || !this.#queue.length) return;
    if (this.#closed) return this.close();
    const s = this.stream;
    if (s.writableLength > 0) this.uncork();
    if (s.writableLength > 0) {
      // Earlier replies are still going out: after them (an empty write completes after every write before it).
      this.#waitingIdle = true;
      s.write(EMPTY, () => {
        this.#waitingIdle = false;
        this.#start();
      });
      return;
    }
    const queue = this.#queue;
    const fd = queue[0]!.fd;
    const batch: Item[] = [];
    const later: Item[] = [];
    let bytes = 0;
    let headerBytes = 0;
    for (const it of queue) {
      // Another file (the device was swapped) goes in a job of its own.
      if (it.fd !== fd || batch.length >= BATCH_ITEMS || bytes >= BATCH_BYTES) {
        later.push(it);
        continue;
      }
      batch.push(it);
      bytes += it.length;
      headerBytes += it.header.length;
    }
    this.#queue = later;
    // One buffer of headers and one array of numbers per job (the addon copies both at once).
    const headers = Buffer.allocUnsafe(headerBytes);
    const items = new Float64Array(batch.length * 4);
    let at = 0;
    for (let i = 0; i < batch.length; i++) {
      const it = batch[i]!;
      it.header.copy(headers, at);
      items[i * 4] = at;
      items[i * 4 + 1] = it.header.length;
      items[i * 4 + 2] = it.position;
      items[i * 4 + 3] = it.length;
      at += it.header.length;
    }
    this.#running = true;
    this.native.sendFileBatch!(this.#sock, fd, headers, items).then(
      (r) => this.#finish(batch, r),
      () => this.#finish(batch, { items: 0, bytes: 0, stop: 2 }),
    );
  }

  #finish(batch: Item[], r: SendFileResult): void {
    for (let i = 0; i < r.items; i++) batch[i]!.settle('sent');
    let next = r.items;
    const stopped = batch[next];
    if (stopped) {
      next++;
      if (r.stop === 1) {
        this.#sendRest(stopped, r.bytes);
      } else {
        // Not started (2: a hole or uncached data in it; 3: no cachestat here at all), or
        // the socket failed (an errno: the connection is going; a reply cut short ends it).
        if (r.stop === 3) this.enabled = false;
        stopped.settle(r.bytes > 0 ? 'lost' : 'not-sent');
      }
    }
    // The rest of the batch was not tried: it goes in the next job.
    this.#queue.unshift(...batch.slice(next));
    this.#running = false;
    const held = this.#held;
    this.#held = [];
    for (const w of held) w();
    if (this.#closed) this.close();
    else if (this.#queue.length) this.#schedule();
  }

  /** The socket was full `sent` bytes into this reply: the rest through the stream, now, before anything else. */
  #sendRest(it: Item, sent: number): void {
    const hlen = it.header.length;
    const from = Math.max(0, sent - hlen);
    const rest = this.pool.take(it.length - from);
    try {
      readAll(this.native, it.fd, rest, it.position + from);
    } catch {
      this.pool.forget(rest);
      // Part of the reply may be on the wire and the rest cannot be read: the stream is lost.
      return it.settle(sent > 0 ? 'failed' : 'not-sent');
    }
    const s = this.stream;
    if (sent < hlen) s.write(it.header.subarray(sent));
    s.write(rest, () => {
      this.pool.give(rest);
      it.settle('sent-rest');
    });
  }

  #closeSock(): void {
    if (this.#sock < 0) return;
    try {
      closeSync(this.#sock);
    } catch {
      // Already gone.
    }
    this.#sock = -1;
  }
}

/** Fill `buf` from fd at `position`: from the page cache on this thread, else a plain read (rare: it was cached a moment ago). */
function readAll(native: NativeFileOps, fd: number, buf: Buffer, position: number): void {
  if (native.readInline(fd, buf, position) >= 0) return;
  for (let done = 0; done < buf.length; ) {
    const n = readSync(fd, buf, done, buf.length - done, position + done);
    if (n === 0) throw Object.assign(new Error(`unexpected end of file at ${position + done}`), { code: 'EIO' });
    done += n;
  }
}
