// A reader of QEMU 7.2's migration stream (migration/savevm.c, migration/ram.c), written as
// one explicit state table. It finds the `ram` section's page records so that the memory
// cache (src/relay/cache/) can replace their 4 KiB payloads; everything else is handed on as
// raw bytes, untouched.
//
//   header       be32 "QEVM", be32 3
//   config       0x07, be32 len, machine name, then subsections (0x05, u8 len, name, be32
//                version, fields): target-page-bits (be32), capabilities (be32 n, n x u8 len +
//                name), uuid (16 bytes)
//   section      u8 type: START 0x01 / FULL 0x04 (be32 id, u8 len, idstr, be32 instance, be32
//                version), PART 0x02 / END 0x03 (be32 id), COMMAND 0x08 (be16 cmd, be16 len,
//                data), EOF 0x00; a START/PART/END/FULL is followed by a FOOTER 0x7e + be32 id
//   ram records  be64 offset|flags (low 12 bits): ZERO 0x02 (+1 byte), MEM_SIZE 0x04 (entries u8
//                len, idstr, be64 length until the total is reached), PAGE 0x08 (+4096 bytes),
//                EOS 0x10 (end of this section's records), CONTINUE 0x20 (else u8 len + idstr of
//                the RAMBlock, which carries across sections), XBZRLE 0x40 (u8 0x01, be16 len,
//                data), COMPRESS_PAGE 0x100 (be32 len, zlib data)
//
// Device sections carry no length: from the first section that is not `ram` (or anything the
// table does not expect) to the end of the stream, the reader passes bytes through and says
// why once (`passThroughReason`). Whatever it concludes, its tokens concatenated are exactly
// the bytes it was given: a wrong guess costs only compression, never a byte.

export const PAGE_SIZE = 4096;
/** Held bytes are joined with this much of the next chunk first (a page record and more). */
const BRIDGE = PAGE_SIZE + 1024;

export const RAM_FLAG = {
  ZERO: 0x02, MEM_SIZE: 0x04, PAGE: 0x08, EOS: 0x10, CONTINUE: 0x20, XBZRLE: 0x40, COMPRESS_PAGE: 0x100,
} as const;
const FLAG_MASK = 0xfff; // TARGET_PAGE_MASK's complement for 4 KiB target pages
const KNOWN_FLAGS = 0x02 | 0x04 | 0x08 | 0x10 | 0x20 | 0x40 | 0x100;

export const SECTION = {
  EOF: 0x00, START: 0x01, PART: 0x02, END: 0x03, FULL: 0x04, SUBSECTION: 0x05, VMDESCRIPTION: 0x06, CONFIGURATION: 0x07, COMMAND: 0x08, FOOTER: 0x7e,
} as const;

export type Token =
  /** Bytes to send as they are. */
  | { kind: 'raw'; data: Buffer }
  /** A PAGE record: `header` (be64 + optional idstr) then the page's 4096 bytes. */
  | { kind: 'page'; header: Buffer; data: Buffer; block: string; offset: number }
  /** A record that changes a page without carrying it (ZERO, XBZRLE, COMPRESS_PAGE): a copy kept of it is stale. */
  | { kind: 'touch'; block: string; offset: number };

/**
 * The states, and how many bytes each needs before it can decide. `need` may depend on bytes
 * already read (a length field): those states read in two steps.
 */
type State =
  | 'header' | 'config-len' | 'config-name' | 'config-sub' | 'sub-name-len' | 'sub-name' | 'sub-body'
  | 'section-type' | 'section-id' | 'section-idstr-len' | 'section-idstr' | 'section-ids'
  | 'command' | 'command-data' | 'footer'
  | 'ram-record' | 'ram-idstr-len' | 'ram-idstr' | 'ram-zero' | 'ram-page' | 'ram-xbzrle-hdr' | 'ram-xbzrle-data'
  | 'ram-compress-len' | 'ram-compress-data' | 'memsize-len' | 'memsize-entry'
  | 'pass';

