// The byte plumbing of one server connection: a queue of received chunks that the handshake
// reads with `await readExact(n)` and the transmission phase parses synchronously, over a
// stream that can be swapped once (plain -> TLS after NBD_OPT_STARTTLS).
//
// A plain net.Socket is read the fast way (Wire.adopt): the kernel copies into buffers the
// Wire chooses, through Node's `onread` option, instead of a new 64 KiB Buffer per read
// pushed through the Readable machinery. Headers and small requests land in one reused
// scratch buffer; the payload of a large WRITE lands straight in the request's own buffer
// (sink()), so it is never copied in user space. Under nbdcopy's 256 KiB writes the copy of
// payloads out of socket chunks, the allocation of those chunks and the GCs that freed them
// cost ~30% of the shim's CPU (docs/performance.md).
import { Socket, type OnReadOpts, type SocketConstructorOpts } from 'node:net';
import type { Duplex } from 'node:stream';
import { noteReceived } from './gc-pacer.ts';

/** Bytes one scratch read asks for: many small requests per read, as Node's own reads. */
export const SCRATCH_BYTES = 64 * 1024;
/** The request header's size: the one read asked for after a large payload (see #nextBuffer). */
const HEADER_BYTES = 28;

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
  /** Direct mode (adopt): the reused read buffer, and where the next read goes. */
  #scratch: Buffer | null = null;
  #sink: { buf: Buffer; filled: number; done: () => void } | null = null;
  #headerOnly = false;

  private readonly handleData = (chunk: Buffer) => {
    if (this.discarding) return;
    noteReceived(chunk.length);
    this.received(chunk);
  };

  private received(chunk: Buffer): void {
    this.chunks.push(chunk);
    this.available += chunk.length;
    const w = this.waiter;
    if (w && this.available >= w.need) {
      this.waiter = null;
      w.resolve();
    }
    this.onReadable?.();
  }

  private readonly handleEnd = () => this.finish(new ConnectionClosed());
  private readonly handleError = (err: Error) => this.finish(err);

  constructor(public stream: Duplex) {
    this.attach(stream);
  }

  /**
   * A Wire that reads `accepted` (a socket from net.Server, created with pauseOnConnect so
   * that nothing was read yet) in direct mode, or null where this Node cannot (then use
   * `new Wire(accepted)`). Node offers `onread` only to sockets it creates for connect(): the
   * accepted socket's handle moves to a new Socket that has it, along with the server's
   * connection count; the old Socket object is left unused.
   */
  static adopt(accepted: Socket): Wire | null {
    const old = accepted as Socket & { _handle?: { useUserBuffer?: unknown; reading?: boolean } | null; _server?: unknown; server?: unknown };
    const handle = old._handle;
    if (!handle || typeof handle.useUserBuffer !== 'function' || old.readableLength > 0 || handle.reading) return null;
    const scratch = Buffer.allocUnsafeSlow(SCRATCH_BYTES);
    let wire: Wire | null = null;
    // `handle` is Node's own option for sockets it accepts (not in its types).
    const opts: SocketConstructorOpts & { handle: unknown; onread: OnReadOpts } = {
      handle,
      readable: true,
      writable: true,
      onread: {
        // Called once before the Wire exists (the first read goes to the scratch buffer).
        buffer: () => (wire ? wire.#nextBuffer() : scratch),
        callback: (n: number, buf: Uint8Array) => {
          if (wire) wire.#direct(n, buf);
          return true;
        },
      },
    };
    const socket = new Socket(opts) as Socket & { _server?: unknown; server?: unknown };
    old._handle = null;
    socket._server = old._server;
    socket.server = old.server;
    old._server = null;
    wire = new Wire(socket);
    wire.#scratch = scratch;
    return wire;
  }

  /**
   * The socket's file descriptor in direct mode (a plain socket the Wire owns the reads of),
   * else -1: what a reply may be sent on without Node (Transmission's sendfile path).
   */
  get fd(): number {
    if (!this.#scratch) return -1;
    const fd = (this.stream as { _handle?: { fd?: unknown } | null })._handle?.fd;
    return typeof fd === 'number' && fd >= 0 ? fd : -1;
  }

  /** Whether received bytes sit in a reused buffer: take() must copy whatever outlives the call. */
  get reusesBuffers(): boolean {
    return this.#scratch !== null;
  }

  /**
   * Direct mode only: the next `buf.length - filled` bytes the peer sends go straight into
   * `buf` from `filled` on (the queue is empty: the caller consumed it); `done` runs once it
   * is full. Returns false when the Wire is not in direct mode (the caller copies instead).
   */
  sink(buf: Buffer, filled: number, done: () => void): boolean {
    if (!this.#scratch || this.available > 0 || filled >= buf.length) return false;
    this.#sink = { buf, filled, done };
    return true;
  }

  /** The buffer the next socket read fills. */
  #nextBuffer(): Buffer {
    const sink = this.#sink;
    if (sink) return sink.buf.subarray(sink.filled);
    // After a large payload, the next request is likely another: read its header alone, so
    // that its payload can go straight to its own buffer instead of through the scratch one.
    if (this.#headerOnly) return this.#scratch!.subarray(0, HEADER_BYTES);
    return this.#scratch!;
  }

  /** A direct-mode read of n bytes into `buf` (what #nextBuffer returned). */
  #direct(n: number, buf: Uint8Array): void {
    if (this.discarding) return;
    const sink = this.#sink;
    if (sink) {
      if (buf.buffer === sink.buf.buffer && buf.byteOffset === sink.buf.byteOffset + sink.filled) sink.filled += n;
      else this.#intoSink(sink, n, buf);
      if (sink.filled < sink.buf.length) return;
      this.#sink = null;
      this.#headerOnly = true;
      sink.done();
      return;
    }
    this.#headerOnly = false;
    this.received(Buffer.from(buf.buffer, buf.byteOffset, n));
    this.#ownQueued();
  }

  /**
   * A read that went to the buffer chosen before the sink began: Node asks for the next read's
   * buffer right after each read, so a sink begun outside a read (the transmission took up a
   * WRITE when its connection resumed after a pause) starts with the read after next. Its
   * bytes are copied into the sink, and what is beyond the payload is queued.
   */
  #intoSink(sink: { buf: Buffer; filled: number }, n: number, buf: Uint8Array): void {
    const m = Math.min(n, sink.buf.length - sink.filled);
    sink.buf.set(buf.subarray(0, m), sink.filled);
    sink.filled += m;
    if (m < n) {
      this.chunks.push(Buffer.from(buf.subarray(m, n)));
      this.available += n - m;
    }
  }

  /** Copy the queued bytes that still lie in the scratch buffer: the next read overwrites it. */
  #ownQueued(): void {
    const ab = this.#scratch!.buffer;
    for (let i = this.chunks.length - 1; i >= 0 && this.chunks[i]!.buffer === ab; i--) {
      const c = this.chunks[i]!;
      const start = i === 0 ? this.head : 0;
      this.chunks[i] = Buffer.from(c.subarray(start));
      if (i === 0) this.head = 0;
    }
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
    if (!first || first.length - this.head < n) {
      const out = into?.length === n ? into : Buffer.allocUnsafe(n);
      this.copyInto(out, 0, n);
      return out;
    }
    const out = first.subarray(this.head, this.head + n);
    this.head += n;
    if (this.head === first.length) {
      this.chunks.shift();
      this.head = 0;
    }
    this.available -= n;
    return out;
  }

  /** Consume n bytes (n <= available) by copying them into `into` at `at`. */
  copyInto(into: Buffer, at: number, n: number): void {
    let filled = 0;
    while (filled < n) {
      const c = this.chunks[0]!;
      const len = Math.min(c.length - this.head, n - filled);
      c.copy(into, at + filled, this.head, this.head + len);
      filled += len;
      this.head += len;
      if (this.head === c.length) {
        this.chunks.shift();
        this.head = 0;
      }
    }
    this.available -= n;
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
    this.#sink = null;
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
