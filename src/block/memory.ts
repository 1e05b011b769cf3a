// A block device held in memory, allocated lazily in fixed-size chunks. Chunks never written
// (or trimmed / zeroed away whole) are holes: they read as zeroes and block status reports
// them as `hole + zero`, so a MemoryDevice behaves like a sparse file. Useful in tests and as
// a real scratch device; its size can exceed RAM as long as little of it is written.
import { BlockError, DEFAULT_CAPS, checkRange } from './device.ts';
import type { BlockDevice, DeviceCaps, Extent, WriteOpts, ZeroOpts } from './device.ts';

export interface MemoryDeviceOptions {
  readOnly?: boolean;
  name?: string;
  /** Allocation granularity in bytes (a power of two); default 64 KiB. */
  chunkSize?: number;
  /** Override individual capabilities (e.g. to test what a server advertises). */
  caps?: Partial<DeviceCaps>;
}

export class MemoryDevice implements BlockDevice {
  readonly size: number;
  readonly caps: DeviceCaps;
  readonly name: string;
  private readonly chunkSize: number;
  private readonly chunks = new Map<number, Buffer>();
  private closed = false;

  constructor(size: number, opts: MemoryDeviceOptions = {}) {
    if (!Number.isSafeInteger(size) || size < 0) throw new BlockError('EINVAL', `memory device: bad size ${size}`);
    const chunkSize = opts.chunkSize ?? 64 * 1024;
    if (chunkSize < 512 || (chunkSize & (chunkSize - 1)) !== 0) throw new BlockError('EINVAL', `memory device: chunk size ${chunkSize} is not a power of two >= 512`);
    this.size = size;
    this.chunkSize = chunkSize;
    this.name = opts.name ?? `memory:${size}`;
    this.caps = { ...DEFAULT_CAPS, ...opts.caps, readOnly: opts.readOnly ?? opts.caps?.readOnly ?? false };
  }

  /** A device whose content is a copy of `data` (all of it allocated). */
  static from(data: Buffer, opts: MemoryDeviceOptions = {}): MemoryDevice {
    const dev = new MemoryDevice(data.length, opts);
    dev.copyIn(0, data); // copyIn bypasses the read-only check on purpose
    return dev;
  }

  /** Bytes held in allocated chunks (what a sparse file's `du` would show). */
  get allocatedBytes(): number {
    return this.chunks.size * this.chunkSize;
  }

  async read(offset: number, length: number, into?: Buffer): Promise<Buffer> {
    this.check(offset, length);
    const out = into?.length === length ? into.fill(0) : Buffer.alloc(length); // holes stay zero
    this.forEachPiece(offset, length, (index, start, len, pos) => {
      const chunk = this.chunks.get(index);
      if (chunk) chunk.copy(out, pos, start, start + len);
    });
    return out;
  }

  async write(offset: number, data: Buffer, _opts?: WriteOpts): Promise<void> {
    this.checkWritable(offset, data.length);
    this.copyIn(offset, data);
  }

  async writeZeroes(offset: number, length: number, opts: ZeroOpts = {}): Promise<void> {
    this.checkWritable(offset, length);
    this.zeroRange(offset, length, opts.noHole === true);
  }

  async trim(offset: number, length: number, _opts?: WriteOpts): Promise<void> {
    this.checkWritable(offset, length);
    // Trimmed data reads back as zeroes here; the protocol allows any content after a trim.
    this.zeroRange(offset, length, false);
  }

  async flush(): Promise<void> {
    this.check(0, 0);
  }

  async blockStatus(offset: number, length: number): Promise<Extent[]> {
    this.check(offset, length);
    const extents: Extent[] = [];
    this.forEachPiece(offset, length, (index, _start, len, pos) => {
      const hole = !this.chunks.has(index);
      const last = extents[extents.length - 1];
      if (last && last.hole === hole) last.length += len;
      else extents.push({ offset: offset + pos, length: len, hole, zero: hole });
    });
    return extents;
  }

  async cache(offset: number, length: number): Promise<void> {
    this.check(offset, length);
  }

  async close(): Promise<void> {
    this.closed = true;
    this.chunks.clear();
  }

  private copyIn(offset: number, data: Buffer): void {
    this.forEachPiece(offset, data.length, (index, start, len, pos) => {
      let chunk = this.chunks.get(index);
      if (!chunk) {
        chunk = Buffer.alloc(this.chunkSize);
        this.chunks.set(index, chunk);
      }
      data.copy(chunk, start, pos, pos + len);
    });
  }

  /** Whole chunks become holes (unless `allocate`); partial chunks are zero-filled. */
  private zeroRange(offset: number, length: number, allocate: boolean): void {
    this.forEachPiece(offset, length, (index, start, len) => {
      const chunk = this.chunks.get(index);
      if (len === this.chunkSize && !allocate) this.chunks.delete(index);
      else if (chunk) chunk.fill(0, start, start + len);
      else if (allocate) this.chunks.set(index, Buffer.alloc(this.chunkSize));
    });
  }

  /** Calls fn for each chunk the range touches: chunk index, offset in chunk, length, offset in range. */
  private forEachPiece(offset: number, length: number, fn: (index: number, start: number, len: number, pos: number) => void): void {
    let pos = 0;
    while (pos < length) {
      const abs = offset + pos;
      const index = Math.floor(abs / this.chunkSize);
      const start = abs - index * this.chunkSize;
      const len = Math.min(this.chunkSize - start, length - pos);
      fn(index, start, len, pos);
      pos += len;
    }
  }

  private check(offset: number, length: number): void {
    if (this.closed) throw new BlockError('ESHUTDOWN', `${this.name}: device is closed`);
    checkRange(this, offset, length);
  }

  private checkWritable(offset: number, length: number): void {
    this.check(offset, length);
    if (this.caps.readOnly) throw new BlockError('EPERM', `${this.name}: device is read-only`);
  }
}
