// NbdClient: one connection to one NBD export. Connects over a unix socket, TCP, TCP+TLS or
// any open Duplex (an SSH channel), runs the handshake (client-handshake.ts), then pipelines
// requests: each gets a cookie, replies (simple or structured) are matched back by cookie.
// Requests go out in order, at most `maxInFlight` at a time, and never faster than the socket
// drains. When the connection drops, every pending request rejects with a BlockError naming
// the peer. This is the protocol, one request = one command; splitting large requests and
// using several connections is NbdClientDevice's job (src/block/nbd-device.ts).
import { connect as netConnect } from 'node:net';
import type { Duplex } from 'node:stream';
import { BlockError, type BlockErrno, type Extent } from '../block/device.ts';
import { ByteReader, StreamClosedError } from './client-reader.ts';
import {
  ClientHandshake, NbdError, type BlockSizes, type ExportInfo, type ExportListing, type HandshakeGoal,
  type Negotiated, type NbdTlsOptions,
} from './client-handshake.ts';
import { Cmd, CmdFlag, MAX_PAYLOAD, REQUEST_MAGIC, ReplyFlag, ReplyType, SIMPLE_REPLY_MAGIC, STRUCTURED_REPLY_MAGIC, StateFlag, TF, errnoFromCode } from './constants.ts';
import { formatNbdUri, parseNbdUri, type NbdTarget } from './uri.ts';

export { NbdError, type BlockSizes, type ExportInfo, type ExportListing, type NbdTlsOptions } from './client-handshake.ts';

/** An already-open byte stream to an NBD server (e.g. an SSH channel to a unix socket). */
export interface NbdStreamTarget {
  transport: 'stream';
  stream: Duplex;
  exportName: string;
  /** Run STARTTLS over the stream. */
  tls?: boolean;
  /** How to name the peer in errors, e.g. "ssh://host/run/vmshift/disk.sock". */
  label: string;
}

export type NbdClientTarget = string | NbdTarget | NbdStreamTarget;

export interface NbdConnectOptions {
  /** Required for nbds:// targets: TLS is never attempted without it, nor skipped with it. */
  tls?: NbdTlsOptions;
  /** Negotiate base:allocation for block status (default true). */
  blockStatus?: boolean;
  /** Requests on the wire at once; further ones wait in order (default 64). */
  maxInFlight?: number;
  /** Give up connecting/handshaking after this long (default 30 s). */
  handshakeTimeoutMs?: number;
}

const CMD_NAMES = new Map<number, string>(Object.entries(Cmd).map(([k, v]) => [v, k]));
const U32_MAX = 0xffffffff;

interface Request {
  cookie: number;
  cmd: number;
  flags: number;
  offset: number;
  length: number;
  payload?: Buffer;
  /** READ: the result buffer and how many bytes of it replies have covered. */
  data?: Buffer;
  covered: number;
  extents?: Extent[];
  error?: BlockError;
  resolve: (v: Request) => void;
  reject: (e: BlockError) => void;
}

/** Resolve a target to its parsed form and a name for errors. */
function describe(target: NbdClientTarget): { t: NbdTarget | NbdStreamTarget; peer: string } {
  const t = typeof target === 'string' ? parseNbdUri(target) : target;
  return { t, peer: t.transport === 'stream' ? t.label : formatNbdUri(t) };
}

/** Open the byte stream to the server, with errors that say what was refused. */
async function openStream(t: NbdTarget | NbdStreamTarget, peer: string, timeoutMs: number): Promise<Duplex> {
  if (t.transport === 'stream') return t.stream;
  const sock = t.transport === 'unix' ? netConnect(t.socket) : netConnect(t.port, t.host);
  sock.setNoDelay?.(true);
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => {
      sock.destroy();
      reject(new NbdError(peer, 'CONNECT', `timed out after ${timeoutMs} ms`));
    }, timeoutMs);
    sock.once('connect', () => {
      clearTimeout(timer);
      sock.removeAllListeners('error');
      resolve(sock);
    });
    sock.once('error', (e: NodeJS.ErrnoException) => {
      clearTimeout(timer);
      const why = e.code === 'ECONNREFUSED' ? 'connection refused'
        : e.code === 'ENOENT' ? 'no such socket'
        : e.code === 'EACCES' ? 'permission denied'
        : e.message;
      reject(new NbdError(peer, 'CONNECT', `${why}${e.code ? ` (${e.code})` : ''}`, undefined, { cause: e }));
    });
  });
}

