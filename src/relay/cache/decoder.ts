// The destination half of the memory cache: the encoder's frames (./frames.ts) in, exactly
// the bytes the source QEMU sent out. It keeps a copy of each page in the slot the frame
// names, as the encoder does, and hands on a frame's bytes only once their CRC matched: a
// frame it cannot check (cut, truncated, garbage, a slot it never filled) stops the stream
// with an error after the last good byte.
import { uncompressSync } from 'lz4-napi';
import { crc32 } from 'node:zlib';
import { checksum } from '../../link/checksum.ts';
import { PAGE_SIZE } from '../../memstream/reader.ts';
import { FRAME, HELLO_LEN, HELLO_MAGIC, MAX_SLOTS, NO_SLOT, THRU_HEAD } from './frames.ts';

/** The longest frame header: a page frame's (7 + the longest QEMU record header + 2). */
const MAX_HEAD = 7 + 8 + 256 + 2;
import { Slots } from './slots.ts';

export class CacheStreamError extends Error {
  constructor(message: string) {
    super(`memory cache stream: ${message}`);
    this.name = 'CacheStreamError';
  }
}


/** Views of bytes [from, to) of the concatenation of `pieces` (empty pieces left out). */
function views(pieces: Buffer[], from: number, to: number): Buffer[] {
  const out: Buffer[] = [];
  let at = 0;
  for (const p of pieces) {
    const a = Math.max(from, at), b = Math.min(to, at + p.length);
    if (b > a) out.push(p.subarray(a - at, b - at));
    at += p.length;
  }
  return out;
}

export class CacheDecoder {
  /** The start of a frame not complete yet, in the chunks it came in (joined once it is). */
  private held: Buffer[] = [];
  private heldLen = 0;
  private slots = -1;
  private copies = new Slots();
  private filled: Uint8Array = new Uint8Array(0);
  private failed: CacheStreamError | null = null;
  /** Bytes of a THRU frame still to come: handed on as they arrive. */
  private thruLeft = 0;
  bytesIn = 0;
  bytesOut = 0;
  /** Milliseconds spent decoding (and joining the output), for the log. */
  ms = 0;

  /** Set once a frame failed: nothing after the last good frame is handed on. */
  get error(): CacheStreamError | null { return this.failed; }

  /**
   * The QEMU bytes the next link bytes complete. On a bad frame it returns what came before
   * it (the stream's exact prefix) and sets `error`; later pushes return nothing.
   */
  push(chunk: Buffer): Buffer[] {
    if (this.failed) return [];
    this.bytesIn += chunk.length;
    const out: Buffer[] = [];
    try {
      if (this.heldLen) {
        // A frame cut by chunk boundaries: its bytes are joined once, when all are there (joining
        // each link chunk to what was held copied every byte again: ~15% of the decoder's CPU).
        this.held.push(chunk);
        this.heldLen += chunk.length;
        const head = this.held[0]!.length >= MAX_HEAD ? this.held[0]! : Buffer.concat(this.held, Math.min(this.heldLen, MAX_HEAD));
        const need = this.size(head, 0);
        if (need === 0 || this.heldLen < need) return out;
        const fromChunk = need - (this.heldLen - chunk.length);
        const pieces = this.held;
        pieces[pieces.length - 1] = chunk.subarray(0, fromChunk);
        this.held = [];
        this.heldLen = 0;
        // QEMU's bytes in a RAW frame are handed on as the views they came in; a page frame (4 KiB
        // at most) is joined.
        if (this.slots >= 0 && head[0] === FRAME.RAW) this.rawPieces(pieces, need, out);
        else this.frame(Buffer.concat(pieces, need), 0, out);
        chunk = chunk.subarray(fromChunk);
      }
      let at = 0;
      for (;;) {
        if (this.thruLeft) {
          const n = Math.min(this.thruLeft, chunk.length - at);
          if (n === 0) break;
          out.push(chunk.subarray(at, at + n));
          this.thruLeft -= n;
          at += n;
          continue;
        }
        const used = this.frame(chunk, at, out);
        if (used === 0) break;
        at += used;
      }
      if (at < chunk.length) { this.held = [chunk.subarray(at)]; this.heldLen = chunk.length - at; }
    } catch (e) {
      this.failed = e instanceof CacheStreamError ? e : new CacheStreamError((e as Error).message);
      this.held = [];
      this.heldLen = 0;
    }
    for (const b of out) this.bytesOut += b.length;
    return out;
  }

  /** A RAW frame of `size` bytes that came in `pieces`: its payload checked and handed on as views. */
  private rawPieces(pieces: Buffer[], size: number, out: Buffer[]): void {
    const data = views(pieces, 5, size - 4);
    let crc = 0;
    for (const d of data) crc = crc32(d, crc);
    if ((crc >>> 0) !== Buffer.concat(views(pieces, size - 4, size)).readUInt32BE(0)) throw new CacheStreamError('a raw frame failed its CRC');
    for (const d of data) out.push(d);
  }

