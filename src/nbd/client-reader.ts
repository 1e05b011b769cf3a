// Exact-length reads from a byte stream: `read(n)` resolves with exactly n bytes. The NBD
// client's handshake and its reply loop are both written as straight-line code on top of it.
import type { Duplex } from 'node:stream';

export class StreamClosedError extends Error {
  constructor(message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.name = 'StreamClosedError';
  }
}

export class ByteReader {
  private chunks: Buffer[] = [];
  private buffered = 0;
  private waiter: { n: number; resolve: (b: Buffer) => void; reject: (e: Error) => void } | null = null;
  private closed: StreamClosedError | null = null;

  private readonly onData = (chunk: Buffer) => {
    this.chunks.push(chunk);
    this.buffered += chunk.length;
    const w = this.waiter;
    if (w && this.buffered >= w.n) {
      this.waiter = null;
      w.resolve(this.take(w.n));
    }
  };
  private readonly onEnd = () => this.close(new StreamClosedError('the peer closed the connection'));
  private readonly onError = (err: Error) => this.close(new StreamClosedError(err.message, { cause: err }));

  constructor(private readonly stream: Duplex) {
    stream.on('data', this.onData);
    stream.on('end', this.onEnd);
    stream.on('close', this.onEnd);
    stream.on('error', this.onError);
  }

  /** Resolves with exactly `n` bytes; rejects with StreamClosedError if the stream ends first. */
  read(n: number): Promise<Buffer> {
    if (this.waiter) throw new Error('ByteReader: only one read may be pending');
    if (this.buffered >= n) return Promise.resolve(this.take(n));
    if (this.closed) return Promise.reject(this.closed);
    return new Promise((resolve, reject) => {
      this.waiter = { n, resolve, reject };
    });
  }

  /** Stop listening (before the stream is handed to TLS). Returns bytes read but not consumed. */
  detach(): Buffer {
    this.stream.off('data', this.onData);
    this.stream.off('end', this.onEnd);
    this.stream.off('close', this.onEnd);
    this.stream.off('error', this.onError);
    const rest = Buffer.concat(this.chunks);
    this.chunks = [];
    this.buffered = 0;
    return rest;
  }

  private close(err: StreamClosedError): void {
    if (this.closed) return;
    this.closed = err;
    const w = this.waiter;
    this.waiter = null;
    w?.reject(err);
  }

  private take(n: number): Buffer {
    this.buffered -= n;
    const first = this.chunks[0];
    if (n === 0) return Buffer.alloc(0);
    if (first.length > n) {
      this.chunks[0] = first.subarray(n);
      return first.subarray(0, n);
    }
    if (first.length === n) {
      this.chunks.shift();
      return first;
    }
    const out = Buffer.allocUnsafe(n);
    let pos = 0;
    while (pos < n) {
      const c = this.chunks[0];
      const k = Math.min(c.length, n - pos);
      c.copy(out, pos, 0, k);
      pos += k;
      if (k === c.length) this.chunks.shift();
      else this.chunks[0] = c.subarray(k);
    }
    return out;
  }
}
