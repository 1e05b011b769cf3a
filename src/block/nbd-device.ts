// NbdClientDevice: any NBD export (qemu-nbd, nbdkit, another vmshift) as a BlockDevice.
// What it adds on top of NbdClient (src/nbd/client.ts), which sends one command per call:
// - capabilities from the export's transmission flags;
// - several connections, but only when the server promises CAN_MULTI_CONN (otherwise
//   writes on one connection and a flush on another would not be consistent); each request
//   goes to the least-loaded connection;
// - requests larger than the server's maximum block size are split (and pipelined);
// - fallbacks so that callers need not care: zeroes written as data when WRITE_ZEROES is
//   missing, FUA as write + flush, block status as "all data" without base:allocation.
import { BlockError, checkRange } from './device.ts';
import type { BlockDevice, DeviceCaps, Extent, WriteOpts, ZeroOpts } from './device.ts';
import { NbdClient, type NbdClientTarget, type NbdTlsOptions } from '../nbd/client.ts';
import { TF } from '../nbd/constants.ts';

export interface NbdDeviceOptions {
  /** Connections to open; more than 1 only takes effect with CAN_MULTI_CONN (default 1). */
  connections?: number;
  /** Required for nbds:// targets. */
  tls?: NbdTlsOptions;
  /** Refuse writes even if the export allows them. */
  readOnly?: boolean;
  /** Requests in flight per connection (default 64). */
  maxInFlight?: number;
}

/** Trim, zero, cache and block-status lengths are 32-bit on the wire: cut them at 1 GiB. */
const LARGE_CHUNK = 1 << 30;
/**
 * Block status asks for up to 4 GiB less 64 KiB (32-bit, aligned to any minimum block
 * size): the copier walks a thin disk one answer at a time, so this is 4x fewer round
 * trips over its holes than 1 GiB.
 */
const STATUS_CHUNK = 2 ** 32 - 2 ** 16;
/** Fallback zero-writing goes through buffers of this size. */
const ZERO_BUFFER = 1 << 20;

export class NbdClientDevice implements BlockDevice {
  readonly size: number;
  readonly caps: DeviceCaps;
  readonly name: string;
  private closed = false;

  private constructor(private readonly clients: NbdClient[], readOnly: boolean) {
    const c = clients[0];
    this.size = c.size;
    this.name = c.peer;
    this.caps = {
      readOnly: readOnly || c.has(TF.READ_ONLY),
      canFlush: c.has(TF.SEND_FLUSH),
      canFua: c.has(TF.SEND_FUA),
      canTrim: c.has(TF.SEND_TRIM),
      canZero: c.has(TF.SEND_WRITE_ZEROES),
      canFastZero: c.has(TF.SEND_WRITE_ZEROES) && c.has(TF.SEND_FAST_ZERO),
      canBlockStatus: c.canBlockStatus,
      canCache: c.has(TF.SEND_CACHE),
      canMultiConn: c.has(TF.CAN_MULTI_CONN),
    };
  }

  /** Connect (the first connection decides whether more are allowed). */
  static async open(target: NbdClientTarget, opts: NbdDeviceOptions = {}): Promise<NbdClientDevice> {
    const connect = () => NbdClient.connect(target, { tls: opts.tls, maxInFlight: opts.maxInFlight });
    const first = await connect();
    const clients = [first];
    const wanted = Math.max(1, Math.floor(opts.connections ?? 1));
    // A stream target is one already-open channel: there is nothing to open a second time.
    const reusable = typeof target === 'string' || target.transport !== 'stream';
    if (wanted > 1 && reusable && first.has(TF.CAN_MULTI_CONN)) {
      const more = await Promise.allSettled(Array.from({ length: wanted - 1 }, connect));
      for (const m of more) if (m.status === 'fulfilled') clients.push(m.value);
      const failed = more.find((m): m is PromiseRejectedResult => m.status === 'rejected');
      const mismatch = clients.find((c) => c.size !== first.size || c.flags !== first.flags);
      if (failed || mismatch) {
        await Promise.allSettled(clients.map((c) => c.disconnect()));
        if (failed) throw failed.reason;
        throw new Error(`${first.peer}: connections disagree about the export (size or flags changed)`);
      }
    }
    return new NbdClientDevice(clients, opts.readOnly ?? false);
  }

  /** Connections in use (1 unless the server allows several). */
  get connections(): number {
    return this.clients.length;
  }

  async read(offset: number, length: number): Promise<Buffer> {
    this.check('read', offset, length);
    if (length === 0) return Buffer.alloc(0);
    const parts = await Promise.all(this.pieces(offset, length, this.maxPayload).map(([o, n]) => this.pick().read(o, n)));
    return parts.length === 1 ? parts[0] : Buffer.concat(parts, length);
  }

