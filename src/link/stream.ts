// One named stream of a link, as a Node Duplex: what the user writes is sent to the peer's
// stream of the same id, what the peer writes comes out here. The stream keeps the sender's
// bookkeeping (offsets, unacknowledged chunks, which are in the shared file) and the
// receiver's (how far it has delivered, duplicates); the Link moves the bytes.
import { Duplex } from 'node:stream';
import { MAX_DATA } from './frames.ts';
import { SendWindow } from './window.ts';

/** Bytes the sender still owes the peer: kept until acknowledged. */
export interface Chunk {
  offset: number;
  length: number;
  /** null once evicted from memory; then it is in the shared file at `filePos`. */
  data: Buffer | null;
  filePos: number;
}

export interface StreamHost {
  kick(): void;
  ackSoon(s: LinkStream): void;
  maxResident: number;
  /** The smallest send window (bytes unacknowledged on the network, see window.ts). */
  windowFloor: number;
  onStreamDestroyed(s: LinkStream, err: Error | null): void;
}

export class LinkStream extends Duplex {
  // -- sending --
  /** Offset after the last byte the user wrote. */
  sendNext = 0;
  /** Every byte below this was acknowledged by the peer. */
  acked = 0;
  queue: Chunk[] = [];
  /** Next offset to send on the current network carrier. */
  netNext = 0;
  /** Highest offset ever sent on any network carrier: what goes below it again is resent. */
  netHigh = 0;
  /** Bytes of `queue` held in memory. */
  resident = 0;
  /** The stream's final length once the user ended it. */
  finOffset: number | null = null;
  finSentNet = false;
  finAcked = false;
  /** Offset up to which the shared file holds this stream (whole chunks), and whether its FIN. */
  fileEnd = 0;
  finInFile = false;
  resentBytes = 0;
  /** How far the writer may run ahead of the peer's acknowledgements on the network (window.ts). */
  readonly window: SendWindow;
  private waitingWrite: ((e?: Error | null) => void) | null = null;
  private heldSince = 0;
  private heldTotal = 0;

  // -- receiving --
  recvNext = 0;
  recvFin: number | null = null;
  ended = false;
  /** What we last acknowledged on the network / in the ack file. */
  ackedNet = 0;
  ackedFile = -1;
  finAckedFile = false;
  finAckedNet = false;
  duplicateBytes = 0;
  fromFileBytes = 0;
  /** Last time bytes were taken from the shared file (then acknowledgements go there too). */
  lastFromFile = -Infinity;

  constructor(readonly id: number, readonly streamName: string, private host: StreamHost) {
    // The writable side buffers little: bytes waiting beyond the window are bytes the writer
    // (QEMU, through the relay) believes sent; the window is where the stream's slack is.
    super({ allowHalfOpen: true, readableHighWaterMark: 1024 * 1024, writableHighWaterMark: 256 * 1024 });
    this.window = new SendWindow(host.windowFloor, host.maxResident);
  }

  /**
   * Whether the writer may go on: what is unacknowledged and not yet in the shared file is
   * within the window (during a cut the file takes the bytes, and the writer is not held
   * back by a network that is not there), and what is in memory within the memory bound.
   */
  private admits(): boolean {
    return this.sendNext - Math.max(this.acked, this.fileEnd) < this.window.bytes && this.resident < this.host.maxResident;
  }

  /** The writer waits for the window (or the memory bound): the link, not the writer, is the bottleneck now. */
  get held(): boolean {
    return this.waitingWrite !== null;
  }

  /** Milliseconds the writer has been held, in all (the memory cache's governor: the share of a window the link was the limit). */
  get heldMs(): number {
    return this.heldTotal + (this.waitingWrite ? performance.now() - this.heldSince : 0);
  }

  private hold(cb: (e?: Error | null) => void): void {
    this.waitingWrite = cb;
    this.heldSince = performance.now();
  }

  private unhold(): ((e?: Error | null) => void) | null {
    const w = this.waitingWrite;
    if (w) this.heldTotal += performance.now() - this.heldSince;
    this.waitingWrite = null;
    return w;
  }

  /** What we may acknowledge: what the user has read (bytes still in our readable buffer are not). */
  ackOffset(): number {
    return this.recvNext - this.readableLength;
  }

