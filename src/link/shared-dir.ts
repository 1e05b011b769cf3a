// The shared-file carrier: a directory both hosts mount. Each side writes, per stream it
// sends, `vmshift-link-<link>.<side>.s<stream>.data` (that direction's bytes, framed) and one
// `vmshift-link-<link>.<side>.ack` (its acknowledgements and a heartbeat), and reads the
// other side's. A file that is missing, foreign or corrupt is never read past that point; a
// directory that cannot be written (missing, full, read-only) turns this side's writing off
// with one warning, and the link goes on over the network.
import { readdirSync, renameSync, rmSync, existsSync } from 'node:fs';
import { join } from 'node:path';
import { LinkError } from './errors.ts';
import { IncompleteHeader, RecordReader, RecordWriter, linkSeed, type Record } from './record-file.ts';

export interface SharedDirIdentity {
  dir: string;
  link: string;
  migration: string;
  role: 'a' | 'b';
}

export class SharedDir {
  readonly seed: number;
  private writers = new Map<number, RecordWriter>();
  private ackWriter: RecordWriter | null = null;
  private readers = new Map<string, RecordReader>();
  private refused = new Set<string>();
  /** Null while this side may write; else why it stopped. */
  writeOff: string | null = null;
  private peerRole: 'a' | 'b';

  constructor(readonly id: SharedDirIdentity, private warn: (msg: string) => void) {
    this.seed = linkSeed(id.link, id.migration);
    this.peerRole = id.role === 'a' ? 'b' : 'a';
  }

  private prefix(role: 'a' | 'b'): string {
    return `vmshift-link-${this.id.link}.${role}.`;
  }
  dataPath(role: 'a' | 'b', stream: number): string {
    return join(this.id.dir, `${this.prefix(role)}s${stream}.data`);
  }
  ackPath(role: 'a' | 'b'): string {
    return join(this.id.dir, `${this.prefix(role)}ack`);
  }

  get writable(): boolean {
    return this.writeOff === null;
  }

  /** Create our ack file; a directory we cannot use turns the carrier off (with a warning). */
  open(): void {
    this.guard(() => {
      this.ackWriter = new RecordWriter(this.ackPath(this.id.role), this.seed, { link: this.id.link, migration: this.id.migration, from: this.id.role, kind: 'ack' });
    });
  }

  /** The writer for a stream we send on, created on first use. */
  writer(stream: number, name: string): RecordWriter | null {
    if (!this.writable) return null;
    let w = this.writers.get(stream);
    if (!w) {
      this.guard(() => {
        w = new RecordWriter(this.dataPath(this.id.role, stream), this.seed, { link: this.id.link, migration: this.id.migration, from: this.id.role, kind: 'data', stream, name });
        this.writers.set(stream, w);
      });
    }
    return this.writable ? w ?? null : null;
  }

  /** Writer for the stream whether or not we may still write (reading back what we spilled). */
  existingWriter(stream: number): RecordWriter | undefined {
    return this.writers.get(stream);
  }

  appendAcks(records: Buffer[][]): void {
    const w = this.ackWriter;
    if (!w || !this.writable || !records.length) return;
    this.guard(() => { w.append(records, false); w.syncSoon(this.syncFailed); });
  }

  /**
   * Append records to a stream's file; false when the carrier is (now) off. The peer may read
   * them at once; the sync that makes them durable (and, on NFS, visible) follows in the
   * background, grouped (docs/architecture.md, "What the shared file syncs").
   */
  append(stream: number, name: string, records: Buffer[][]): number[] | null {
    const w = this.writer(stream, name);
    if (!w) return null;
    let pos: number[] | null = null;
    this.guard(() => { pos = w.append(records, false); w.syncSoon(this.syncFailed); });
    return pos;
  }

  private guard(fn: () => void): void {
    if (!this.writable) return;
    try {
      fn();
    } catch (e) {
      this.turnOff(e as NodeJS.ErrnoException);
    }
  }

