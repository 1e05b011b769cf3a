// The transmission phase of one server connection. Requests are parsed from the wire as they
// arrive and dispatched at once (pipelined); each replies when its device call completes,
// so replies go out of order, matched by cookie. Reading pauses while too many requests or
// bytes are in flight, or while the socket has too much unsent output (backpressure).
// READ replies are read into, and WRITE payloads that span socket chunks assembled in, buffers
// of a BufferPool (buffer-pool.ts): one per request, given back once neither the socket nor
// the device holds it.
import type { NbdLogger as Logger } from './logger.ts';
import { errnoOf, type BlockErrno, type Extent } from '../block/device.ts';
import {
  Cmd, CmdFlag, ERRNO_CODES, MAX_PAYLOAD, REQUEST_MAGIC, ReplyFlag, ReplyType, SIMPLE_REPLY_MAGIC,
  STRUCTURED_REPLY_MAGIC, StateFlag, TF,
} from './constants.ts';
import type { Negotiated } from './server-handshake.ts';
import type { Wire } from './server-io.ts';
import { BufferPool } from './buffer-pool.ts';

export interface ServerCounters {
  bytesRead: number;
  bytesWritten: number;
  requests: number;
  errors: number;
}

export interface TransmissionLimits {
  /** Requests dispatched and not yet answered, per connection. */
  maxInFlight: number;
  /** Payload bytes (write data received + read data pending) in flight, per connection. */
  maxInFlightBytes: number;
  /** Unsent reply bytes above which we stop taking requests until the socket drains. */
  maxPendingOutput: number;
}

export const DEFAULT_LIMITS: TransmissionLimits = {
  maxInFlight: 128,
  maxInFlightBytes: 64 * 1024 * 1024,
  maxPendingOutput: 8 * 1024 * 1024,
};

interface Request {
  cookieHi: number;
  cookieLo: number;
  type: number;
  flags: number;
  offset: number;
  length: number;
  data: Buffer | null;
  /** The pool buffer this request holds (READ reply data, or a WRITE payload), until released. */
  pooled: Buffer | null;
}

const HEADER = 28;
const MAX_OFFSET = 2 ** 53;
/** Command flags each command accepts; anything else is EINVAL. FUA is accepted everywhere. */
const ALLOWED_FLAGS: Record<number, number> = {
  [Cmd.READ]: CmdFlag.FUA | CmdFlag.DF,
  [Cmd.WRITE]: CmdFlag.FUA,
  [Cmd.DISC]: CmdFlag.FUA,
  [Cmd.FLUSH]: CmdFlag.FUA,
  [Cmd.TRIM]: CmdFlag.FUA,
  [Cmd.CACHE]: CmdFlag.FUA,
  [Cmd.WRITE_ZEROES]: CmdFlag.FUA | CmdFlag.NO_HOLE | CmdFlag.FAST_ZERO,
  [Cmd.BLOCK_STATUS]: CmdFlag.FUA | CmdFlag.REQ_ONE,
};
const CMD_NAMES = new Map<number, string>(Object.entries(Cmd).map(([k, v]) => [v, k]));
const ZERO_BLOCK = Buffer.alloc(256 * 1024);

class RequestError extends Error {
  constructor(readonly errno: BlockErrno, message: string) {
    super(message);
  }
}

export class Transmission {
  private inFlight = 0;
  private inFlightBytes = 0;
  /** No more requests are taken (DISC, shutdown, or a request we cannot skip). */
  private stopping = false;
  private outputBlocked = false;
  private inputPaused = false;
  private closed = false;
  private resolveDone!: () => void;
  /** Resolves once the connection is closed and no request is in flight. */
  readonly done = new Promise<void>((resolve) => (this.resolveDone = resolve));
  private readonly dev;
  private readonly size: number;

  constructor(
    private wire: Wire,
    private neg: Negotiated,
    private counters: ServerCounters,
    private log: Logger,
    private limits: TransmissionLimits = DEFAULT_LIMITS,
    private pool: BufferPool = new BufferPool(),
  ) {
    this.dev = neg.export.device;
    this.size = this.dev.size;
  }

