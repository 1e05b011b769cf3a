// The link's wire format on a network carrier, and the state table that says which frame
// may arrive when (libnbd's way: one declared table, errors naming state, frame and peer).
//
// Every frame is a 20-byte header and a payload:
//   u8 type | u8 flags | u16 stream | u32 length | u64 offset | u32 crc32(header[0..16] + payload)
// except DATA, whose CRC covers the header only: both network carriers authenticate every
// byte already (SSH's and TLS's AEAD ciphers), and summing the bulk bytes once more cost a
// fifth of the link's CPU (docs/performance.md). The shared file, which has no such layer,
// keeps a CRC over every record's payload (record-file.ts).
// HELLO   payload JSON (Hello below): who we are and, per stream, where to resume
// OPEN    stream id, payload = its name (a stream opened while a carrier is up)
// DATA    stream, offset of the payload's first byte in the stream, payload
// FIN     stream, offset = the stream's final length (the sender called end())
// ACK     stream, offset = every byte below it was taken by the reader; flags FIN = and the end
// PING    keep-alive: a carrier with nothing heard for `deadAfterMs` is dropped and redialled
// BYE     the link is finished (every stream ended and acknowledged both ways)
// ABORT   the link is given up on purpose; payload = the reason, shown to the peer's user
//
// States of one carrier connection:
//   AWAIT_HELLO --HELLO--> READY --BYE--> CLOSED ; any --ABORT--> CLOSED ; any error -> DEAD
import { checksum } from './checksum.ts';
import { LinkError } from './errors.ts';

const EMPTY = Buffer.alloc(0);

export const HEADER = 20;
/** Largest DATA payload a sender makes and a receiver accepts. */
export const MAX_DATA = 256 * 1024;
/** HELLO, OPEN and ABORT payloads are small JSON or text. */
export const MAX_SMALL = 64 * 1024;

export const Frame = { HELLO: 1, OPEN: 2, DATA: 3, FIN: 4, ACK: 5, PING: 6, BYE: 7, ABORT: 8 } as const;
export type FrameType = (typeof Frame)[keyof typeof Frame];
export const FLAG_FIN = 1;
const NAMES = new Map<number, string>(Object.entries(Frame).map(([k, v]) => [v, k]));
export function frameName(t: number): string {
  return NAMES.get(t) ?? `unknown frame type ${t}`;
}

export type CarrierState = 'AWAIT_HELLO' | 'READY' | 'CLOSED' | 'DEAD';

/** The state table: in each state, the frames that may arrive and the state they lead to. */
export const TRANSITIONS: Record<CarrierState, Partial<Record<FrameType, CarrierState>>> = {
  AWAIT_HELLO: { [Frame.HELLO]: 'READY', [Frame.ABORT]: 'CLOSED' },
  READY: {
    [Frame.OPEN]: 'READY', [Frame.DATA]: 'READY', [Frame.FIN]: 'READY', [Frame.ACK]: 'READY',
    [Frame.PING]: 'READY', [Frame.BYE]: 'CLOSED', [Frame.ABORT]: 'CLOSED',
  },
  CLOSED: {},
  DEAD: {},
};

export interface HelloStream {
  id: number;
  name: string;
}
export interface Hello {
  v: 1;
  link: string;
  migration: string;
  role: 'a' | 'b';
  /** Streams this side sends on (id, name), so the peer knows streams whose OPEN it missed. */
  send: HelloStream[];
  /** Resume offsets: per stream this side receives, how far it has taken it (and whether the end). */
  recv: Array<{ id: number; offset: number; fin: boolean }>;
}

export interface FrameIn {
  type: FrameType;
  flags: number;
  stream: number;
  offset: number;
  /** The payload as it arrived: the socket's chunks, not copied into one buffer. */
  parts: Buffer[];
  /** The payload in one buffer (concatenated on first use when it came in several parts). */
  readonly payload: Buffer;
}

/** What the CRC covers of a frame's payload (DATA: nothing, see the top of this file). */
function summed(type: number, payload: Buffer): Buffer {
  return type === Frame.DATA ? EMPTY : payload;
}

/** The 20-byte header of a frame with `length` bytes of payload; the CRC covers it and `summedPayload`. */
function header(type: FrameType, stream: number, offset: number, length: number, flags: number, summedPayload: Buffer): Buffer {
  const h = Buffer.allocUnsafe(HEADER);
  h.writeUInt8(type, 0);
  h.writeUInt8(flags, 1);
  h.writeUInt16BE(stream, 2);
  h.writeUInt32BE(length, 4);
  h.writeBigUInt64BE(BigInt(offset), 8);
  h.writeUInt32BE(checksum(h.subarray(0, 16), summedPayload), 16);
  return h;
}

export function encodeFrame(type: FrameType, stream: number, offset: number, payload: Buffer = EMPTY, flags = 0): Buffer[] {
  const h = header(type, stream, offset, payload.length, flags, summed(type, payload));
  return payload.length ? [h, payload] : [h];
}

/** A DATA frame whose payload is `parts` (consecutive pieces of the stream), not joined: the carrier writes them as they are. */
export function encodeData(stream: number, offset: number, parts: Buffer[]): Buffer[] {
  let length = 0;
  for (const p of parts) length += p.length;
  return [header(Frame.DATA, stream, offset, length, 0, EMPTY), ...parts];
}