async function handshake(target: NbdClientTarget, goal: (exportName: string) => HandshakeGoal, opts: NbdConnectOptions) {
  const { t, peer } = describe(target);
  if (t.tls && !opts.tls) throw new NbdError(peer, 'CONNECT', 'TLS target but no TLS options (ca, servername) given');
  const timeoutMs = opts.handshakeTimeoutMs ?? 30000;
  const stream = await openStream(t, peer, timeoutMs);
  const hs = new ClientHandshake({
    stream, peer, goal: goal(t.exportName),
    tls: opts.tls ? { ...opts.tls, host: t.transport === 'tcp' ? t.host : undefined } : undefined,
  });
  // A silent server must not hang us: destroying the stream fails the pending read.
  const timer = setTimeout(() => stream.destroy(new Error(`handshake timed out after ${timeoutMs} ms`)), timeoutMs);
  try {
    return { peer, result: await hs.run() };
  } finally {
    clearTimeout(timer);
  }
}

export class NbdClient {
  readonly peer: string;
  readonly exportName: string;
  readonly size: number;
  /** Transmission flags (TF.*). */
  readonly flags: number;
  readonly structuredReplies: boolean;
  readonly blockSizes: BlockSizes;
  private readonly stream: Duplex;
  private readonly reader: ByteReader;
  private readonly baseAllocationId: number | null;
  private readonly maxInFlight: number;
  private nextCookie = 1;
  /** Requests not yet sent, oldest first: queue[queueHead..]. A head index, not shift(),
   *  keeps thousands of queued requests cheap. */
  private queue: Request[] = [];
  private queueHead = 0;
  private readonly inFlight = new Map<number, Request>();
  private blocked = false;
  /** Set once the connection is unusable; new requests reject with it. */
  private dead: BlockError | null = null;
  private closing = false;
  private disconnecting: Promise<void> | null = null;
  private readonly closed: Promise<void>;
  private idleWaiters: Array<() => void> = [];

  /** Connect and enter transmission on the target's export. */
  static async connect(target: NbdClientTarget, opts: NbdConnectOptions = {}): Promise<NbdClient> {
    const { peer, result } = await handshake(target, (exportName) => ({ kind: 'go', exportName, blockStatus: opts.blockStatus ?? true }), opts);
    return new NbdClient(peer, result.negotiated!, opts.maxInFlight ?? 64);
  }

  /** The exports a server offers (NBD_OPT_LIST); the connection is closed afterwards. */
  static async list(target: NbdClientTarget, opts: NbdConnectOptions = {}): Promise<ExportListing[]> {
    return (await handshake(target, () => ({ kind: 'list' }), opts)).result.list!;
  }

  /** Size, flags and block sizes of one export (NBD_OPT_INFO), without entering transmission. */
  static async info(target: NbdClientTarget, opts: NbdConnectOptions = {}): Promise<ExportInfo> {
    return (await handshake(target, (exportName) => ({ kind: 'info', exportName }), opts)).result.info!;
  }

  private constructor(peer: string, n: Negotiated, maxInFlight: number) {
    this.peer = peer;
    this.exportName = n.exportName;
    this.size = n.size;
    this.flags = n.flags;
    this.structuredReplies = n.structured;
    this.blockSizes = n.blockSizes;
    this.stream = n.stream;
    this.reader = n.reader;
    this.baseAllocationId = n.baseAllocationId;
    this.maxInFlight = Math.max(1, maxInFlight);
    this.stream.on('drain', () => {
      this.blocked = false;
      this.pump();
    });
    this.closed = this.receiveLoop();
  }

