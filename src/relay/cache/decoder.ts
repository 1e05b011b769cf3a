// The destination half of the memory cache: the encoder's frames (./frames.ts) in, exactly
// the bytes the source QEMU sent out. It keeps a copy of each page in the slot the frame
// names, as the encoder does, and hands on a frame's bytes only once their CRC matched: a
// frame it cannot check (cut, truncated, garbage, a slot it never filled) stops the stream
// with an error after the last good byte.
import { uncompressSync } from 'lz4-napi';
import { crc32 } from 'node:zlib';
import { checksum } from '../../link/checksum.ts';
import { PAGE_SIZE } from '../../memstream/reader.ts';
import { FRAME, HELLO_LEN, HELLO_MAGIC, MAX_SLOTS, NO_SLOT } from './frames.ts';
import { Slots } from './slots.ts';

export class CacheStreamError extends Error {
  constructor(message: string) {
    super(`memory cache stream: ${message}`);
    this.name = 'CacheStreamError';
  }
}


export class CacheDecoder {
  private buf: Buffer = Buffer.alloc(0);
  private slots = -1;
  private copies = new Slots();
  private filled: Uint8Array = new Uint8Array(0);
  private failed: CacheStreamError | null = null;
  bytesIn = 0;
  bytesOut = 0;

  /** Set once a frame failed: nothing after the last good frame is handed on. */
  get error(): CacheStreamError | null { return this.failed; }

  /**
   * The QEMU bytes the next link bytes complete. On a bad frame it returns what came before
   * it (the stream's exact prefix) and sets `error`; later pushes return nothing.
   */
  push(chunk: Buffer): Buffer[] {
    if (this.failed) return [];
    this.bytesIn += chunk.length;
    this.buf = this.buf.length ? Buffer.concat([this.buf, chunk]) : chunk;
    const out: Buffer[] = [];
    let at = 0;
    try {
      for (;;) {
        const used = this.frame(this.buf, at, out);
        if (used === 0) break;
        at += used;
      }
    } catch (e) {
      this.failed = e instanceof CacheStreamError ? e : new CacheStreamError((e as Error).message);
      this.buf = Buffer.alloc(0);
      for (const b of out) this.bytesOut += b.length;
      return out;
    }
    this.buf = this.buf.subarray(at);
    for (const b of out) this.bytesOut += b.length;
    return out;
  }

  /** The link stream ended: returns the error, if any (anything held is an unfinished frame). */
  end(): CacheStreamError | null {
    if (this.failed) return this.failed;
    if (this.slots < 0) this.failed = new CacheStreamError('the stream ended before the hello');
    else if (this.buf.length) this.failed = new CacheStreamError(`the stream ended inside a frame (${this.buf.length} bytes held back)`);
    return this.failed;
  }


  /** Decodes one frame at `at`; returns the bytes it used, 0 when it is not complete yet. */
  private frame(b: Buffer, at: number, out: Buffer[]): number {
    const left = b.length - at;
    if (this.slots < 0) {
      if (left < HELLO_LEN) return 0;
      if (b.readUInt32BE(at) !== HELLO_MAGIC) throw new CacheStreamError('no hello: the source relay does not run the cache');
      const slots = b.readUInt32BE(at + 4);
      const page = b.readUInt32BE(at + 8);
      if (page !== PAGE_SIZE) throw new CacheStreamError(`page size ${page}, this relay handles ${PAGE_SIZE}`);
      if (slots > MAX_SLOTS) throw new CacheStreamError(`${slots} slots asked for, at most ${MAX_SLOTS}`);
      this.slots = slots;
      this.filled = new Uint8Array(slots);
      return HELLO_LEN;
    }
    if (left < 1) return 0;
    const type = b[at]!;
    if (type === FRAME.RAW) {
      if (left < 5) return 0;
      const len = b.readUInt32BE(at + 1);
      if (len > 64 * 1024 * 1024) throw new CacheStreamError(`a raw frame of ${len} bytes`);
      if (left < 5 + len + 4) return 0;
      const data = b.subarray(at + 5, at + 5 + len);
      if ((len ? crc32(data) : 0) !== b.readUInt32BE(at + 5 + len)) throw new CacheStreamError('a raw frame failed its CRC');
      out.push(data);
      return 5 + len + 4;
    }
    if (type !== FRAME.NEW && type !== FRAME.DELTA) throw new CacheStreamError(`unknown frame type 0x${type.toString(16)}`);
    if (left < 7) return 0;
    const slot = b.readUInt32BE(at + 1);
    const hlen = b.readUInt16BE(at + 5);
    if (hlen < 8 || hlen > 8 + 256) throw new CacheStreamError(`a page header of ${hlen} bytes`);
    if (left < 7 + hlen + 2) return 0;
    const clen = b.readUInt16BE(at + 7 + hlen);
    const dlen = clen || PAGE_SIZE;
    const size = 7 + hlen + 2 + dlen + 4;
    if (left < size) return 0;
    if (slot !== NO_SLOT && slot >= this.slots) throw new CacheStreamError(`slot ${slot} beyond the ${this.slots} announced`);
    const header = b.subarray(at + 7, at + 7 + hlen);
    const data = b.subarray(at + 7 + hlen + 2, at + 7 + hlen + 2 + dlen);
    let page: Buffer;
    if (type === FRAME.DELTA) {
      if (slot === NO_SLOT || !this.filled[slot] || clen === 0) throw new CacheStreamError(`a delta against slot ${slot}, which holds no page`);
      const x = uncompressSync(data);
      if (x.length !== PAGE_SIZE) throw new CacheStreamError(`a delta of ${x.length} bytes`);
      page = Buffer.allocUnsafe(PAGE_SIZE);
      x.copy(page);
      const p = new Uint32Array(page.buffer, page.byteOffset, PAGE_SIZE >>> 2);
      const copy = this.copies.get(slot);
      const c = new Uint32Array(copy.buffer, copy.byteOffset, PAGE_SIZE >>> 2);
      for (let i = 0; i < p.length; i++) p[i] ^= c[i]!;
    } else {
      page = clen ? uncompressSync(data) : data;
      if (page.length !== PAGE_SIZE) throw new CacheStreamError(`a page of ${page.length} bytes`);
    }
    if (checksum(header, page) !== b.readUInt32BE(at + size - 4)) throw new CacheStreamError(`a page frame (slot ${slot}) failed its CRC`);
    if (slot !== NO_SLOT) { page.copy(this.copies.get(slot)); this.filled[slot] = 1; }
    out.push(header, page);
    return size;
  }
}