  start(): Promise<void> {
    this.wire.onReadable = () => this.pump();
    this.wire.onClose = () => {
      this.closed = true;
      this.settle();
    };
    if (this.wire.closed) this.closed = true;
    this.pump();
    this.settle();
    return this.done;
  }

  /** Server shutdown: take no new requests, answer those in flight, then end the session. */
  shutdown(): void {
    this.stop('server shutting down');
  }

  private pump(): void {
    const wire = this.wire;
    const lim = this.limits;
    while (!this.stopping && !this.closed) {
      if (this.inFlight >= lim.maxInFlight || this.inFlightBytes >= lim.maxInFlightBytes || this.outputBlocked) {
        this.pauseInput();
        return;
      }
      if (wire.available < HEADER) break;
      const h = wire.peek(HEADER);
      const magic = h.readUInt32BE(0);
      if (magic !== REQUEST_MAGIC) {
        this.abort(`bad request magic 0x${magic.toString(16)}`);
        return;
      }
      const type = h.readUInt16BE(6);
      const length = h.readUInt32BE(24);
      let data: Buffer | null = null;
      if (type === Cmd.WRITE) {
        if (length > MAX_PAYLOAD) {
          // We will not read 4 GiB to skip it: answer, then end the session once the rest is answered.
          const req = this.request(wire.take(HEADER), null);
          this.counters.requests++;
          this.sendError(req, 'EINVAL', `WRITE of ${length} bytes exceeds the ${MAX_PAYLOAD}-byte maximum; disconnecting`);
          this.stop('oversized write payload');
          return;
        }
        if (wire.available < HEADER + length) break; // wait for the whole payload
        const header = wire.take(HEADER);
        // A payload within one socket chunk is a view of it; one that spans chunks is copied.
        const pooled = length > 0 && !wire.contiguous(length) ? this.pool.take(length) : null;
        data = wire.take(length, pooled ?? undefined);
        this.dispatch(this.request(header, data, pooled));
      } else if (type === Cmd.DISC) {
        wire.take(HEADER);
        this.stop('client sent NBD_CMD_DISC');
        return;
      } else {
        this.dispatch(this.request(wire.take(HEADER), null));
      }
    }
    this.resumeInput();
  }

  private request(h: Buffer, data: Buffer | null, pooled: Buffer | null = null): Request {
    const offHi = h.readUInt32BE(16);
    return {
      flags: h.readUInt16BE(4),
      type: h.readUInt16BE(6),
      cookieHi: h.readUInt32BE(8),
      cookieLo: h.readUInt32BE(12),
      // Offsets at or past 2^53 cannot be represented exactly: mark them invalid.
      offset: offHi >= 0x200000 ? MAX_OFFSET : offHi * 0x100000000 + h.readUInt32BE(20),
      length: h.readUInt32BE(24),
      data,
      pooled,
    };
  }

  private dispatch(req: Request): void {
    this.counters.requests++;
    const bytes = req.type === Cmd.READ || req.type === Cmd.WRITE ? Math.min(req.length, MAX_PAYLOAD) : 0;
    this.inFlight++;
    this.inFlightBytes += bytes;
    this.execute(req).then(() => this.finished(bytes), (err) => {
      // execute() catches device errors itself; this is a bug, but one connection's bug.
      this.log.error({ err }, 'nbd: request handler failed');
      this.forget(req);
      this.finished(bytes);
    });
  }

  private finished(bytes: number): void {
    this.inFlight--;
    this.inFlightBytes -= bytes;
    if (this.inputPaused && !this.stopping) this.pump();
    this.settle();
  }

