// The source half of the memory cache: QEMU's migration stream in, the cache's frames
// (./frames.ts) out. A page QEMU sends again goes as a delta against the copy both relays
// keep (XOR, lz4: pages that changed a little become a few dozen bytes), a page sent for the
// first time goes lz4 compressed, everything else (ZERO records, device state, the reader's
// pass-through) goes as it is. Which pages are kept is the FITO list's call (./fito.ts), within
// the memory budget. The decoder keeps the same slots because only NEW and DELTA frames name
// them: the source alone decides, the destination follows.
//
// Turning itself down: compressing costs CPU the guest and QEMU want too, and it only pays
// while the link is the bottleneck (./governor.ts decides from the encoder's and the link's
// measured speeds). While it is down, pages go on raw and leave the cache. Down for good (the
// link kept up with the raw stream for a while: `through`), whole chunks go on as THRU frames:
// the cache is emptied at once (every copy would go stale), and the reader only skims the
// records, so that compressing can start again at the next record if the link becomes the
// limit (the bytes it still holds then were already sent: `ahead`).
import { compressSync } from 'lz4-napi';
import { checksum } from '../../link/checksum.ts';
import { PAGE_SIZE, StreamReader, type Token } from '../../memstream/reader.ts';
import { FitoList, type FitoSample } from './fito.ts';
import { FRAME, NO_SLOT, hello, pageFrame, rawFrame, thruHead } from './frames.ts';
import { Slots } from './slots.ts';
import { Governor, type GovernorWindow } from './governor.ts';

/** A page as `type` holding `compressed` when that saves bytes, else the page itself (raw, NEW). */
function packed(type: number, slot: number, header: Buffer, compressed: Buffer, page: Buffer, crc: number): Buffer {
  return compressed.length < PAGE_SIZE
    ? pageFrame(type, slot, header, compressed, false, crc)
    : pageFrame(FRAME.NEW, slot, header, page, true, crc);
}


export interface EncoderOptions {
  /** Memory for page copies, bytes (each side keeps this much at most). */
  budget: number;
  /** Bytes written but not yet taken by the link; absent = always compress. */
  backlog?: () => number;
  /** Milliseconds the link has held its writer, in all (the link stream's `heldMs`). */
  heldMs?: () => number;
  /** FITO tuning (tests). */
  adjustEvery?: number;
  /** Start compressing (default) or passing pages through raw (benchmarks, tests of the switch). */
  compress?: boolean;
}

/** compress: pages as deltas or lz4; raw: pages raw, records followed; through: whole chunks unparsed. */
export type EncoderMode = 'compress' | 'raw' | 'through';

export interface CacheStats {
  /** Bytes QEMU sent, bytes put on the link. */
  bytesIn: number;
  bytesOut: number;
  saved: number;
  pages: number;
  hits: number;
  misses: number;
  hitRate: number;
  deltaBytes: number;
  newBytes: number;
  /** Pages sent raw because the link kept up (the cache turned down). */
  bypassedPages: number;
  /** QEMU bytes passed through unparsed in THRU frames (turned down for good). */
  throughBytes: number;
  /** New pages sent without a copy kept: the budget was outgrown (FitoList.outgrown). */
  notKept: number;
  modeChanges: number;
  /** What the governor measured (bytes/s), null when not measured. */
  encoderRate: number | null;
  linkRate: number | null;
  entries: number;
  target: number;
  budgetEntries: number;
  history: FitoSample[];
  passThrough: string | null;
  reader: StreamReader['seen'];
  /** Milliseconds the relay spent in the encoder. */
  encodeMs: number;
  /** The governor's windows: what it saw and chose (the last ones). */
  windows: GovernorWindow[];
}

export class CacheEncoder {
  private reader = new StreamReader();
  private fito: FitoList<number, number>;
  private blocks = new Map<string, number>();
  private copies = new Slots();
  private free: number[] = [];
  private nextSlot = 0;
  private readonly slots: number;
  private scratch = Buffer.alloc(PAGE_SIZE);
  private raw: Buffer[] = [];
  private out: Buffer[] = [];
  private mode: EncoderMode = 'compress';
  /** QEMU bytes already on the link (THRU frames) that the reader has not handed out as tokens. */
  private ahead = 0;
  private governor: Governor | null;
  private started = false;
  /** Milliseconds spent encoding (and joining the output), counted by the relay's stream. */
  ms = 0;
  private readonly s = { bytesIn: 0, bytesOut: 0, pages: 0, deltaBytes: 0, newBytes: 0, bypassedPages: 0, modeChanges: 0, notKept: 0, throughBytes: 0 };