  has(flag: number): boolean {
    return (this.flags & flag) !== 0;
  }
  /** True when the server answers block status with base:allocation. */
  get canBlockStatus(): boolean {
    return this.baseAllocationId !== null;
  }
  /** Requests queued or on the wire (for least-loaded connection choice). */
  get pending(): number {
    return this.queue.length - this.queueHead + this.inFlight.size;
  }

  // ---- commands ----

  async read(offset: number, length: number): Promise<Buffer> {
    if (length === 0) return Buffer.alloc(0);
    this.checkPayload('READ', offset, length);
    const r = await this.request(Cmd.READ, 0, offset, length);
    return r.data!;
  }

  async write(offset: number, data: Buffer, opts: { fua?: boolean } = {}): Promise<void> {
    if (data.length === 0) return;
    this.checkWritable('WRITE');
    this.checkPayload('WRITE', offset, data.length);
    await this.request(Cmd.WRITE, this.fuaFlag('WRITE', opts.fua), offset, data.length, data);
  }

  async flush(): Promise<void> {
    this.checkSupported('FLUSH', TF.SEND_FLUSH);
    await this.request(Cmd.FLUSH, 0, 0, 0);
  }

  async trim(offset: number, length: number, opts: { fua?: boolean } = {}): Promise<void> {
    if (length === 0) return;
    this.checkWritable('TRIM');
    this.checkSupported('TRIM', TF.SEND_TRIM);
    this.checkRange('TRIM', offset, length, U32_MAX);
    await this.request(Cmd.TRIM, this.fuaFlag('TRIM', opts.fua), offset, length);
  }

  async writeZeroes(offset: number, length: number, opts: { fua?: boolean; noHole?: boolean; fastZero?: boolean } = {}): Promise<void> {
    if (length === 0) return;
    this.checkWritable('WRITE_ZEROES');
    this.checkSupported('WRITE_ZEROES', TF.SEND_WRITE_ZEROES);
    this.checkRange('WRITE_ZEROES', offset, length, U32_MAX);
    let flags = this.fuaFlag('WRITE_ZEROES', opts.fua);
    if (opts.noHole) flags |= CmdFlag.NO_HOLE;
    if (opts.fastZero) {
      this.checkSupported('WRITE_ZEROES with FAST_ZERO', TF.SEND_FAST_ZERO);
      flags |= CmdFlag.FAST_ZERO;
    }
    await this.request(Cmd.WRITE_ZEROES, flags, offset, length);
  }

  async cache(offset: number, length: number): Promise<void> {
    if (length === 0) return;
    this.checkSupported('CACHE', TF.SEND_CACHE);
    this.checkRange('CACHE', offset, length, U32_MAX);
    await this.request(Cmd.CACHE, 0, offset, length);
  }

  /**
   * base:allocation extents from `offset`, covering at most `length` bytes (the server may
   * answer for less). Rejects with ENOTSUP when base:allocation was not negotiated.
   */
  async blockStatus(offset: number, length: number, opts: { reqOne?: boolean } = {}): Promise<Extent[]> {
    if (this.baseAllocationId === null) {
      throw new BlockError('ENOTSUP', `${this.peer}: BLOCK_STATUS: server did not agree to base:allocation`);
    }
    this.checkRange('BLOCK_STATUS', offset, length, U32_MAX);
    if (length === 0) throw new BlockError('EINVAL', `${this.peer}: BLOCK_STATUS: zero length`);
    const r = await this.request(Cmd.BLOCK_STATUS, opts.reqOne ? CmdFlag.REQ_ONE : 0, offset, length);
    if (!r.extents?.length) throw new BlockError('EIO', `${this.peer}: BLOCK_STATUS ${offset}+${length}: server sent no extents`);
    return r.extents;
  }

  /** Soft disconnect: wait for pending requests, send NBD_CMD_DISC, close. Idempotent. */
  disconnect(): Promise<void> {
    this.disconnecting ??= this.softDisconnect();
    return this.disconnecting;
  }