  private async execute(req: Request): Promise<void> {
    try {
      this.validate(req);
      const dev = this.dev;
      const fua = (req.flags & CmdFlag.FUA) !== 0 && dev.caps.canFua;
      switch (req.type) {
        case Cmd.READ: {
          let data: Buffer = Buffer.alloc(0);
          if (req.length) {
            req.pooled = this.pool.take(req.length);
            data = await dev.read(req.offset, req.length, req.pooled);
            if (data.buffer !== req.pooled.buffer) this.release(req); // the device used a buffer of its own
          }
          this.counters.bytesRead += data.length;
          return this.sendRead(req, data);
        }
        case Cmd.WRITE:
          if (req.length) await dev.write(req.offset, req.data!, { fua });
          this.release(req);
          this.counters.bytesWritten += req.length;
          break;
        case Cmd.FLUSH:
          await dev.flush();
          break;
        case Cmd.TRIM:
          if (req.length) await dev.trim(req.offset, req.length, { fua });
          break;
        case Cmd.WRITE_ZEROES:
          if (req.length) await dev.writeZeroes(req.offset, req.length, {
            fua,
            noHole: (req.flags & CmdFlag.NO_HOLE) !== 0,
            fastZero: (req.flags & CmdFlag.FAST_ZERO) !== 0,
          });
          break;
        case Cmd.CACHE:
          if (req.length) await dev.cache(req.offset, req.length);
          break;
        case Cmd.BLOCK_STATUS:
          return this.sendBlockStatus(req, await this.extents(req));
      }
      this.sendOk(req);
    } catch (err) {
      // A RequestError comes before the device saw the request; after a device error the
      // device may still be using the buffer, so it is never reused.
      if (err instanceof RequestError) this.release(req);
      else this.forget(req);
      const errno = err instanceof RequestError ? err.errno : errnoOf(err);
      const message = err instanceof Error ? err.message : String(err);
      if (!(err instanceof RequestError)) this.log.warn({ err, command: cmdName(req.type), offset: req.offset, length: req.length }, 'nbd: device error');
      this.sendError(req, errno, message);
    }
  }

  /** Throws the error the protocol asks for when a request is not acceptable. */
  private validate(req: Request): void {
    const name = cmdName(req.type);
    const allowed = ALLOWED_FLAGS[req.type];
    if (allowed === undefined) throw new RequestError('EINVAL', `unknown command ${req.type}`);
    if (req.flags & ~allowed) throw new RequestError('EINVAL', `${name}: flags 0x${req.flags.toString(16)} not valid for this command`);
    const tf = this.neg.flags;
    const need = (flag: number, what: string) => {
      if (!(tf & flag)) throw new RequestError('EINVAL', `${name}: ${what} was not advertised for this export`);
    };
    const writable = () => {
      if (tf & TF.READ_ONLY) throw new RequestError('EPERM', `${name}: export ${this.neg.export.name} is read-only`);
    };
    switch (req.type) {
      case Cmd.READ:
        if (req.flags & CmdFlag.DF) need(TF.SEND_DF, 'DF');
        if (req.length > MAX_PAYLOAD) throw new RequestError('EINVAL', `READ of ${req.length} bytes exceeds the ${MAX_PAYLOAD}-byte maximum`);
        break;
      case Cmd.WRITE: writable(); break;
      case Cmd.FLUSH: need(TF.SEND_FLUSH, 'FLUSH'); return; // offset/length are reserved
      // Read-only first: the spec wants EPERM for writes and trims on a read-only export.
      case Cmd.TRIM: writable(); need(TF.SEND_TRIM, 'TRIM'); break;
      case Cmd.WRITE_ZEROES:
        writable();
        need(TF.SEND_WRITE_ZEROES, 'WRITE_ZEROES');
        if (req.flags & CmdFlag.FAST_ZERO) need(TF.SEND_FAST_ZERO, 'FAST_ZERO');
        break;
      case Cmd.CACHE: need(TF.SEND_CACHE, 'CACHE'); break;
      case Cmd.BLOCK_STATUS:
        if (!this.neg.allocationContext) throw new RequestError('EINVAL', 'BLOCK_STATUS: no metadata context was negotiated');
        if (req.length === 0) throw new RequestError('EINVAL', 'BLOCK_STATUS of length 0');
        break;
    }
    if (req.offset >= MAX_OFFSET || req.offset + req.length > this.size) {
      // The spec asks for ENOSPC on writes past the end, EINVAL otherwise.
      const errno = req.type === Cmd.WRITE || req.type === Cmd.WRITE_ZEROES ? 'ENOSPC' : 'EINVAL';
      throw new RequestError(errno, `${name}: range ${req.offset}+${req.length} is outside the export (size ${this.size})`);
    }
  }

