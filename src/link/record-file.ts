// One append-only file of framed records on the shared directory: a header naming the link,
// the migration, the writing side and what the file carries, then records
//   u32 'VREC' | u8 kind | u8 flags | u16 stream | u32 length | u64 offset | u32 crc | payload
// The crc covers the record header and payload and is seeded with a checksum of the link
// and migration ids, so a record copied from another link's file fails it even where its
// offsets fit. (This guards against stale and foreign files, not against someone who may
// write the shared directory: they could as well write a whole valid file.)
import { constants, openSync, closeSync, writevSync, fdatasync, fdatasyncSync, readSync, fstatSync, rmSync } from 'node:fs';
import { crc32 } from 'node:zlib';
import { checksum } from './checksum.ts';
import { LinkError } from './errors.ts';

export const Rec = { DATA: 1, FIN: 2, ACK: 3, BEAT: 4, BYE: 5 } as const;
export type RecKind = (typeof Rec)[keyof typeof Rec];
const REC_MAGIC = 0x56524543; // 'VREC'
export const REC_HEADER = 24;
const FILE_MAGIC = Buffer.from('VMSLNKF1');
const MAX_PAYLOAD = 1024 * 1024;

let syncs = 0;
/** fdatasync calls made by every writer in this process (benchmarks and tests count them). */
export function syncCount(): number {
  return syncs;
}

export interface FileHeader {
  link: string;
  migration: string;
  /** The side that writes the file. */
  from: 'a' | 'b';
  /** 'data' carries one stream's bytes in one direction; 'ack' carries the writer's acknowledgements. */
  kind: 'data' | 'ack';
  stream?: number;
  name?: string;
}

export interface Record {
  kind: RecKind;
  flags: number;
  stream: number;
  offset: number;
  payload: Buffer;
}

export function linkSeed(link: string, migration: string): number {
  return crc32(`${link}\0${migration}`);
}

export function encodeRecord(seed: number, kind: RecKind, stream: number, offset: number, payload: Buffer, flags = 0): Buffer[] {
  const h = Buffer.allocUnsafe(REC_HEADER);
  h.writeUInt32BE(REC_MAGIC, 0);
  h.writeUInt8(kind, 4);
  h.writeUInt8(flags, 5);
  h.writeUInt16BE(stream, 6);
  h.writeUInt32BE(payload.length, 8);
  h.writeBigUInt64BE(BigInt(offset), 12);
  h.writeUInt32BE(checksum(h.subarray(0, 20), payload, seed), 20);
  return payload.length ? [h, payload] : [h];
}

function encodeHeader(seed: number, header: FileHeader): Buffer {
  const json = Buffer.from(JSON.stringify(header));
  const b = Buffer.alloc(FILE_MAGIC.length + 8 + json.length);
  FILE_MAGIC.copy(b, 0);
  b.writeUInt32BE(json.length, 8);
  b.writeUInt32BE(crc32(json, seed), 12);
  json.copy(b, 16);
  return b;
}

/** The writer's end: created 0600 with O_EXCL|O_NOFOLLOW (never an existing file or a symlink). */
export class RecordWriter {
  private fd: number;
  /** Where the next record starts (records are only ever appended). */
  size: number;
  /** An fdatasync runs (syncSoon); `again`: records came after it started; `closing`: close() waits for it. */
  private syncing = false;
  private again = false;
  private closing = false;

  constructor(readonly path: string, readonly seed: number, header: FileHeader) {
    this.fd = openSync(path, constants.O_WRONLY | constants.O_CREAT | constants.O_EXCL | constants.O_NOFOLLOW | constants.O_APPEND, 0o600);
    try {
      const h = encodeHeader(seed, header);
      writevSync(this.fd, [h]);
      fdatasyncSync(this.fd);
      syncs++;
      this.size = h.length;
    } catch (e) {
      // A full directory: the file we just created (O_EXCL: ours) would be left empty.
      closeSync(this.fd);
      rmSync(path, { force: true });
      throw e;
    }
  }