  private async softDisconnect(): Promise<void> {
    this.closing = true;
    await this.idle();
    if (!this.dead) {
      this.stream.write(header(0, Cmd.DISC, 0, 0, 0));
      this.stream.end();
      // A server that does not close after DISC must not keep us here.
      const t = setTimeout(() => this.stream.destroy(), 5000);
      await this.closed;
      clearTimeout(t);
    }
    this.stream.destroy();
  }

  /** Hard disconnect: drop the connection now; pending requests reject with ESHUTDOWN. */
  destroy(): void {
    this.closing = true;
    this.fail(new BlockError('ESHUTDOWN', `${this.peer}: connection closed by the client`));
    this.stream.destroy();
  }

  // ---- request path ----

  private request(cmd: number, flags: number, offset: number, length: number, payload?: Buffer): Promise<Request> {
    if (this.dead) return Promise.reject(this.dead);
    if (this.closing) return Promise.reject(new BlockError('ESHUTDOWN', `${this.peer}: ${cmdName(cmd)}: the client is disconnecting`));
    return new Promise<Request>((resolve, reject) => {
      const cookie = this.nextCookie++;
      this.queue.push({ cookie, cmd, flags, offset, length, payload, covered: 0, resolve, reject });
      this.pump();
    });
  }

  /** Send queued requests while the in-flight limit and the socket allow. */
  private pump(): void {
    while (!this.blocked && !this.dead && this.queueHead < this.queue.length && this.inFlight.size < this.maxInFlight) {
      const r = this.queue[this.queueHead++];
      this.inFlight.set(r.cookie, r);
      const h = header(r.flags, r.cmd, r.cookie, r.offset, r.length);
      let ok = this.stream.write(h);
      if (r.payload) ok = this.stream.write(r.payload);
      r.payload = undefined; // the socket holds it now; let it go when written
      if (!ok) this.blocked = true;
    }
    if (this.queueHead === this.queue.length) {
      this.queue = [];
      this.queueHead = 0;
    } else if (this.queueHead > 1024 && this.queueHead * 2 > this.queue.length) {
      this.queue = this.queue.slice(this.queueHead);
      this.queueHead = 0;
    }
  }

  /** Resolves when no request is queued or in flight. */
  private idle(): Promise<void> {
    if (this.pending === 0) return Promise.resolve();
    return new Promise((resolve) => this.idleWaiters.push(resolve));
  }

  private settle(r: Request): void {
    this.inFlight.delete(r.cookie);
    if (r.error) r.reject(r.error);
    else r.resolve(r);
    // A server that says ESHUTDOWN wants us gone: soft-disconnect once the rest is answered.
    if (r.error?.errno === 'ESHUTDOWN' && !this.closing) void this.disconnect().catch(() => undefined);
    if (this.pending === 0) for (const w of this.idleWaiters.splice(0)) w();
    this.pump();
  }

  /** The connection is unusable: reject everything pending, now and later. */
  private fail(err: BlockError): void {
    if (!this.dead) this.dead = err;
    const all = [...this.inFlight.values(), ...this.queue.slice(this.queueHead)];
    this.queue = [];
    this.queueHead = 0;
    this.inFlight.clear();
    for (const r of all) r.reject(new BlockError(this.dead.errno, `${this.dead.message} (${cmdName(r.cmd)} ${r.offset}+${r.length} was pending)`, { cause: this.dead }));
    for (const w of this.idleWaiters.splice(0)) w();
  }

  // ---- reply path ----

  private async receiveLoop(): Promise<void> {
    try {
      for (;;) {
        const magic = (await this.reader.read(4)).readUInt32BE(0);
        if (magic === SIMPLE_REPLY_MAGIC) await this.simpleReply();
        else if (magic === STRUCTURED_REPLY_MAGIC && this.structuredReplies) await this.structuredChunk();
        else throw this.protocolError(`bad reply magic 0x${magic.toString(16)}`);
      }
    } catch (e) {
      if (this.closing && e instanceof StreamClosedError) {
        this.fail(new BlockError('ESHUTDOWN', `${this.peer}: connection closed by the client`));
      } else if (e instanceof StreamClosedError) {
        this.fail(new BlockError('EIO', `${this.peer}: connection lost: ${e.message}`, { cause: e }));
      } else {
        // A protocol violation: we can no longer tell replies apart, so hang up (a hard disconnect).
        this.fail(e instanceof BlockError ? e : new BlockError('EIO', `${this.peer}: ${(e as Error).message}`, { cause: e }));
        this.stream.destroy();
      }
    }
  }

