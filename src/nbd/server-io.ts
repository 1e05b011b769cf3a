// The byte plumbing of one server connection: a queue of received chunks that the handshake
// reads with `await readExact(n)` and the transmission phase parses synchronously, over a
// stream that can be swapped once (plain -> TLS after NBD_OPT_STARTTLS).
import type { Duplex } from 'node:stream';
import { noteReceived } from './gc-pacer.ts';

export class ConnectionClosed extends Error {
  constructor(message = 'connection closed by peer') {
    super(message);
    this.name = 'ConnectionClosed';
  }
}

export class Wire {
  private chunks: Buffer[] = [];
  private head = 0; // bytes already consumed from chunks[0]
  /** Bytes received and not yet consumed. */
  available = 0;
  private waiter: { need: number; resolve: () => void; reject: (e: Error) => void } | null = null;
  private ended: Error | null = null;
  /** Called after new bytes arrive (the transmission phase parses from here). */
  onReadable: (() => void) | null = null;
  /** Called once when the stream ends, errors or closes. */
  onClose: ((err: Error) => void) | null = null;
  private resolveClosed!: () => void;
  /** Resolves once the stream ended, errored or closed. */
  readonly whenClosed = new Promise<void>((resolve) => (this.resolveClosed = resolve));

  private discarding = false;

  private readonly handleData = (chunk: Buffer) => {
    if (this.discarding) return;
    this.chunks.push(chunk);
    this.available += chunk.length;
    noteReceived(chunk.length);
    const w = this.waiter;
    if (w && this.available >= w.need) {
      this.waiter = null;
      w.resolve();
    }
    this.onReadable?.();
  };
  private readonly handleEnd = () => this.finish(new ConnectionClosed());
  private readonly handleError = (err: Error) => this.finish(err);

  constructor(public stream: Duplex) {
    this.attach(stream);
  }

  get closed(): boolean {
    return this.ended !== null;
  }

  /** Resolves with exactly n bytes, or rejects when the peer goes away first. */
  async readExact(n: number): Promise<Buffer> {
    if (this.available < n) {
      if (this.ended) throw this.ended;
      await new Promise<void>((resolve, reject) => {
        this.waiter = { need: n, resolve, reject };
      });
    }
    return this.take(n);
  }

  /** Whether the next n bytes (n <= available) sit in one received chunk: take(n) copies nothing. */
  contiguous(n: number): boolean {
    const first = this.chunks[0];
    return first !== undefined && first.length - this.head >= n;
  }

  /**
   * Consume n bytes (the caller checked `available`). Bytes within one received chunk come
   * back as a view of it; bytes that span chunks are copied into `into` (exactly n bytes)
   * when given, else into a new buffer.
   */
  take(n: number, into?: Buffer): Buffer {
    const first = this.chunks[0];
    let out: Buffer;
    if (first && first.length - this.head >= n) {
      out = first.subarray(this.head, this.head + n);
      this.head += n;
      if (this.head === first.length) {
        this.chunks.shift();
        this.head = 0;
      }
    } else {
      out = into?.length === n ? into : Buffer.allocUnsafe(n);
      let filled = 0;
      while (filled < n) {
        const c = this.chunks[0]!;
        const len = Math.min(c.length - this.head, n - filled);
        c.copy(out, filled, this.head, this.head + len);
        filled += len;
        this.head += len;
        if (this.head === c.length) {
          this.chunks.shift();
          this.head = 0;
        }
      }
    }
    this.available -= n;
    return out;
  }

  /** Look at n bytes without consuming them (n <= available). */
  peek(n: number): Buffer {
    const first = this.chunks[0]!;
    if (first.length - this.head >= n) return first.subarray(this.head, this.head + n);
    const out = Buffer.allocUnsafe(n);
    let filled = 0;
    for (let i = 0, start = this.head; filled < n; i++, start = 0) {
      const c = this.chunks[i]!;
      const len = Math.min(c.length - start, n - filled);
      c.copy(out, filled, start, start + len);
      filled += len;
    }
    return out;
  }

  write(data: Buffer): boolean {
    return this.stream.write(data);
  }

  pause(): void {
    this.stream.pause();
  }

  resume(): void {
    this.stream.resume();
  }

  /**
   * Stop reading the current stream and hand it to `wrap` (the TLS upgrade); read the stream
   * it returns from then on. Bytes already queued would be plaintext sent before the TLS
   * handshake: a protocol violation, so the caller checks `available === 0` first.
   */
  swap(wrap: (raw: Duplex) => Duplex): Duplex {
    this.detach(this.stream);
    this.stream = wrap(this.stream);
    this.attach(this.stream);
    return this.stream;
  }

  /**
   * End gracefully (flushes what was written; TLS sends close_notify). Whatever the peer still
   * sends is read and dropped, so its close is seen and the connection can finish.
   */
  end(): void {
    this.discarding = true;
    this.chunks = [];
    this.head = 0;
    this.available = 0;
    const s = this.stream;
    s.end();
    s.resume();
    // A peer that never closes its side must not keep the connection alive.
    const timer = setTimeout(() => s.destroy(), 5000);
    timer.unref();
    void this.whenClosed.then(() => clearTimeout(timer));
  }

  destroy(): void {
    this.stream.destroy();
  }

  private attach(s: Duplex): void {
    s.on('data', this.handleData);
    s.on('end', this.handleEnd);
    s.on('close', this.handleEnd);
    s.on('error', this.handleError);
  }

  private detach(s: Duplex): void {
    s.off('data', this.handleData);
    s.off('end', this.handleEnd);
    s.off('close', this.handleEnd);
    s.off('error', this.handleError);
    // A late error on the raw stream must not become an uncaught exception.
    s.on('error', () => {});
  }

  private finish(err: Error): void {
    if (this.ended) return;
    this.ended = err;
    const w = this.waiter;
    this.waiter = null;
    w?.reject(err);
    this.onClose?.(err);
    this.resolveClosed();
  }
}

/** The peer broke a MUST of the protocol (or asked for something we refuse): end the session. */
export class ProtocolViolation extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'ProtocolViolation';
  }
}