  constructor(o: EncoderOptions) {
    this.slots = Math.max(1, Math.floor(o.budget / PAGE_SIZE));
    this.fito = new FitoList<number, number>({ maxEntries: this.slots, adjustEvery: o.adjustEvery }, (_k, slot) => this.free.push(slot));
    this.governor = o.backlog ? new Governor(o.backlog, undefined, undefined, o.heldMs) : null;
    if (o.compress === false) this.mode = 'raw';
  }

  /** Turn compression on or off from the next page on (without a governor: benchmarks, tests). */
  setCompressing(on: boolean): void {
    this.setMode(on ? 'compress' : 'raw');
  }

  /** Change the mode from the next chunk on (without a governor: benchmarks, tests). */
  setMode(m: EncoderMode): void {
    if (m === this.mode) return;
    this.s.modeChanges++;
    this.switchTo(m);
  }

  private switchTo(m: EncoderMode): void {
    if (m === 'through') {
      // Every copy goes stale from here: the records are no longer followed page by page.
      for (const slot of this.fito.clear()) this.free.push(slot);
      this.flushRaw();
      // What the reader holds (an unfinished record) goes first, then whole chunks; the part of
      // it already sent (back from THRU frames only a moment ago) not again.
      this.thru(this.reader.pending.subarray(this.ahead));
      this.ahead = 0;
    } else if (this.mode === 'through') {
      // Back to following records: the reader's held bytes are on the link already.
      this.ahead = this.reader.pending.length;
    }
    this.reader.skim = m === 'through';
    this.mode = m;
  }

  private thru(b: Buffer): void {
    if (!b.length) return;
    this.out.push(thruHead(b.length), b);
  }

  /** Frames for the next bytes of QEMU's stream (the hello first). */
  encode(chunk: Buffer): Buffer[] {
    this.s.bytesIn += chunk.length;
    if (!this.started) { this.started = true; this.out.push(hello(this.slots, PAGE_SIZE)); }
    const t0 = performance.now();
    if (this.mode === 'through') {
      this.s.throughBytes += chunk.length;
      this.thru(chunk);
      this.reader.push(chunk); // skims: no tokens, only where the records are
    } else for (const t of this.reader.push(chunk)) this.token(t);
    const out = this.take();
    if (this.governor) {
      let n = 0;
      for (const b of out) n += b.length;
      const compress = this.governor.account(chunk.length, n, performance.now() - t0);
      const next: EncoderMode = compress ? 'compress' : this.governor.through ? 'through' : 'raw';
      if (next !== this.mode) this.switchTo(next);
      this.s.modeChanges = this.governor.changes;
    }
    return out;
  }

  /** The stream ended: what the reader held goes out raw. */
  finish(): Buffer[] {
    if (!this.started) { this.started = true; this.out.push(hello(this.slots, PAGE_SIZE)); }
    const rest = this.reader.end();
    if (this.mode !== 'through') for (const t of rest) this.token(t);
    return this.take();
  }

  private take(): Buffer[] {
    this.flushRaw();
    const out = this.out;
    this.out = [];
    for (const b of out) this.s.bytesOut += b.length;
    return out;
  }

  private flushRaw(): void {
    if (!this.raw.length) return;
    for (const b of rawFrame(this.raw)) this.out.push(b);
    this.raw = [];
  }

  private key(block: string, offset: number): number {
    let id = this.blocks.get(block);
    if (id === undefined) { id = this.blocks.size; this.blocks.set(block, id); }
    return id * 2 ** 40 + offset;
  }


  private allocSlot(): number {
    while (this.fito.full && this.fito.size > 0) this.fito.evictOldest();
    const f = this.free.pop();
    if (f !== undefined) return f;
    if (this.nextSlot < this.slots) return this.nextSlot++;
    this.fito.evictOldest();
    return this.free.pop()!;
  }