  private take(cookie: number, what: string): Request {
    const r = this.inFlight.get(cookie);
    if (!r) throw this.protocolError(`${what} for unknown cookie ${cookie}`);
    return r;
  }

  private async simpleReply(): Promise<void> {
    const h = await this.reader.read(12);
    const code = h.readUInt32BE(0);
    const r = this.take(cookieOf(h, 4), 'simple reply');
    if (code) {
      r.error = this.replyError(r, code, '');
    } else if (r.cmd === Cmd.READ) {
      if (this.structuredReplies) throw this.protocolError(`simple reply with data to READ ${r.offset}+${r.length}`);
      r.data = await this.reader.read(r.length);
    } else if (r.cmd === Cmd.BLOCK_STATUS) {
      throw this.protocolError('simple reply to BLOCK_STATUS');
    }
    this.settle(r);
  }

  private async structuredChunk(): Promise<void> {
    const h = await this.reader.read(16);
    const flags = h.readUInt16BE(0);
    const type = h.readUInt16BE(2);
    const r = this.take(cookieOf(h, 4), `structured reply type ${type}`);
    const length = h.readUInt32BE(12);
    if (length > MAX_PAYLOAD + 4096) throw this.protocolError(`structured reply of ${length} bytes to ${cmdName(r.cmd)}`);
    const what = `${cmdName(r.cmd)} ${r.offset}+${r.length}`;

    if (type === ReplyType.OFFSET_DATA || type === ReplyType.OFFSET_HOLE) {
      if (r.cmd !== Cmd.READ || length < (type === ReplyType.OFFSET_DATA ? 9 : 12)) throw this.protocolError(`bad data chunk for ${what}`);
      const at = Number((await this.reader.read(8)).readBigUInt64BE(0));
      const n = type === ReplyType.OFFSET_DATA ? length - 8 : (await this.reader.read(4)).readUInt32BE(0);
      if (at < r.offset || at + n > r.offset + r.length) throw this.protocolError(`chunk ${at}+${n} outside ${what}`);
      r.data ??= Buffer.allocUnsafe(r.length);
      if (type === ReplyType.OFFSET_DATA) (await this.reader.read(n)).copy(r.data, at - r.offset);
      else r.data.fill(0, at - r.offset, at - r.offset + n); // a hole reads as zeroes
      r.covered += n;
    } else if (type === ReplyType.BLOCK_STATUS) {
      const d = await this.reader.read(length);
      if (r.cmd !== Cmd.BLOCK_STATUS || length < 12 || (length - 4) % 8) throw this.protocolError(`bad block status chunk for ${what}`);
      if (d.readUInt32BE(0) === this.baseAllocationId) r.extents = this.extents(r, d);
    } else if (type === ReplyType.ERROR || type === ReplyType.ERROR_OFFSET) {
      const d = await this.reader.read(length);
      if (length < 6 || 6 + d.readUInt16BE(4) > length) throw this.protocolError(`bad error chunk for ${what}`);
      const msg = d.toString('utf8', 6, 6 + d.readUInt16BE(4));
      const at = type === ReplyType.ERROR_OFFSET && length >= 6 + d.readUInt16BE(4) + 8 ? ` at ${d.readBigUInt64BE(6 + d.readUInt16BE(4))}` : '';
      r.error ??= this.replyError(r, d.readUInt32BE(0), msg + at);
    } else if (type === ReplyType.NONE) {
      if (length !== 0 || !(flags & ReplyFlag.DONE)) throw this.protocolError(`bad NONE chunk for ${what}`);
    } else {
      throw this.protocolError(`unknown structured reply type ${type} for ${what}`);
    }

    if (!(flags & ReplyFlag.DONE)) return;
    if (!r.error && r.cmd === Cmd.READ && r.covered !== r.length) {
      throw this.protocolError(`${what}: reply covered ${r.covered} of ${r.length} bytes`);
    }
    if (!r.error && r.cmd === Cmd.READ) r.data ??= Buffer.alloc(0);
    this.settle(r);
  }