export class StreamReader {
  private state: State = 'header';
  private buf: Buffer = Buffer.alloc(0);
  private pos = 0;
  /** Start of the bytes not yet emitted as a token. */
  private mark = 0;
  private out: Token[] = [];
  // What the table carries between states.
  private n = 0; // a length read by the previous state
  private sectionType = 0;
  private sectionId = 0;
  private ramSectionId = -1;
  private block: string | null = null;
  private recStart = 0;
  private recFlags = 0;
  private recOffset = 0;
  private memTotal = 0;
  private subName = '';
  private configNoted = false;
  passThroughReason: string | null = null;
  /**
   * Follow the records without handing out tokens (the cache passes whole chunks through and
   * only needs to know where the next record starts): no token objects, no views.
   */
  skim = false;
  /** Skimming, a page cut by the chunk's end: how many of its bytes the next chunks still carry. */
  private skipLeft = 0;
  /** Parsing held bytes joined with the start of a chunk: the joined buffer's end is not the chunk's. */
  private bridging = false;
  /** Counts for the log and tests. */
  readonly seen = { pages: 0, zero: 0, xbzrle: 0, compressed: 0, ramSections: 0 };

  /** The bytes given but not yet handed out as tokens (an unfinished record): a view. */
  get pending(): Buffer { return this.buf; }

  /** Feed bytes; returns the tokens they complete (bytes of an unfinished record are held). */
  push(chunk: Buffer): Token[] {
    if (this.state === 'pass') return chunk.length && !this.skim ? [{ kind: 'raw', data: chunk }] : [];
    this.out = [];
    if (this.skipLeft) {
      // The rest of a page skimmed over: no join; its bytes go on raw if skimming stopped meanwhile.
      const n = Math.min(this.skipLeft, chunk.length);
      if (!this.skim && n) this.out.push({ kind: 'raw', data: chunk.subarray(0, n) });
      this.skipLeft -= n;
      chunk = chunk.subarray(n);
      if (this.skipLeft || !chunk.length) return this.takeOut();
    }
    const held = this.buf.length;
    if (held && chunk.length > BRIDGE) {
      // Bytes of an unfinished record are held: join them with only the chunk's first BRIDGE
      // bytes (enough to finish any record but a long device field), not the whole chunk (a copy
      // of every chunk was ~10% of the encoder's CPU). Once the held bytes are all emitted, the
      // rest is parsed in the chunk itself.
      this.buf = Buffer.concat([this.buf, chunk.subarray(0, BRIDGE)]);
      this.bridging = true;
      const used = this.run();
      this.bridging = false;
      this.buf = used >= held ? chunk.subarray(used - held) : Buffer.concat([this.buf, chunk.subarray(BRIDGE)]);
    } else {
      this.buf = held ? Buffer.concat([this.buf, chunk]) : chunk;
    }
    this.run();
    return this.takeOut();
  }

  private takeOut(): Token[] {
    const out = this.out;
    this.out = [];
    return out;
  }

  /**
   * Steps through `buf`, emits what is complete, and keeps only the rest (a view: tokens and
   * the rest share the caller's chunk); returns how many bytes of `buf` were emitted.
   */
  private run(): number {
    while (this.step()) { /* next state */ }
    if ((this.state as State) === 'pass') this.flushRaw(this.buf.length);
    else if (!this.inRecord()) this.flushRaw(this.pos);
    const used = this.mark;
    this.buf = this.buf.subarray(this.mark);
    this.pos -= this.mark;
    this.recStart -= this.mark;
    this.mark = 0;
    return used;
  }

  /** The stream ended: whatever is held goes out raw. */
  end(): Token[] {
    this.out = [];
    this.flushRaw(this.buf.length);
    if (this.state !== 'pass' && this.state !== 'section-type' && this.buf.length) this.note(`the stream ended inside state ${this.state}`);
    if (this.skipLeft) this.note('the stream ended inside a page');
    this.skipLeft = 0;
    this.buf = Buffer.alloc(0);
    this.pos = this.mark = 0;
    const out = this.out;
    this.out = [];
    return out;
  }

  /** Record bytes are held until the record is complete (so a page comes out whole). */
  private inRecord(): boolean {
    return this.state.startsWith('ram-') && this.state !== 'ram-record';
  }

  private flushRaw(to: number): void {
    if (to > this.mark && !this.skim) this.out.push({ kind: 'raw', data: this.buf.subarray(this.mark, to) });
    this.mark = to;
  }