  /** Append records (and with `sync`, fdatasync them now); returns the file position of each. Throws on ENOSPC and such. */
  append(records: Buffer[][], sync: boolean): number[] {
    const positions: number[] = [];
    const bufs: Buffer[] = [];
    let at = this.size;
    for (const r of records) {
      positions.push(at);
      for (const b of r) { bufs.push(b); at += b.length; }
    }
    let written = 0;
    const total = at - this.size;
    // writev may write less than asked (signals, a filling disk): go on from where it stopped.
    let rest = bufs;
    while (written < total) {
      const n = writevSync(this.fd, rest);
      written += n;
      if (written < total) rest = skipBytes(rest, n);
    }
    if (sync) { fdatasyncSync(this.fd); syncs++; }
    this.size = at;
    return positions;
  }

  /** Read back a record's payload (the sender resends what it let go of from memory). */
  readPayload(pos: number, length: number): Buffer {
    const rfd = openSync(this.path, constants.O_RDONLY | constants.O_NOFOLLOW);
    try {
      const b = Buffer.allocUnsafe(length);
      const n = readSync(rfd, b, 0, length, pos + REC_HEADER);
      if (n !== length) throw new LinkError('FILE', `link: ${this.path} is shorter than what was written to it`);
      return b;
    } finally {
      closeSync(rfd);
    }
  }

  /**
   * Group commit: start an fdatasync of everything appended so far, in the thread pool (the
   * event loop goes on relaying), unless one is running; records appended meanwhile are covered
   * by one more sync when it ends. A lone record (a commit) is synced at once; a stream at
   * full rate costs one sync in flight, not one per append. `onError` sees a failed sync (a
   * full or gone NFS server reports it only here).
   */
  syncSoon(onError: (e: NodeJS.ErrnoException) => void): void {
    if (this.fd < 0 || this.closing) return;
    if (this.syncing) { this.again = true; return; }
    this.syncing = true;
    this.again = false;
    fdatasync(this.fd, (err) => {
      this.syncing = false;
      syncs++;
      if (this.closing) { this.close(); return; }
      if (err) onError(err);
      else if (this.again) this.syncSoon(onError);
    });
  }

  close(): void {
    // A sync in flight uses the descriptor: it is closed when that sync ends.
    if (this.syncing) { this.closing = true; return; }
    this.closing = false;
    if (this.fd >= 0) closeSync(this.fd);
    this.fd = -1;
  }
}

function skipBytes(bufs: Buffer[], n: number): Buffer[] {
  const out: Buffer[] = [];
  for (const b of bufs) {
    if (n >= b.length) { n -= b.length; continue; }
    out.push(n ? b.subarray(n) : b);
    n = 0;
  }
  return out;
}

/** A file whose header is not (yet) all there: read again later, not refused. */
export class IncompleteHeader extends LinkError {
  constructor(message: string) { super('FILE', message); }
}

/**
 * The reader's end: checks the header against the link it expects, then hands out verified
 * records as the writer appends them. A partial record at the end is waited for; a record that
 * fails its checksum, has a bad magic, or goes backwards (reordered) makes the file `broken`:
 * nothing from there on is ever delivered, and the bytes must come from the other carrier.
 */
export class RecordReader {
  private fd: number;
  private pos: number;
  header: FileHeader;
  broken: string | null = null;
  /** For data files: where the last accepted record ended (records must never go backwards). */
  private end = 0;