  /** Turn a base:allocation payload into extents, clipped to the request. */
  private extents(r: Request, d: Buffer): Extent[] {
    const out: Extent[] = [];
    let at = r.offset;
    const end = r.offset + r.length;
    for (let p = 4; p + 8 <= d.length && at < end; p += 8) {
      const len = Math.min(d.readUInt32BE(p), end - at);
      const f = d.readUInt32BE(p + 4);
      if (len === 0) throw this.protocolError(`zero-length extent in BLOCK_STATUS ${r.offset}+${r.length}`);
      out.push({ offset: at, length: len, hole: (f & StateFlag.HOLE) !== 0, zero: (f & StateFlag.ZERO) !== 0 });
      at += len;
    }
    return out;
  }

  private replyError(r: Request, code: number, msg: string): BlockError {
    const errno: BlockErrno = errnoFromCode(code);
    const what = r.cmd === Cmd.FLUSH ? 'FLUSH' : `${cmdName(r.cmd)} ${r.offset}+${r.length}`;
    return new BlockError(errno, `${this.peer}: ${what}: ${errno}${msg ? `: ${msg}` : ''}`);
  }

  private protocolError(msg: string): BlockError {
    return new BlockError('EIO', `${this.peer}: protocol error: ${msg}`);
  }

  // ---- local checks: bad requests are refused here, never sent ----

  private checkRange(cmd: string, offset: number, length: number, max: number): void {
    if (!Number.isSafeInteger(offset) || !Number.isSafeInteger(length) || offset < 0 || length < 0) {
      throw new BlockError('EINVAL', `${this.peer}: ${cmd}: bad range offset=${offset} length=${length}`);
    }
    if (offset + length > this.size) {
      throw new BlockError('EINVAL', `${this.peer}: ${cmd}: range ${offset}+${length} is past the end (${this.size})`);
    }
    if (length > max) throw new BlockError('EINVAL', `${this.peer}: ${cmd}: length ${length} exceeds ${max} (split the request)`);
  }

  private checkPayload(cmd: string, offset: number, length: number): void {
    this.checkRange(cmd, offset, length, this.blockSizes.maximum);
  }

  private checkWritable(cmd: string): void {
    if (this.has(TF.READ_ONLY)) throw new BlockError('EPERM', `${this.peer}: ${cmd}: export is read-only`);
  }

  private checkSupported(cmd: string, flag: number): void {
    if (!this.has(flag)) throw new BlockError('ENOTSUP', `${this.peer}: ${cmd}: not supported by the server`);
  }

  private fuaFlag(cmd: string, fua: boolean | undefined): number {
    if (!fua) return 0;
    this.checkSupported(`${cmd} with FUA`, TF.SEND_FUA);
    return CmdFlag.FUA;
  }
}

function header(flags: number, cmd: number, cookie: number, offset: number, length: number): Buffer {
  const h = Buffer.allocUnsafe(28);
  h.writeUInt32BE(REQUEST_MAGIC, 0);
  h.writeUInt16BE(flags, 4);
  h.writeUInt16BE(cmd, 6);
  h.writeBigUInt64BE(BigInt(cookie), 8);
  h.writeBigUInt64BE(BigInt(offset), 16);
  h.writeUInt32BE(length, 24);
  return h;
}

function cookieOf(b: Buffer, at: number): number {
  return Number(b.readBigUInt64BE(at));
}

function cmdName(cmd: number): string {
  return CMD_NAMES.get(cmd) ?? `command ${cmd}`;
}