export function encodeHello(h: Hello): Buffer[] {
  return encodeFrame(Frame.HELLO, 0, 0, Buffer.from(JSON.stringify(h)));
}

/**
 * Parses frames from one carrier connection and enforces the state table. Feed it socket
 * chunks; it calls `onFrame` for each complete, verified frame, and throws a LinkError
 * naming the state, the frame and the peer on anything else (the carrier is then dropped).
 */
export class FrameReader {
  state: CarrierState = 'AWAIT_HELLO';
  private chunks: Buffer[] = [];
  private have = 0;

  constructor(private peer: string, private onFrame: (f: FrameIn) => void) {}

  push(chunk: Buffer): void {
    if (this.state === 'DEAD' || this.state === 'CLOSED') return;
    this.chunks.push(chunk);
    this.have += chunk.length;
    try {
      while (this.have >= HEADER && this.state !== 'CLOSED') {
        const h = this.header();
        const type = h.readUInt8(0) as FrameType;
        const length = h.readUInt32BE(4);
        const next: CarrierState | undefined = TRANSITIONS[this.state][type];
        if (!next) throw this.error('PROTOCOL', `${frameName(type)} is not allowed in state ${this.state}`);
        const limit = type === Frame.DATA ? MAX_DATA : MAX_SMALL;
        if (length > limit) throw this.error('PROTOCOL', `${frameName(type)} of ${length} bytes exceeds the limit of ${limit} in state ${this.state}`);
        if (this.have < HEADER + length) return;
        this.take(HEADER);
        // A frame usually spans two socket chunks: its payload is handed on in those pieces
        // rather than copied into one buffer (a copy of every byte on the bulk path).
        const parts = this.take(length);
        const payload = type === Frame.DATA ? EMPTY : join(parts);
        if (checksum(h.subarray(0, 16), payload) !== h.readUInt32BE(16)) {
          throw this.error('CHECKSUM', `${frameName(type)} frame failed its checksum in state ${this.state}`);
        }
        const offset = Number(h.readBigUInt64BE(8));
        if (!Number.isSafeInteger(offset)) throw this.error('PROTOCOL', `${frameName(type)} offset out of range`);
        this.state = next;
        let joined: Buffer | null = type === Frame.DATA ? null : payload;
        this.onFrame({ type, flags: h.readUInt8(1), stream: h.readUInt16BE(2), offset, parts, get payload() { return (joined ??= join(parts)); } });
      }
    } catch (e) {
      this.state = 'DEAD';
      throw e;
    }
  }

  error(code: 'PROTOCOL' | 'CHECKSUM' | 'MISMATCH', msg: string): LinkError {
    return new LinkError(code, `link: ${msg} (peer ${this.peer})`);
  }

  /** The next 20 bytes (copied only when they span chunks). */
  private header(): Buffer {
    const first = this.chunks[0];
    if (first.length >= HEADER) return first.subarray(0, HEADER);
    const h = Buffer.allocUnsafe(HEADER);
    let at = 0;
    for (const c of this.chunks) {
      at += c.copy(h, at, 0, Math.min(c.length, HEADER - at));
      if (at === HEADER) break;
    }
    return h;
  }

  /** The next `n` bytes as the pieces of the chunks they are in (no copy). */
  private take(n: number): Buffer[] {
    const out: Buffer[] = [];
    this.have -= n;
    while (n > 0) {
      const c = this.chunks[0];
      if (c.length <= n) {
        out.push(c);
        this.chunks.shift();
        n -= c.length;
      } else {
        out.push(c.subarray(0, n));
        this.chunks[0] = c.subarray(n);
        n = 0;
      }
    }
    return out;
  }
}

function join(parts: Buffer[]): Buffer {
  return parts.length === 1 ? parts[0] : parts.length === 0 ? EMPTY : Buffer.concat(parts);
}

/** Parse and check a HELLO payload; the peer must be on the same link and migration, in the other role. */
export function parseHello(payload: Buffer, expect: { link: string; migration: string; role: 'a' | 'b' }, peer: string): Hello {
  let h: Hello;
  try {
    h = JSON.parse(payload.toString('utf8')) as Hello;
  } catch {
    throw new LinkError('PROTOCOL', `link: HELLO from ${peer} is not valid JSON`);
  }
  const ok = h && h.v === 1 && typeof h.link === 'string' && typeof h.migration === 'string' && Array.isArray(h.send) && Array.isArray(h.recv)
    && h.send.every((s) => Number.isInteger(s.id) && typeof s.name === 'string')
    && h.recv.every((r) => Number.isInteger(r.id) && Number.isSafeInteger(r.offset) && r.offset >= 0 && typeof r.fin === 'boolean');
  if (!ok) throw new LinkError('PROTOCOL', `link: malformed HELLO from ${peer}`);
  if (h.link !== expect.link || h.migration !== expect.migration) {
    throw new LinkError('MISMATCH', `link: peer ${peer} is on link ${h.link} (migration ${h.migration}), expected link ${expect.link} (migration ${expect.migration})`);
  }
  if (h.role === expect.role || (h.role !== 'a' && h.role !== 'b')) {
    throw new LinkError('MISMATCH', `link: peer ${peer} claims role ${h.role}, which is ours`);
  }
  return h;
}