  private syncFailed = (e: NodeJS.ErrnoException): void => {
    if (this.writable) this.turnOff(e);
  };

  private turnOff(err: NodeJS.ErrnoException): void {
    this.writeOff = `${err.code ?? ''} ${err.message}`.trim();
    this.warn(`link: shared directory ${this.id.dir} cannot be written (${this.writeOff}); going on over the network only`);
  }

  /**
   * New records in the peer's files: its data files (`data`, per stream, with the name from the
   * header) and its ack file. `limit(stream)` is how far that stream has been delivered: a data
   * record starting beyond it is left in the file for a later call.
   */
  readPeer(limit: (stream: number) => number): { data: Array<{ stream: number; name: string; records: Record[] }>; acks: Record[] } {
    const out = { data: [] as Array<{ stream: number; name: string; records: Record[] }>, acks: [] as Record[] };
    let names: string[];
    try {
      names = readdirSync(this.id.dir);
    } catch {
      return out; // a missing directory: nothing to read (the writer side already warned)
    }
    const prefix = this.prefix(this.peerRole);
    const paths = new Set(this.readers.keys()); // files the peer removed may still hold its last records
    for (const n of names) if (n.startsWith(prefix) && (n.endsWith('.data') || n.endsWith('.ack'))) paths.add(join(this.id.dir, n));
    for (const path of paths) {
      const r = this.reader(path);
      if (!r) continue;
      if (r.header.kind === 'ack') out.acks.push(...r.readNew());
      else {
        const stream = r.header.stream!;
        const records = r.readNew(limit(stream));
        if (r.broken && !this.refused.has(r.path)) {
          this.refused.add(r.path);
          this.warn(`link: ${r.broken}; its bytes must come from the network`);
        }
        if (records.length) out.data.push({ stream, name: r.header.name ?? `stream-${stream}`, records });
      }
    }
    return out;
  }

  private reader(path: string): RecordReader | null {
    const have = this.readers.get(path);
    if (have) return have;
    if (this.refused.has(path)) return null;
    try {
      const r = new RecordReader(path, this.seed, { link: this.id.link, migration: this.id.migration, from: this.peerRole });
      this.readers.set(path, r);
      return r;
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code === 'ENOENT' || e instanceof IncompleteHeader) return null;
      this.refused.add(path);
      this.warn(e instanceof LinkError ? `${e.message}: never read` : `link: cannot read ${path}: ${(e as Error).message}`);
      return null;
    }
  }

  /** The peer removed its ack file: it has finished (it does so only after its BYE). */
  peerFinished(): boolean {
    return this.readers.has(this.ackPath(this.peerRole)) && !existsSync(this.ackPath(this.peerRole));
  }

  /** After success: our data files go (the peer has every byte); `withAck` our ack file too. */
  removeOwn(withAck: boolean): void {
    for (const w of this.writers.values()) { w.close(); rmSync(w.path, { force: true }); }
    this.writers.clear();
    if (withAck && this.ackWriter) { this.ackWriter.close(); rmSync(this.ackWriter.path, { force: true }); this.ackWriter = null; }
    if (withAck) this.closeReaders();
  }

  /** After a failure our files stay, renamed so that no link reads them and a person sees why. */
  keepFailed(): string[] {
    const kept: string[] = [];
    const all = [...this.writers.values(), ...(this.ackWriter ? [this.ackWriter] : [])];
    for (const w of all) {
      w.close();
      const to = `${w.path}.failed`;
      try { if (existsSync(w.path)) { renameSync(w.path, to); kept.push(to); } } catch { /* directory gone */ }
    }
    this.writers.clear();
    this.ackWriter = null;
    this.closeReaders();
    return kept;
  }

  private closeReaders(): void {
    for (const r of this.readers.values()) r.close();
    this.readers.clear();
  }
}