  /** base:allocation extents for the request, clipped to it and merged; one with REQ_ONE. */
  private async extents(req: Request): Promise<Extent[]> {
    const end = req.offset + req.length;
    if (!this.dev.caps.canBlockStatus) return [{ offset: req.offset, length: req.length, hole: false, zero: false }];
    const raw = await this.dev.blockStatus(req.offset, req.length);
    const out: Extent[] = [];
    let pos = req.offset;
    for (const e of raw) {
      if (e.offset !== pos || e.length <= 0) break; // a gap or overlap: report what is contiguous
      const length = Math.min(e.length, end - pos);
      const last = out[out.length - 1];
      if (last && last.hole === e.hole && last.zero === e.zero) last.length += length;
      else out.push({ offset: pos, length, hole: e.hole, zero: e.zero });
      pos += length;
      if (pos >= end) break;
    }
    if (!out.length) throw new RequestError('EIO', `BLOCK_STATUS: ${this.dev.name} returned no extent at ${req.offset}`);
    if (req.flags & CmdFlag.REQ_ONE) out.length = 1;
    return out;
  }

  private sendOk(req: Request): void {
    if (this.closed) return;
    this.writeOut(simpleHeader(req, 0));
  }

  private sendError(req: Request, errno: BlockErrno, message: string): void {
    this.counters.errors++;
    if (this.closed) return;
    const code = ERRNO_CODES[errno];
    if (!this.neg.structured) return this.writeOut(simpleHeader(req, code));
    const msg = Buffer.from(message.slice(0, 1024));
    const b = structuredHeader(req, ReplyFlag.DONE, ReplyType.ERROR, 6 + msg.length, 6 + msg.length);
    b.writeUInt32BE(code, 20);
    b.writeUInt16BE(msg.length, 24);
    msg.copy(b, 26);
    this.writeOut(b);
  }

  /** Sends the data; the request's pool buffer goes back once the socket is done with it. */
  private sendRead(req: Request, data: Buffer): void {
    if (this.closed) return this.release(req);
    if (!this.neg.structured) return this.writeOut(simpleHeader(req, 0), data, req);
    if (data.length === 0) return this.writeOut(structuredHeader(req, ReplyFlag.DONE, ReplyType.NONE, 0, 0));
    if (!(req.flags & CmdFlag.DF) && isZero(data)) {
      // A zero read costs 32 bytes on the wire instead of its length.
      const b = structuredHeader(req, ReplyFlag.DONE, ReplyType.OFFSET_HOLE, 12, 12);
      b.writeUInt32BE(Math.floor(req.offset / 0x100000000), 20);
      b.writeUInt32BE(req.offset >>> 0, 24);
      b.writeUInt32BE(data.length, 28);
      this.release(req);
      return this.writeOut(b);
    }
    const b = structuredHeader(req, ReplyFlag.DONE, ReplyType.OFFSET_DATA, 8 + data.length, 8);
    b.writeUInt32BE(Math.floor(req.offset / 0x100000000), 20);
    b.writeUInt32BE(req.offset >>> 0, 24);
    this.writeOut(b, data, req);
  }

  private sendBlockStatus(req: Request, extents: Extent[]): void {
    if (this.closed) return;
    const len = 4 + 8 * extents.length;
    const b = structuredHeader(req, ReplyFlag.DONE, ReplyType.BLOCK_STATUS, len, len);
    b.writeUInt32BE(this.neg.allocationContext, 20);
    let p = 24;
    for (const e of extents) {
      b.writeUInt32BE(e.length, p);
      b.writeUInt32BE((e.hole ? StateFlag.HOLE : 0) | (e.zero ? StateFlag.ZERO : 0), p + 4);
      p += 8;
    }
    this.writeOut(b);
  }

