// The transmission phase of one server connection. Requests are parsed from the wire as they
// arrive and dispatched at once (pipelined); each replies when its device call completes,
// so replies go out of order, matched by cookie. Reading pauses while too many requests are
// in flight, while this connection or the whole server holds too many payload bytes
// (server-budget.ts), or while the socket has too much unsent output (backpressure).
// READ replies are read into, and WRITE payloads are received into, buffers of a BufferPool
// (buffer-pool.ts): one per request, given back once neither the socket nor the device holds
// it. A large WRITE's payload is read from the socket straight into its buffer where the Wire
// can (Wire.sink), and assembled there from received chunks otherwise.
import type { NbdLogger as Logger } from './logger.ts';
import { errnoOf, type BlockErrno, type Extent } from '../block/device.ts';
import {
  Cmd, CmdFlag, ERRNO_CODES, MAX_PAYLOAD, REQUEST_MAGIC, ReplyFlag, ReplyType, SIMPLE_REPLY_MAGIC,
  STRUCTURED_REPLY_MAGIC, StateFlag, TF,
} from './constants.ts';
import type { Negotiated } from './server-handshake.ts';
import type { Wire } from './server-io.ts';
import { BufferPool } from './buffer-pool.ts';
import { ByteBudget } from './server-budget.ts';
import { loadNative } from '../block/file.ts';
import { SendfileReplies } from './server-sendfile.ts';
import { INLINE_MAX } from '../block/inline-io.ts';

export interface ServerCounters {
  bytesRead: number;
  bytesWritten: number;
  requests: number;
  errors: number;
  /** READ payload bytes sent by sendfile from the page cache (server-sendfile.ts), and replies of those finished through the stream because the socket was full. */
  sendfileBytes: number;
  sendfileRest: number;
}

export interface TransmissionLimits {
  /** Requests dispatched and not yet answered, per connection. */
  maxInFlight: number;
  /**
   * Payload bytes this connection may hold: WRITE data from its header until the device wrote
   * it, READ data from the device read until the socket sent it (see server-budget.ts). A
   * connection holding nothing may always take one request, however large.
   */
  maxInFlightBytes: number;
  /** Unsent reply bytes above which we stop taking requests until the socket drains. */
  maxPendingOutput: number;
}

export const DEFAULT_LIMITS: TransmissionLimits = {
  maxInFlight: 128,
  // nbdcopy keeps 16 MiB in flight per connection (64 x 256 KiB): 8 MiB of them keep the
  // device and the socket busy as well (docs/performance.md), at half the memory.
  maxInFlightBytes: 8 * 1024 * 1024,
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
  /** Payload bytes this request holds of the connection's and the server's budget. */
  held: number;
}

/**
 * READs up to this size are copied (from the page cache on the event loop, where they are
 * cached: inline-io.ts), not sent by sendfile: for a small reply a worker thread's round
 * trip costs more than the copy it saves (inline-io.ts says why).
 */
const SENDFILE_MIN = INLINE_MAX;