  /** The link stream ended: returns the error, if any (anything held is an unfinished frame). */
  end(): CacheStreamError | null {
    if (this.failed) return this.failed;
    if (this.slots < 0) this.failed = new CacheStreamError('the stream ended before the hello');
    else if (this.heldLen) this.failed = new CacheStreamError(`the stream ended inside a frame (${this.heldLen} bytes held back)`);
    else if (this.thruLeft) this.failed = new CacheStreamError(`the stream ended inside a pass-through frame (${this.thruLeft} bytes short)`);
    return this.failed;
  }

  /**
   * The size of the frame at `at`, 0 while its header is not all there; throws on a header no
   * encoder writes (so garbage is refused before its bytes are waited for).
   */
  private size(b: Buffer, at: number): number {
    const left = b.length - at;
    if (this.slots < 0) return HELLO_LEN;
    if (left < 1) return 0;
    const type = b[at]!;
    if (type === FRAME.RAW) {
      if (left < 5) return 0;
      const len = b.readUInt32BE(at + 1);
      if (len > 64 * 1024 * 1024) throw new CacheStreamError(`a raw frame of ${len} bytes`);
      return 5 + len + 4;
    }
    if (type === FRAME.THRU) return left < THRU_HEAD ? 0 : THRU_HEAD; // the head only: its bytes follow unframed
    if (type !== FRAME.NEW && type !== FRAME.DELTA) throw new CacheStreamError(`unknown frame type 0x${type.toString(16)}`);
    if (left < 7) return 0;
    const hlen = b.readUInt16BE(at + 5);
    if (hlen < 8 || hlen > 8 + 256) throw new CacheStreamError(`a page header of ${hlen} bytes`);
    if (left < 7 + hlen + 2) return 0;
    return 7 + hlen + 2 + (b.readUInt16BE(at + 7 + hlen) || PAGE_SIZE) + 4;
  }

  /** Decodes one frame at `at`; returns the bytes it used, 0 when it is not complete yet. */
  private frame(b: Buffer, at: number, out: Buffer[]): number {
    const size = this.size(b, at);
    if (size === 0 || b.length - at < size) return 0;
    if (this.slots < 0) {
      if (b.readUInt32BE(at) !== HELLO_MAGIC) throw new CacheStreamError('no hello: the source relay does not run the cache');
      const slots = b.readUInt32BE(at + 4);
      const page = b.readUInt32BE(at + 8);
      if (page !== PAGE_SIZE) throw new CacheStreamError(`page size ${page}, this relay handles ${PAGE_SIZE}`);
      if (slots > MAX_SLOTS) throw new CacheStreamError(`${slots} slots asked for, at most ${MAX_SLOTS}`);
      this.slots = slots;
      this.filled = new Uint8Array(slots);
      return HELLO_LEN;
    }
    const type = b[at]!;
    if (type === FRAME.THRU) {
      if (crc32(b.subarray(at, at + 5)) !== b.readUInt32BE(at + 5)) throw new CacheStreamError('a pass-through frame\'s head failed its CRC');
      this.thruLeft = b.readUInt32BE(at + 1);
      return THRU_HEAD;
    }
    if (type === FRAME.RAW) {
      const len = size - 9;
      const data = b.subarray(at + 5, at + 5 + len);
      if ((len ? crc32(data) : 0) !== b.readUInt32BE(at + 5 + len)) throw new CacheStreamError('a raw frame failed its CRC');
      out.push(data);
      return size;
    }
    const slot = b.readUInt32BE(at + 1);
    const hlen = b.readUInt16BE(at + 5);
    const clen = b.readUInt16BE(at + 7 + hlen);
    const dlen = clen || PAGE_SIZE;
    if (slot !== NO_SLOT && slot >= this.slots) throw new CacheStreamError(`slot ${slot} beyond the ${this.slots} announced`);
    const header = b.subarray(at + 7, at + 7 + hlen);
    const data = b.subarray(at + 7 + hlen + 2, at + 7 + hlen + 2 + dlen);
    let page: Buffer;
    if (type === FRAME.DELTA) {
      if (slot === NO_SLOT || !this.filled[slot] || clen === 0) throw new CacheStreamError(`a delta against slot ${slot}, which holds no page`);
      const x = uncompressSync(data);
      if (x.length !== PAGE_SIZE) throw new CacheStreamError(`a delta of ${x.length} bytes`);
      // The page is rebuilt in the buffer lz4 just gave us (ours alone), unless it is not
      // 4-byte aligned for the word-wise XOR.
      page = x.byteOffset % 4 === 0 ? x : Buffer.from(x);
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