  constructor(readonly path: string, private seed: number, expect: { link: string; migration: string; from: 'a' | 'b' }) {
    this.fd = openSync(path, constants.O_RDONLY | constants.O_NOFOLLOW);
    try {
      // The writer creates the file, then writes its header: a reader that comes in between
      // sees a short file. That is waited for (IncompleteHeader: the caller tries again),
      // not refused: refusing it would turn the peer's own file away for good.
      const fixed = this.readAt(0, 16);
      // The writer creates the file, then writes its header: a reader may come in between.
      const magicSoFar = fixed.subarray(0, Math.min(fixed.length, 8));
      if (fixed.length < 16 && magicSoFar.equals(FILE_MAGIC.subarray(0, magicSoFar.length))) throw new IncompleteHeader(`link: ${path} has no complete header yet`);
      if (fixed.length < 16 || !fixed.subarray(0, 8).equals(FILE_MAGIC)) throw new LinkError('MISMATCH', `link: ${path} is not a vmshift link file`);
      const len = fixed.readUInt32BE(8);
      if (len > MAX_PAYLOAD) throw new LinkError('MISMATCH', `link: ${path} has a header of ${len} bytes`);
      const json = this.readAt(16, len);
      if (json.length < len) throw new IncompleteHeader(`link: ${path} has a truncated header`);
      if (crc32(json, seed) !== fixed.readUInt32BE(12)) throw new LinkError('MISMATCH', `link: ${path} belongs to another link or migration (header checksum)`);
      const h = JSON.parse(json.toString('utf8')) as FileHeader;
      if (h.link !== expect.link || h.migration !== expect.migration || h.from !== expect.from) {
        throw new LinkError('MISMATCH', `link: ${path} was written by link ${h.link} (migration ${h.migration}, side ${h.from}), expected ${expect.link} (${expect.migration}, side ${expect.from})`);
      }
      this.header = h;
      this.pos = 16 + len;
    } catch (e) {
      closeSync(this.fd);
      throw e;
    }
  }

  /**
   * Every complete, verified record appended since the last call. A data record starting
   * beyond `limit` (what the reader has so far) stays in the file for a later call.
   */
  readNew(limit = Infinity): Record[] {
    const out: Record[] = [];
    if (this.broken) return out;
    const size = fstatSync(this.fd).size;
    while (size - this.pos >= REC_HEADER) {
      const h = this.readAt(this.pos, REC_HEADER);
      const length = h.readUInt32BE(8);
      if (h.readUInt32BE(0) !== REC_MAGIC || length > MAX_PAYLOAD) return this.fail(out, `bad record header at ${this.pos}`);
      if (size - this.pos < REC_HEADER + length) break; // the writer has not finished it (or never will)
      const payload = this.readAt(this.pos + REC_HEADER, length);
      if (checksum(h.subarray(0, 20), payload, this.seed) !== h.readUInt32BE(20)) {
        return this.fail(out, `record at ${this.pos} (offset ${h.readBigUInt64BE(12)}, ${length} bytes) failed its checksum`);
      }
      const r: Record = { kind: h.readUInt8(4) as RecKind, flags: h.readUInt8(5), stream: h.readUInt16BE(6), offset: Number(h.readBigUInt64BE(12)), payload };
      if (this.header.kind === 'data') {
        if (r.stream !== this.header.stream || (r.kind !== Rec.DATA && r.kind !== Rec.FIN)) return this.fail(out, `record at ${this.pos} is not for stream ${this.header.stream}`);
        if (r.offset < this.end) return this.fail(out, `record at ${this.pos} goes back to offset ${r.offset} after ${this.end} (reordered)`);
        if (r.offset > Math.max(limit, this.end)) break;
        this.end = r.offset + length;
      }
      out.push(r);
      this.pos += REC_HEADER + length;
    }
    return out;
  }

  private fail(out: Record[], why: string): Record[] {
    this.broken = `${this.path}: ${why}`;
    return out;
  }

  private readAt(pos: number, n: number): Buffer {
    const b = Buffer.allocUnsafe(n);
    let got = 0;
    while (got < n) {
      const r = readSync(this.fd, b, got, n - got, pos + got);
      if (r === 0) break;
      got += r;
    }
    return b.subarray(0, got);
  }

  close(): void {
    if (this.fd >= 0) closeSync(this.fd);
    this.fd = -1;
  }
}