  private note(why: string): void {
    if (!this.passThroughReason) this.passThroughReason = why;
  }

  /** From here to the end every byte goes on raw; `why` is null at the normal end (EOF, device state). */
  private passThrough(why: string | null): false {
    if (why) this.note(why);
    this.state = 'pass';
    return false;
  }

  private avail(n: number): boolean {
    return this.buf.length - this.pos >= n;
  }

  /** One transition; false when more bytes are needed (or the reader gave up parsing). */
  private step(): boolean {
    const b = this.buf;
    switch (this.state) {
      case 'header': {
        if (!this.avail(8)) return false;
        if (b.readUInt32BE(this.pos) !== 0x5145564d || b.readUInt32BE(this.pos + 4) !== 3) return this.passThrough('not a QEVM version 3 stream');
        this.pos += 8;
        this.state = 'section-type';
        return true;
      }
      case 'config-len': {
        if (!this.avail(4)) return false;
        this.n = b.readUInt32BE(this.pos);
        this.pos += 4;
        if (this.n > 256) return this.passThrough(`a configuration name of ${this.n} bytes`);
        this.state = 'config-name';
        return true;
      }
      case 'config-name': {
        if (!this.avail(this.n)) return false;
        this.pos += this.n;
        this.state = 'config-sub';
        return true;
      }
      case 'config-sub': {
        if (!this.avail(1)) return false;
        if (b[this.pos] !== SECTION.SUBSECTION) { this.state = 'section-type'; return true; }
        this.pos += 1;
        this.state = 'sub-name-len';
        return true;
      }
      case 'sub-name-len': {
        if (!this.avail(1)) return false;
        this.n = b[this.pos]!;
        this.pos += 1;
        this.state = 'sub-name';
        return true;
      }
      case 'sub-name': {
        if (!this.avail(this.n + 4)) return false;
        this.subName = b.toString('latin1', this.pos, this.pos + this.n);
        this.pos += this.n + 4; // name, be32 version
        this.state = 'sub-body';
        return true;
      }
      case 'sub-body': {
        // The configuration's subsections in 7.2, each with fields of a known size.
        if (this.subName === 'configuration/target-page-bits') {
          if (!this.avail(4)) return false;
          if (b.readUInt32BE(this.pos) !== 12) return this.passThrough(`target page bits ${b.readUInt32BE(this.pos)}, not 12`);
          this.pos += 4;
        } else if (this.subName === 'configuration/uuid') {
          if (!this.avail(16)) return false;
          this.pos += 16;
        } else if (this.subName === 'configuration/capabilities') {
          if (!this.avail(4)) return false;
          const count = b.readUInt32BE(this.pos);
          let p = this.pos + 4;
          for (let i = 0; i < count; i++) {
            if (b.length - p < 1) return false;
            p += 1 + b[p]!;
          }
          if (p > b.length) return false;
          this.pos = p;
        } else return this.passThrough(`an unknown configuration subsection "${this.subName}"`);
        this.state = 'config-sub';
        return true;
      }
      case 'section-type': {
        if (!this.avail(1)) return false;
        const t = b[this.pos]!;
        if (t === SECTION.CONFIGURATION && !this.configNoted) {
          this.configNoted = true;
          this.pos += 1;
          this.state = 'config-len';
          return true;
        }
        if (t === SECTION.START || t === SECTION.FULL || t === SECTION.PART || t === SECTION.END) {
          this.sectionType = t;
          this.pos += 1;
          this.state = 'section-id';
          return true;
        }
        if (t === SECTION.COMMAND) { this.pos += 1; this.state = 'command'; return true; }
        if (t === SECTION.EOF) return this.passThrough(null); // the end: the vmdesc JSON follows
        return this.passThrough(`section type 0x${t.toString(16)} where a section was expected`);
      }
      case 'section-id': {
        if (!this.avail(4)) return false;
        this.sectionId = b.readUInt32BE(this.pos);
        this.pos += 4;
        if (this.sectionType === SECTION.START || this.sectionType === SECTION.FULL) { this.state = 'section-idstr-len'; return true; }
        if (this.sectionId !== this.ramSectionId) return this.passThrough(`section ${this.sectionId} is not the ram section`);
        return this.startRam();
      }
      case 'section-idstr-len': {
        if (!this.avail(1)) return false;
        this.n = b[this.pos]!;
        this.pos += 1;
        this.state = 'section-idstr';
        return true;
      }
      case 'section-idstr': {
        if (!this.avail(this.n + 8)) return false;
        const idstr = b.toString('latin1', this.pos, this.pos + this.n);
        this.pos += this.n + 8; // idstr, be32 instance, be32 version
        if (this.sectionType === SECTION.FULL) return this.passThrough(idstr === 'ram' ? 'a FULL ram section' : null); // device state: no lengths
        if (idstr !== 'ram') return this.passThrough(`an iterable section "${idstr}" the reader does not know`);
        this.ramSectionId = this.sectionId;
        return this.startRam();
      }
      case 'command': {
        if (!this.avail(4)) return false;
        const cmd = b.readUInt16BE(this.pos);
        this.n = b.readUInt16BE(this.pos + 2);
        this.pos += 4;
        // PACKAGED (6) wraps a whole stream (postcopy): not followed.
        if (cmd === 6 || cmd === 0 || cmd > 10) return this.passThrough(`migration command ${cmd}`);
        this.state = 'command-data';
        return true;
      }
      case 'command-data': {
        if (!this.avail(this.n)) return false;
        this.pos += this.n;
        this.state = 'section-type';
        return true;
      }
      case 'footer': {
        if (!this.avail(1)) return false;
        if (b[this.pos] !== SECTION.FOOTER) { this.state = 'section-type'; return true; } // machine types before 2.4: no footers
        if (!this.avail(5)) return false;
        if (b.readUInt32BE(this.pos + 1) !== this.sectionId) return this.passThrough(`a footer for section ${b.readUInt32BE(this.pos + 1)} closing section ${this.sectionId}`);
        this.pos += 5;
        this.state = 'section-type';
        return true;
      }
      case 'ram-record': {
        if (this.skim) {
          // Skimming: a run of whole PAGE records of the current block is stepped over in one loop
          // (two table steps a page cost ~0.1-0.2 s of CPU per GiB).
          const whole = 8 + PAGE_SIZE, flags = RAM_FLAG.PAGE | RAM_FLAG.CONTINUE;
          while (b.length - this.pos >= whole && this.block !== null && (b.readUInt32BE(this.pos + 4) & FLAG_MASK) === flags) { this.pos += whole; this.seen.pages++; }
        }
        if (!this.avail(8)) return false;
        this.flushRaw(this.pos);
        this.recStart = this.pos;
        const hi = b.readUInt32BE(this.pos);
        const lo = b.readUInt32BE(this.pos + 4);
        this.recFlags = lo & FLAG_MASK;
        this.recOffset = hi * 0x1_0000_0000 + (lo - this.recFlags);
        this.pos += 8;
        const f = this.recFlags;
        if (f & ~KNOWN_FLAGS) return this.passThrough(`ram record flags 0x${f.toString(16)}`);
        if (f === RAM_FLAG.EOS) { this.state = 'footer'; return true; }
        if (f === RAM_FLAG.MEM_SIZE) { this.memTotal = this.recOffset; this.state = this.memTotal ? 'memsize-len' : 'ram-record'; return true; }
        const kind = f & ~RAM_FLAG.CONTINUE;
        if (kind !== RAM_FLAG.ZERO && kind !== RAM_FLAG.PAGE && kind !== RAM_FLAG.XBZRLE && kind !== RAM_FLAG.COMPRESS_PAGE) return this.passThrough(`ram record flags 0x${f.toString(16)}`);
        if (f & RAM_FLAG.CONTINUE) {
          if (this.block === null) return this.passThrough('a CONTINUE ram record before any RAMBlock was named');
          return this.recordBody();
        }
        this.state = 'ram-idstr-len';
        return true;
      }
      case 'ram-idstr-len': {
        if (!this.avail(1)) return false;
        this.n = b[this.pos]!;
        this.pos += 1;
        this.state = 'ram-idstr';
        return true;
      }
      case 'ram-idstr': {
        if (!this.avail(this.n)) return false;
        this.block = b.toString('latin1', this.pos, this.pos + this.n);
        this.pos += this.n;
        return this.recordBody();
      }
      case 'ram-zero': {
        if (!this.avail(1)) return false;
        this.pos += 1;
        this.seen.zero++;
        return this.recordDone();
      }
      case 'ram-page': {
        if (this.skim && !this.bridging && !this.avail(PAGE_SIZE)) {
          // Skimming, the page is cut by the chunk's end: skip its rest as it comes instead of
          // holding the record to join it (the joins were half of what skimming cost).
          this.skipLeft = PAGE_SIZE - (b.length - this.pos);
          this.pos = b.length;
          this.mark = this.pos;
          this.seen.pages++;
          this.state = 'ram-record';
          return false;
        }
        if (!this.avail(PAGE_SIZE)) return false;
        if (!this.skim) this.out.push({ kind: 'page', header: b.subarray(this.recStart, this.pos), data: b.subarray(this.pos, this.pos + PAGE_SIZE), block: this.block!, offset: this.recOffset });
        this.pos += PAGE_SIZE;
        this.seen.pages++;
        this.mark = this.pos;
        this.state = 'ram-record';
        return true;
      }
      case 'ram-xbzrle-hdr': {
        if (!this.avail(3)) return false;
        if (b[this.pos] !== 0x01) return this.passThrough(`XBZRLE encoding flag 0x${b[this.pos]!.toString(16)}`);
        this.n = b.readUInt16BE(this.pos + 1);
        if (this.n > PAGE_SIZE) return this.passThrough(`an XBZRLE delta of ${this.n} bytes`);
        this.pos += 3;
        this.state = 'ram-xbzrle-data';
        return true;
      }
      case 'ram-xbzrle-data': {
        if (!this.avail(this.n)) return false;
        this.pos += this.n;
        this.seen.xbzrle++;
        return this.recordDone();
      }
      case 'ram-compress-len': {
        if (!this.avail(4)) return false;
        this.n = b.readUInt32BE(this.pos);
        if (this.n > PAGE_SIZE + 1024) return this.passThrough(`a compressed page of ${this.n} bytes`);
        this.pos += 4;
        this.state = 'ram-compress-data';
        return true;
      }
      case 'ram-compress-data': {
        if (!this.avail(this.n)) return false;
        this.pos += this.n;
        this.seen.compressed++;
        return this.recordDone();
      }
      case 'memsize-len': {
        if (!this.avail(1)) return false;
        this.n = b[this.pos]!;
        this.state = 'memsize-entry';
        return true;
      }
      case 'memsize-entry': {
        if (!this.avail(1 + this.n + 8)) return false;
        const hi = b.readUInt32BE(this.pos + 1 + this.n);
        const lo = b.readUInt32BE(this.pos + 1 + this.n + 4);
        const length = hi * 0x1_0000_0000 + lo;
        this.pos += 1 + this.n + 8;
        // Postcopy with huge pages and x-ignore-shared add fields here; a sum that does not
        // come out exactly means the reader guessed wrong.
        if (length > this.memTotal) return this.passThrough('RAMBlock sizes that do not add up to MEM_SIZE (postcopy or x-ignore-shared fields?)');
        this.memTotal -= length;
        this.state = this.memTotal ? 'memsize-len' : 'ram-record';
        return true;
      }
      case 'pass':
        return false;
    }
    return false;
  }

  private startRam(): boolean {
    this.seen.ramSections++;
    this.state = 'ram-record';
    return true;
  }

  private recordBody(): boolean {
    const kind = this.recFlags & ~RAM_FLAG.CONTINUE;
    this.state = kind === RAM_FLAG.ZERO ? 'ram-zero' : kind === RAM_FLAG.PAGE ? 'ram-page' : kind === RAM_FLAG.XBZRLE ? 'ram-xbzrle-hdr' : 'ram-compress-len';
    return true;
  }

  /** A record that changed a page without carrying it whole: emit it raw and say the page is touched. */
  private recordDone(): boolean {
    this.flushRaw(this.pos);
    if (!this.skim) this.out.push({ kind: 'touch', block: this.block!, offset: this.recOffset });
    this.state = 'ram-record';
    return true;
  }
}