  /** The peer took everything including the end. */
  get sendDone(): boolean {
    return this.finAcked;
  }

  get recvDone(): boolean {
    return this.ended;
  }

  override _write(chunk: Buffer, _enc: BufferEncoding, cb: (e?: Error | null) => void): void {
    for (let at = 0; at < chunk.length; at += MAX_DATA) {
      const data = chunk.subarray(at, Math.min(chunk.length, at + MAX_DATA));
      this.queue.push({ offset: this.sendNext, length: data.length, data, filePos: -1 });
      this.sendNext += data.length;
      this.resident += data.length;
    }
    this.host.kick();
    if (this.admits()) cb();
    else this.hold(cb);
  }

  override _final(cb: (e?: Error | null) => void): void {
    this.finOffset = this.sendNext;
    this.host.kick();
    cb();
  }

  override _read(): void {
    this.host.ackSoon(this);
  }

  /**
   * Every read that takes bytes out of the buffer may acknowledge them. _read() alone is not
   * enough: Node calls it again only after a push, so a consumer that drained its buffer
   * after the last DATA (an echo held by its own send window, then the peer's FIN) left the
   * last acknowledgement unsent, and the sender waited for it for ever (seen in
   * link-hosts.test.ts once the send window held the echo).
   */
  override read(size?: number): any {
    const before = this.readableLength;
    const chunk = super.read(size);
    if (this.readableLength < before) this.host.ackSoon(this);
    return chunk;
  }

  override _destroy(err: Error | null, cb: (e?: Error | null) => void): void {
    this.host.onStreamDestroyed(this, err);
    this.unhold()?.(err);
    cb(err);
  }

  /** The peer has everything below `offset` (and the end, with `fin`). */
  onAck(offset: number, fin: boolean, now = performance.now()): void {
    if (offset > this.sendNext) return; // acks beyond what we wrote are ignored (the Link checks them)
    if (offset > this.acked) {
      this.acked = offset;
      this.window.onAck(offset, now);
      let drop = 0;
      while (drop < this.queue.length && this.queue[drop].offset + this.queue[drop].length <= offset) {
        const c = this.queue[drop++];
        if (c.data) this.resident -= c.length;
      }
      if (drop) this.queue.splice(0, drop);
      if (this.netNext < offset) this.netNext = offset;
    }
    if (fin && this.finOffset !== null && offset === this.finOffset) this.finAcked = true;
    this.release();
  }

  /** Let a held write through once it is within the window and memory below its bound again. */
  release(): void {
    if (this.waitingWrite && this.admits()) this.unhold()!();
  }

  /** The chunk holding `offset`, by binary search (chunks are contiguous and ascending). */
  chunkAt(offset: number): Chunk | undefined {
    let lo = 0, hi = this.queue.length - 1;
    while (lo <= hi) {
      const mid = (lo + hi) >> 1;
      const c = this.queue[mid];
      if (offset < c.offset) hi = mid - 1;
      else if (offset >= c.offset + c.length) lo = mid + 1;
      else return c;
    }
    return undefined;
  }

  /**
   * Bytes arriving for `offset` from either carrier. Returns false when they start beyond what
   * we have (a gap: not deliverable yet). Bytes we already have are counted as duplicates.
   */
  deliver(offset: number, payload: Buffer, fromFile: boolean): boolean {
    if (offset > this.recvNext) return false;
    const end = offset + payload.length;
    if (end <= this.recvNext) {
      this.duplicateBytes += payload.length;
      return true;
    }
    const skip = this.recvNext - offset;
    this.duplicateBytes += skip;
    const fresh = skip ? payload.subarray(skip) : payload;
    if (this.recvFin !== null && end > this.recvFin) return true; // beyond the end: the Link reports it
    this.recvNext = end;
    if (fromFile) {
      this.fromFileBytes += fresh.length;
      this.lastFromFile = performance.now();
    }
    this.push(fresh);
    this.endIfComplete();
    return true;
  }

  onFin(offset: number): void {
    if (this.recvFin === null) this.recvFin = offset;
    this.endIfComplete();
  }

  private endIfComplete(): void {
    if (!this.ended && this.recvFin !== null && this.recvNext === this.recvFin) {
      this.ended = true;
      this.push(null);
      this.host.ackSoon(this);
    }
  }
}
