// The memory cache's framing on the link between the two relays (never seen by QEMU). The
// source relay's encoder writes it, the destination relay's decoder reads it back into exactly
// the bytes the source QEMU sent. Big-endian:
//
//   hello  "VMC1", be32 slots, be32 page size          once, first
//   RAW    0x01, be32 len, bytes, be32 crc              bytes as QEMU sent them
//   NEW    0x02, be32 slot, be16 hlen, header, be16 clen, data, be32 crc
//          a PAGE record: header (QEMU's be64 offset|flags and idstr) then the page, lz4
//          compressed (clen > 0) or as it is (clen 0: 4096 bytes follow); both sides keep a copy
//          in `slot` (0xffffffff: not kept)
//   DELTA  0x03, be32 slot, be16 hlen, header, be16 clen, lz4(page XOR copy in slot), be32 crc
//          the page is the copy in `slot` XOR the decompressed bytes; the slot keeps the result
//   THRU   0x04, be32 len, be32 crc of these 5 bytes, then len bytes as QEMU sent them
//          the encoder turned down for good (./governor.ts `through`): whole chunks, not parsed
//
// Every RAW, NEW and DELTA frame's crc is the CRC-32 of the bytes it rebuilds: the decoder
// hands nothing on that it could not check, so a cut, a truncated frame or garbage can stop
// the stream but never produce a wrong byte on the destination side. A THRU frame's CRC covers
// its head only, as the link's DATA frames do (src/link/frames.ts): its bytes are QEMU's,
// untouched by the cache, so no bug of the codec can change them; in transit the carriers
// authenticate every byte (SSH's and TLS's AEAD ciphers; the shared file's records keep their
// own CRC), and the destination agent checks the whole stream's length and CRC-32 before it
// lets its QEMU run. Garbage still cannot pass as a THRU head (its CRC), so a garbage tail
// stops the stream; a CRC over the bulk bytes cost each end 0.3-0.5 s of CPU per GiB here.
import { crc32 } from 'node:zlib';

export const HELLO_MAGIC = 0x564d4331; // "VMC1"
export const HELLO_LEN = 12;
export const FRAME = { RAW: 0x01, NEW: 0x02, DELTA: 0x03, THRU: 0x04 } as const;
export const THRU_HEAD = 9;
export const NO_SLOT = 0xffffffff;
/** The most slots a decoder accepts (16 GiB of 4 KiB pages): a hello asking for more is refused. */
export const MAX_SLOTS = 1 << 22;

export function hello(slots: number, pageSize: number): Buffer {
  const b = Buffer.alloc(HELLO_LEN);
  b.writeUInt32BE(HELLO_MAGIC, 0);
  b.writeUInt32BE(slots, 4);
  b.writeUInt32BE(pageSize, 8);
  return b;
}

/**
 * A RAW frame as pieces: its head, the parts themselves (views, not copied: adjacent views of
 * one buffer merged), its CRC. Copying QEMU's bytes into each frame cost ~2.5 s of CPU per GiB
 * here (fresh memory faults in), most of what passing the stream through cost.
 */
export function rawFrame(parts: Buffer[]): Buffer[] {
  const out: Buffer[] = [Buffer.allocUnsafe(5)];
  let len = 0;
  let crc = 0;
  for (const p of parts) {
    if (!p.length) continue;
    len += p.length;
    crc = crc32(p, crc);
    const last = out[out.length - 1]!;
    if (out.length > 1 && last.buffer === p.buffer && last.byteOffset + last.length === p.byteOffset) out[out.length - 1] = Buffer.from(p.buffer, last.byteOffset, last.length + p.length);
    else out.push(p);
  }
  out[0]![0] = FRAME.RAW;
  out[0]!.writeUInt32BE(len, 1);
  const tail = Buffer.allocUnsafe(4);
  tail.writeUInt32BE(crc >>> 0, 0);
  out.push(tail);
  return out;
}

/** A NEW or DELTA frame; `data` is lz4 (clen = its length) or, for NEW, the raw page (`raw`). */
export function pageFrame(type: number, slot: number, header: Buffer, data: Buffer, raw: boolean, crc: number): Buffer {
  const f = Buffer.allocUnsafe(1 + 4 + 2 + header.length + 2 + data.length + 4);
  f[0] = type;
  f.writeUInt32BE(slot, 1);
  f.writeUInt16BE(header.length, 5);
  header.copy(f, 7);
  let at = 7 + header.length;
  f.writeUInt16BE(raw ? 0 : data.length, at);
  at += 2;
  data.copy(f, at);
  f.writeUInt32BE(crc >>> 0, at + data.length);
  return f;
}

/** The head of a THRU frame of `len` bytes (they follow as they are). */
export function thruHead(len: number): Buffer {
  const h = Buffer.allocUnsafe(THRU_HEAD);
  h[0] = FRAME.THRU;
  h.writeUInt32BE(len, 1);
  h.writeUInt32BE(crc32(h.subarray(0, 5)) >>> 0, 5);
  return h;
}