  /**
   * Header and payload leave in one write (cork), so replies never interleave on the wire.
   * `owner`'s pool buffer (the payload) is released in the payload write's callback: only then
   * is the stream done with it (it may sit in the stream's queue or in a libuv write until then).
   */
  private writeOut(header: Buffer, payload?: Buffer, owner?: Request): void {
    const s = this.wire.stream;
    if (payload && payload.length) {
      s.cork();
      s.write(header);
      s.write(payload, owner ? () => this.release(owner) : undefined);
      s.uncork();
    } else {
      s.write(header);
      if (owner) this.release(owner);
    }
    if (!this.outputBlocked && s.writableLength > this.limits.maxPendingOutput) {
      this.outputBlocked = true;
      const drained = () => {
        s.off('drain', drained);
        s.off('close', drained);
        this.outputBlocked = false;
        this.pump();
      };
      s.on('drain', drained);
      s.on('close', drained);
    }
  }

  /** Give the request's pool buffer back (once; nothing may use it any more). */
  private release(req: Request): void {
    const b = req.pooled;
    req.pooled = null;
    if (b) this.pool.give(b);
  }

  /** The request's pool buffer may still be in use (a device failed while holding it): never reuse it. */
  private forget(req: Request): void {
    const b = req.pooled;
    req.pooled = null;
    if (b) this.pool.forget(b);
  }

  private pauseInput(): void {
    if (!this.inputPaused) {
      this.inputPaused = true;
      this.wire.pause();
    }
  }

  private resumeInput(): void {
    if (this.inputPaused && !this.stopping) {
      this.inputPaused = false;
      this.wire.resume();
    }
  }

  /** Take no more requests; end the session once those in flight are answered. */
  private stop(reason: string): void {
    if (this.stopping) return;
    this.stopping = true;
    this.log.debug({ reason }, 'nbd: ending session');
    this.wire.pause();
    this.settle();
  }

  /** Hard disconnect: the stream cannot be trusted any more. */
  private abort(reason: string): void {
    this.log.warn({ reason }, 'nbd: protocol violation, disconnecting');
    this.stopping = true;
    this.closed = true;
    this.wire.destroy();
    this.settle();
  }

  private settle(): void {
    if (this.inFlight > 0) return;
    if (this.stopping && !this.closed) {
      this.closed = true; // nothing more will be written
      this.wire.end();
    }
    if (this.closed) this.resolveDone();
  }
}

function cmdName(type: number): string {
  return CMD_NAMES.get(type) ?? `command ${type}`;
}

function simpleHeader(req: Request, error: number): Buffer {
  const b = Buffer.allocUnsafe(16);
  b.writeUInt32BE(SIMPLE_REPLY_MAGIC, 0);
  b.writeUInt32BE(error, 4);
  b.writeUInt32BE(req.cookieHi, 8);
  b.writeUInt32BE(req.cookieLo, 12);
  return b;
}

/** A structured chunk header with `extra` bytes of room after it for the fixed payload fields. */
function structuredHeader(req: Request, flags: number, type: number, length: number, extra: number): Buffer {
  const b = Buffer.allocUnsafe(20 + extra);
  b.writeUInt32BE(STRUCTURED_REPLY_MAGIC, 0);
  b.writeUInt16BE(flags, 4);
  b.writeUInt16BE(type, 6);
  b.writeUInt32BE(req.cookieHi, 8);
  b.writeUInt32BE(req.cookieLo, 12);
  b.writeUInt32BE(length, 16);
  return b;
}

function isZero(data: Buffer): boolean {
  for (let p = 0; p < data.length; p += ZERO_BLOCK.length) {
    const n = Math.min(ZERO_BLOCK.length, data.length - p);
    if (ZERO_BLOCK.compare(data, p, p + n, 0, n) !== 0) return false;
  }
  return true;
}