  /** The part of a token's bytes not yet on the link (after THRU frames); null when all are. */
  private unsent(t: Token & { kind: 'raw' | 'page' }): Buffer[] | null {
    const parts = t.kind === 'raw' ? [t.data] : [t.header, t.data];
    const out: Buffer[] = [];
    for (const p of parts) {
      const skip = Math.min(this.ahead, p.length);
      this.ahead -= skip;
      if (skip < p.length) out.push(p.subarray(skip));
    }
    return out.length ? out : null;
  }

  private token(t: Token): void {
    if (this.ahead > 0 && t.kind !== 'touch') {
      // The first bytes after THRU frames: what was sent already is left out; a page cut by
      // that point goes raw (its copy, if any, went in the clear).
      const wasPage = t.kind === 'page';
      const rest = this.unsent(t);
      if (wasPage) { this.s.pages++; this.s.bypassedPages++; }
      if (rest) this.raw.push(...rest);
      return;
    }
    if (t.kind === 'raw') { this.raw.push(t.data); return; }
    const key = this.key(t.block, t.offset);
    if (t.kind === 'touch') {
      // ZERO, XBZRLE, COMPRESS_PAGE: the page changed without us seeing it: the copy is stale.
      const slot = this.fito.remove(key);
      if (slot !== undefined) this.free.push(slot);
      return;
    }
    this.s.pages++;
    if (this.mode !== 'compress') {
      const slot = this.fito.remove(key);
      if (slot !== undefined) this.free.push(slot);
      this.s.bypassedPages++;
      this.raw.push(t.header, t.data);
      return;
    }
    this.flushRaw();
    const crc = checksum(t.header, t.data);
    const had = this.fito.touch(key);
    if (had !== undefined) {
      const copy = this.copies.get(had);
      xor(t.data, copy, this.scratch);
      const f = packed(FRAME.DELTA, had, t.header, compressSync(this.scratch), t.data, crc);
      this.s.deltaBytes += f.length;
      this.out.push(f);
      t.data.copy(copy);
      this.fito.add(key, had);
      return;
    }
    // When the pages QEMU re-sends come back later than the budget reaches, keep the copies
    // there are (they will be hit) and send this one without keeping it. (A 256 MiB guest with
    // a 64 MiB working set re-sends pages ~26000 pages later: with a 64 MiB budget, evicting
    // the oldest got 647 hits in 18129 re-sends, keeping 4959.)
    const keep = !(this.fito.outgrown && this.fito.full && !this.free.length);
    const slot = keep ? this.allocSlot() : NO_SLOT;
    const f = packed(FRAME.NEW, slot, t.header, compressSync(t.data), t.data, crc);
    this.s.newBytes += f.length;
    this.out.push(f);
    if (!keep) { this.s.notKept++; return; }
    t.data.copy(this.copies.get(slot));
    this.fito.add(key, slot);
  }

  stats(): CacheStats {
    const st = this.fito.stats;
    const lookups = st.hits + st.misses;
    return {
      ...this.s, saved: this.s.bytesIn - this.s.bytesOut, hits: st.hits, misses: st.misses,
      hitRate: lookups ? st.hits / lookups : 0, entries: this.fito.size, target: this.fito.target, budgetEntries: this.slots,
      encoderRate: this.governor?.encoderRate ?? null, linkRate: this.governor?.linkRate ?? null,
      encodeMs: Math.round(this.ms), windows: this.governor?.windows.slice() ?? [],
      history: this.fito.history.slice(), passThrough: this.reader.passThroughReason, reader: { ...this.reader.seen },
    };
  }
}

/** out = a XOR b. `b` and `out` are 4-byte aligned page buffers (slot memory, scratch); `a` may not be. */
export function xor(a: Buffer, b: Buffer, out: Buffer): void {
  a.copy(out);
  const o = new Uint32Array(out.buffer, out.byteOffset, out.length >>> 2);
  const c = new Uint32Array(b.buffer, b.byteOffset, b.length >>> 2);
  for (let i = 0; i < o.length; i++) o[i] ^= c[i]!;
}