  async write(offset: number, data: Buffer, opts: WriteOpts = {}): Promise<void> {
    this.checkWrite('write', offset, data.length);
    const fua = opts.fua === true && this.caps.canFua;
    await Promise.all(this.pieces(offset, data.length, this.maxPayload).map(([o, n]) =>
      this.pick().write(o, data.subarray(o - offset, o - offset + n), { fua })));
    if (opts.fua && !this.caps.canFua) await this.flush();
  }

  async writeZeroes(offset: number, length: number, opts: ZeroOpts = {}): Promise<void> {
    this.checkWrite('writeZeroes', offset, length);
    if (!this.caps.canZero || (opts.fastZero && !this.caps.canFastZero)) {
      if (opts.fastZero) throw new BlockError('ENOTSUP', `${this.name}: fast zero is not supported by the server`);
      await this.writeZeroesAsData(offset, length, opts);
      return;
    }
    const fua = opts.fua === true && this.caps.canFua;
    await Promise.all(this.pieces(offset, length, LARGE_CHUNK).map(([o, n]) =>
      this.pick().writeZeroes(o, n, { fua, noHole: opts.noHole, fastZero: opts.fastZero })));
    if (opts.fua && !this.caps.canFua) await this.flush();
  }

  async trim(offset: number, length: number, opts: WriteOpts = {}): Promise<void> {
    this.checkWrite('trim', offset, length);
    if (!this.caps.canTrim) return; // trim is advisory: doing nothing is a correct answer
    const fua = opts.fua === true && this.caps.canFua;
    await Promise.all(this.pieces(offset, length, LARGE_CHUNK).map(([o, n]) => this.pick().trim(o, n, { fua })));
    if (opts.fua && !this.caps.canFua) await this.flush();
  }

  async flush(): Promise<void> {
    this.checkOpen('flush');
    if (!this.caps.canFlush) return; // the server has no volatile cache to flush
    // With CAN_MULTI_CONN a flush on one connection covers writes completed on all of them.
    await this.pick().flush();
  }

  async blockStatus(offset: number, length: number): Promise<Extent[]> {
    this.check('blockStatus', offset, length);
    if (length === 0) throw new BlockError('EINVAL', `${this.name}: blockStatus of zero length`);
    const n = Math.min(length, STATUS_CHUNK);
    if (!this.caps.canBlockStatus) return [{ offset, length: n, hole: false, zero: false }];
    return this.pick().blockStatus(offset, n);
  }

  async cache(offset: number, length: number): Promise<void> {
    this.check('cache', offset, length);
    if (!this.caps.canCache) return; // advisory
    await Promise.all(this.pieces(offset, length, LARGE_CHUNK).map(([o, n]) => this.pick().cache(o, n)));
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    await Promise.all(this.clients.map((c) => c.disconnect()));
  }

  // ---- helpers ----

  /** The largest READ/WRITE payload the server takes (a multiple of its minimum block size). */
  private get maxPayload(): number {
    return this.clients[0].blockSizes.maximum;
  }

  /** The least-loaded connection (the first one on ties, so one connection stays warm). */
  private pick(): NbdClient {
    let best = this.clients[0];
    for (const c of this.clients) if (c.pending < best.pending) best = c;
    return best;
  }

  /** Cut [offset, offset+length) into pieces of at most `max` bytes. */
  private pieces(offset: number, length: number, max: number): Array<[number, number]> {
    const out: Array<[number, number]> = [];
    for (let o = offset; o < offset + length; o += max) out.push([o, Math.min(max, offset + length - o)]);
    return out;
  }

  private async writeZeroesAsData(offset: number, length: number, opts: WriteOpts): Promise<void> {
    const zeroes = Buffer.alloc(Math.min(ZERO_BUFFER, this.maxPayload, length));
    const pieces = this.pieces(offset, length, zeroes.length);
    // In windows, so that zeroing a huge range does not queue a million requests at once.
    for (let i = 0; i < pieces.length; i += 64) {
      await Promise.all(pieces.slice(i, i + 64).map(([o, n]) => this.pick().write(o, zeroes.subarray(0, n))));
    }
    if (opts.fua) await this.flush();
  }

  private checkOpen(op: string): void {
    if (this.closed) throw new BlockError('ESHUTDOWN', `${this.name}: ${op} after close`);
  }

  private check(op: string, offset: number, length: number): void {
    this.checkOpen(op);
    checkRange(this, offset, length);
  }

  private checkWrite(op: string, offset: number, length: number): void {
    this.check(op, offset, length);
    if (this.caps.readOnly) throw new BlockError('EPERM', `${this.name}: ${op}: device is read-only`);
  }
}