/** A WRITE payload shorter than this left to arrive is awaited in received chunks, not read on its own. */
const SINK_MIN = 16 * 1024;

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
  /** Payload bytes this connection's requests hold (see TransmissionLimits.maxInFlightBytes). */
  private held = 0;
  /** A WRITE whose header was taken and whose payload is still arriving. */
  private pending: { req: Request; filled: number } | null = null;
  /** The pending payload is being read straight into its buffer (Wire.sink): nothing to parse until it is in. */
  private filling = false;
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
  /** READ replies by sendfile, where the socket and the device allow it (sendZeroCopy). */
  private readonly zc: SendfileReplies | null = null;

  constructor(
    private wire: Wire,
    private neg: Negotiated,
    private counters: ServerCounters,
    private log: Logger,
    private limits: TransmissionLimits = DEFAULT_LIMITS,
    private pool: BufferPool = new BufferPool(),
    private budget: ByteBudget = new ByteBudget(Number.MAX_SAFE_INTEGER),
  ) {
    this.dev = neg.export.device;
    this.size = this.dev.size;
    const native = loadNative();
    // On unless VMSHIFT_SENDFILE=0 (a switch for ruling it out when something looks wrong).
    if (native?.sendFileBatch && native.dupSocket && this.dev.sendRange && wire.fd >= 0 && process.env.VMSHIFT_SENDFILE !== '0') {
      this.zc = new SendfileReplies(wire.stream, wire.fd, native, pool, this.uncork);
    }
  }

  start(): Promise<void> {
    this.wire.onReadable = () => this.pump();
    this.wire.onClose = () => {
      this.closed = true;
      this.zc?.close();
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

  /** The global budget had bytes back: try again (input is paused while we wait). */
  private readonly wake = () => {
    if (this.inputPaused) this.pump();
  };

  private pump(): void {
    if (this.filling) return;
    const wire = this.wire;
    const lim = this.limits;
    if (this.pending && !this.stopping && !this.closed && !this.fillPending()) return this.resumeInput();
    while (!this.stopping && !this.closed) {
      if (this.inFlight >= lim.maxInFlight || this.outputBlocked) {
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
      if (type === Cmd.WRITE && length > MAX_PAYLOAD) {
        // We will not read 4 GiB to skip it: answer, then end the session once the rest is answered.
        const req = this.request(wire.take(HEADER));
        this.counters.requests++;
        this.sendError(req, 'EINVAL', `WRITE of ${length} bytes exceeds the ${MAX_PAYLOAD}-byte maximum; disconnecting`);
        this.stop('oversized write payload');
        return;
      }
      if (type === Cmd.DISC) {
        wire.take(HEADER);
        this.stop('client sent NBD_CMD_DISC');
        return;
      }
      // An oversized READ is refused before it holds anything (validate).
      const bytes = type === Cmd.WRITE || (type === Cmd.READ && length <= MAX_PAYLOAD) ? length : 0;
      if (bytes > 0 && !this.admit(bytes)) {
        this.pauseInput();
        return;
      }
      const req = this.request(wire.take(HEADER));
      req.held = bytes;
      if (type !== Cmd.WRITE || length === 0) {
        this.dispatch(req);
        continue;
      }
      if (!wire.reusesBuffers && wire.available >= length && wire.contiguous(length)) {
        // Within one chunk Node gave us (and keeps for us): a view of it, no copy.
        req.data = wire.take(length);
        this.dispatch(req);
        continue;
      }
      req.pooled = req.data = this.pool.take(length);
      this.pending = { req, filled: 0 };
      if (!this.fillPending()) break; // the rest of the payload is still to come
    }
    this.resumeInput();
  }

  /**
   * Whether a request holding `bytes` may start now; if so they are counted. When the server's
   * budget says no, the connection waits for it (input paused); when its own cap says no, its
   * own requests finishing start it again.
   */
  private admit(bytes: number): boolean {
    const cap = this.limits.maxInFlightBytes;
    if (this.held > 0 && this.held + bytes > cap) return false;
    if (!this.budget.take(bytes, this.held)) {
      this.budget.wait(this.wake);
      return false;
    }
    this.held += bytes;
    return true;
  }

  /**
   * Move the pending WRITE's payload bytes that arrived into its buffer; dispatch it once
   * complete (true). What is left to come goes straight into the buffer when the wire can.
   */
  private fillPending(): boolean {
    const p = this.pending!;
    const buf = p.req.data!;
    const n = Math.min(this.wire.available, buf.length - p.filled);
    if (n > 0) {
      this.wire.copyInto(buf, p.filled, n);
      p.filled += n;
    }
    if (p.filled === buf.length) {
      this.pending = null;
      this.dispatch(p.req);
      return true;
    }
    if (buf.length - p.filled >= SINK_MIN && this.wire.sink(buf, p.filled, () => this.filled())) this.filling = true;
    return false;
  }

  /** The pending payload was read straight into its buffer. */
  private filled(): void {
    const req = this.pending!.req;
    this.pending = null;
    this.filling = false;
    this.dispatch(req);
    this.pump();
  }

  private request(h: Buffer): Request {
    const offHi = h.readUInt32BE(16);
    return {
      flags: h.readUInt16BE(4),
      type: h.readUInt16BE(6),
      cookieHi: h.readUInt32BE(8),
      cookieLo: h.readUInt32BE(12),
      // Offsets at or past 2^53 cannot be represented exactly: mark them invalid.
      offset: offHi >= 0x200000 ? MAX_OFFSET : offHi * 0x100000000 + h.readUInt32BE(20),
      length: h.readUInt32BE(24),
      data: null,
      pooled: null,
      held: 0,
    };
  }

  private dispatch(req: Request): void {
    this.counters.requests++;
    this.inFlight++;
    this.execute(req).then(() => this.finished(), (err) => {
      // execute() catches device errors itself; this is a bug, but one connection's bug.
      this.log.error({ err }, 'nbd: request handler failed');
      this.forget(req);
      this.finished();
    });
  }

  private finished(): void {
    this.inFlight--;
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
          if (req.length > SENDFILE_MIN && this.zc?.enabled && (await this.sendZeroCopy(req))) return;
          let data: Buffer = Buffer.alloc(0);
          if (req.length) {
            req.pooled = this.pool.take(req.length);
            data = await dev.read(req.offset, req.length, req.pooled);
            if (data.buffer !== req.pooled.buffer) {
              // The device used a buffer of its own: ours goes back, the bytes stay held until sent.
              this.pool.give(req.pooled);
              req.pooled = null;
            }
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
    this.writeOut(this.dataHeader(req, data.length), data, req);
  }

  /** The header of a READ reply carrying `length` bytes of data: simple, or an OFFSET_DATA chunk's. */
  private dataHeader(req: Request, length: number): Buffer {
    if (!this.neg.structured) return simpleHeader(req, 0);
    const b = structuredHeader(req, ReplyFlag.DONE, ReplyType.OFFSET_DATA, 8 + length, 8);
    b.writeUInt32BE(Math.floor(req.offset / 0x100000000), 20);
    b.writeUInt32BE(req.offset >>> 0, 24);
    return b;
  }

  /**
   * A READ reply straight from the file's page cache (server-sendfile.ts), when the device
   * can name the file. False when the reply is still to be made the usual way (the range
   * has a hole or is not cached, the device is paused, the connection closed).
   */
  private async sendZeroCopy(req: Request): Promise<boolean> {
    const zc = this.zc!;
    const sent = this.dev.sendRange?.(req.offset, req.length, (fd, position) => zc.send(fd, position, req.length, () => this.dataHeader(req, req.length)));
    const outcome = sent ? await sent : 'not-sent';
    if (outcome === 'not-sent') return false;
    if (outcome === 'failed' || outcome === 'lost') {
      // Part of the reply is on the wire and the rest will never be: the stream is lost.
      const what = { offset: req.offset, length: req.length };
      if (outcome === 'failed') this.log.warn(what, 'nbd: device read failed in the middle of a READ reply; disconnecting');
      else this.log.debug(what, 'nbd: socket failed in the middle of a READ reply');
      this.stopping = true;
      this.closed = true;
      this.wire.destroy();
    } else {
      this.counters.bytesRead += req.length;
      this.counters.sendfileBytes += req.length;
      if (outcome === 'sent-rest') this.counters.sendfileRest++;
    }
    this.release(req);
    return true;
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
   * Replies are corked until the event loop has run every callback that was ready (a
   * setImmediate): all the replies those completed leave in one writev, instead of a
   * syscall each (a reply's header and payload stay together: replies never interleave).
   * `owner`'s pool buffer (the payload) is released in the payload write's callback: only then
   * is the stream done with it (it may sit in the stream's queue or in a libuv write until then).
   */
  private writeOut(header: Buffer, payload?: Buffer, owner?: Request): void {
    if (this.zc?.busy) return this.zc.output(() => this.writeOut(header, payload, owner));
    const s = this.wire.stream;
    if (!this.corked) {
      this.corked = true;
      s.cork();
      setImmediate(this.uncork);
    }
    if (payload && payload.length) {
      if (header.length) s.write(header);
      s.write(payload, owner ? () => this.release(owner) : undefined);
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

  private corked = false;
  /** Send what is corked now. */
  private readonly uncork = () => {
    this.corked = false;
    this.wire.stream.uncork();
  };

  /** Give the request's pool buffer and budget back (once; nothing may use them any more). */
  private release(req: Request): void {
    const b = req.pooled;
    req.pooled = null;
    if (b) this.pool.give(b);
    this.unhold(req);
  }

  /** The request's pool buffer may still be in use (a device failed while holding it): never reuse it. */
  private forget(req: Request): void {
    const b = req.pooled;
    req.pooled = null;
    if (b) this.pool.forget(b);
    this.unhold(req);
  }

  private unhold(req: Request): void {
    const n = req.held;
    if (n === 0) return;
    req.held = 0;
    this.held -= n;
    this.budget.give(n);
    if (this.inputPaused && !this.stopping) this.pump();
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
    if ((this.stopping || this.closed) && this.pending) {
      // Its payload will never be complete. While it was being read straight into its buffer,
      // the socket's next read may still land there (the Wire cannot take back the buffer it
      // gave for that read): never lend that buffer again.
      const { req } = this.pending;
      this.pending = null;
      if (this.filling) this.forget(req);
      else this.release(req);
      this.filling = false;
    }
    if (this.closed) this.budget.cancel(this.wake);
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
