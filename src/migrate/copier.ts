// The copier: moves byte ranges from a source device to a destination device in large
// chunks with several in flight. It keeps thin disks thin, and a pass over a thin disk
// costs what its data and its extents cost, not its virtual size: a long range is walked
// extent by extent (block status: SEEK_DATA/SEEK_HOLE for files, NBD block status for
// exports), jumping over each hole or zero extent in one step, so only data extents are cut
// into chunks; data that reads as zeroes is still detected block by block. Zero regions are
// written as holes (write-zeroes without NO_HOLE), or not at all when the destination is
// known to be zero there (a file the job just created).
import { BlockError, errnoOf, type BlockDevice, type Extent } from '../block/device.ts';
import { FileCopyError, FileDevice } from '../block/file.ts';
import type { RateLimiter } from './limiter.ts';

export interface CopyRange {
  offset: number;
  length: number;
}

export interface CopierOptions {
  /** Bytes read and written per request (default 1 MiB). */
  chunkSize?: number;
  /** Chunks in flight (default 4; file to file always 1, see below). */
  concurrency?: number;
  /**
   * Flush the destination after this many bytes were written to it (default 64 MiB), so
   * its unwritten page cache stays small: the guest's own writes are not throttled behind a
   * huge writeback, and the flush inside the switch-over stall has little left to do.
   * File to file too, although the copy writes back as it goes (sync_file_range): that does
   * not empty the device's own cache, and the first flush of a freshly copied 1 GiB took
   * 1.3-1.5 s here. Made during the first pass, those flushes cost the guest's writes
   * ahead of the copier nothing; made at the switch-over, everything the guest wrote
   * meanwhile was copied again (1.047-1.052x the disk instead of 1.032-1.039x, measured at
   * ~120 MiB/s of Zipf writes).
   */
  flushEvery?: number;
  limiter?: RateLimiter;
  signal?: AbortSignal;
  /** Copy file to file in worker threads when both ends are files with the addon (default true). */
  native?: boolean;
}

export interface CopyRunOptions {
  /** The destination reads as zeroes in these ranges (skip zero regions entirely). */
  destIsZero?: boolean;
  /** Called synchronously before each chunk is read (the incremental tracker's cursor). */
  beforeChunk?: (start: number, end: number) => void;
  /** Chunk size for this run only (the mirror copies a small window in several pieces). */
  chunkSize?: number;
  /**
   * Charge the rate limiter without waiting; the caller waits (`limiter.ready()`) before
   * its next run. The mirror uses this so that guest writes held by its window wait only
   * for the copy itself, never for the bandwidth limit.
   */
  deferLimit?: boolean;
}

export interface CopierStats {
  /** Data bytes written to the destination. */
  dataBytes: number;
  /** Bytes written as holes/zeroes on the destination. */
  zeroBytes: number;
  /** Zero bytes not written at all (destination already zero). */
  skippedBytes: number;
  /** Bytes of ranges finished, whatever happened to them (for progress). */
  processedBytes: number;
  /**
   * Bytes of data chunks finished: the source's data extents (and short dirty ranges) read
   * and copied. Holes jumped over are not in it: the unit of the job's rate and ETA.
   */
  extentBytes: number;
}

/** A copy failure that says which side failed (the job's message depends on it). */
export class CopyError extends Error {
  constructor(
    readonly side: 'source' | 'destination',
    readonly errno: string,
    message: string,
    options?: { cause?: unknown },
  ) {
    super(message, options);
    this.name = 'CopyError';
  }
}

/** Thrown when the job's abort signal fired; carries the signal's reason. */
export function throwIfAborted(signal?: AbortSignal): void {
  if (signal?.aborted) throw signal.reason instanceof Error ? signal.reason : new Error(String(signal.reason ?? 'aborted'));
}

/** Most ranges in one file-to-file batch. */
const BATCH_RANGES = 512;

/**
 * Ranges longer than this are walked extent by extent (block status before chunking);
 * shorter ones (most dirty ranges) go straight to chunks, whose copy asks block status anyway.
 */
const PROBE_MIN = 4 * 1024 * 1024;

/** Each chunk on its own. */
async function* single(chunks: AsyncIterator<[number, number]>): AsyncGenerator<Array<[number, number]>> {
  for (let c = await chunks.next(); !c.done; c = await chunks.next()) yield [c.value];
}

/** Consecutive chunks grouped up to `bytes` and `count` per batch (a full-size chunk goes alone). */
async function* batches(chunks: AsyncIterator<[number, number]>, bytes: number, count: number): AsyncGenerator<Array<[number, number]>> {
  let batch: Array<[number, number]> = [];
  let sum = 0;
  for (let c = await chunks.next(); !c.done; c = await chunks.next()) {
    const len = c.value[1] - c.value[0];
    if (batch.length > 0 && (sum + len > bytes || batch.length >= count)) {
      yield batch;
      batch = [];
      sum = 0;
    }
    batch.push(c.value);
    sum += len;
  }
  if (batch.length > 0) yield batch;
}

/** Chunks of at most `size`, aligned to `size`, covering [start, end). */
function* chunksOf(start: number, end: number, size: number): Generator<[number, number]> {
  for (let pos = start; pos < end; ) {
    const next = Math.min(end, (Math.floor(pos / size) + 1) * size);
    yield [pos, next];
    pos = next;
  }
}

/** Zero detection granularity inside data extents. */
const ZERO_BLOCK = 64 * 1024;

export class Copier {
  readonly chunkSize: number;
  readonly concurrency: number;
  readonly stats: CopierStats = { dataBytes: 0, zeroBytes: 0, skippedBytes: 0, processedBytes: 0, extentBytes: 0 };
  readonly #zeroes: Buffer;
  readonly #native: { source: FileDevice; dest: FileDevice } | null = null;
  /** File to file: the span the last batch wrote, dropped from the page cache by the next. */
  #dropBehind: { offset: number; length: number } | undefined;
  #unflushed = 0;
  #flushing: Promise<void> | null = null;

  constructor(
    readonly source: BlockDevice,
    readonly destination: BlockDevice,
    readonly opts: CopierOptions = {},
  ) {
    this.chunkSize = opts.chunkSize ?? 1024 * 1024;
    this.#zeroes = Buffer.alloc(Math.max(this.chunkSize, ZERO_BLOCK));
    if (opts.native !== false && source instanceof FileDevice && destination instanceof FileDevice && source.canCopyTo(destination)) {
      this.#native = { source, dest: destination };
    }
    // File to file, one worker thread: several threads writing one file queue on its inode
    // lock, spinning on a CPU the guest's own writes need (measured: guest p99 halved, no
    // slower). Network destinations keep several chunks in flight to cover the round trips.
    this.concurrency = this.#native ? 1 : Math.max(1, opts.concurrency ?? 4);
  }

  /** Whether chunks are copied file to file in a worker thread (FileDevice.copyTo). */
  get native(): boolean {
    return this.#native !== null;
  }

  /** Bytes that reached the destination (data and zeroes). */
  get writtenBytes(): number {
    return this.stats.dataBytes + this.stats.zeroBytes;
  }

  /** Copy `ranges` (ascending), `concurrency` chunks at a time; the first failure stops it. */
  async copy(ranges: Iterable<CopyRange>, run: CopyRunOptions = {}): Promise<void> {
    const size = run.chunkSize ?? this.chunkSize;
    const chunks = this.#plan(ranges, size, run);
    // File to file, small chunks (scattered dirty blocks) travel in batches of up to one
    // chunk's bytes: one worker-thread round trip per batch, not per 4 KiB block.
    const next = this.#native ? batches(chunks, size, BATCH_RANGES) : single(chunks);
    let failure: unknown = null;
    const worker = async () => {
      for (;;) {
        if (failure) return;
        try {
          throwIfAborted(this.opts.signal);
          // The plan may await block status or zero a hole before it hands out a chunk.
          const item = await next.next();
          if (item.done) return;
          const batch = item.value;
          for (const [start, end] of batch) run.beforeChunk?.(start, end);
          if (this.#native) await this.#copyNative(batch, run.destIsZero ?? false, run.deferLimit ?? false);
          else for (const [start, end] of batch) await this.#copyChunk(start, end, run.destIsZero ?? false, run.deferLimit ?? false);
          for (const [start, end] of batch) {
            this.stats.processedBytes += end - start;
            this.stats.extentBytes += end - start;
          }
          await this.#maybeFlush();
        } catch (e) {
          failure ??= e;
          return;
        }
      }
    };
    const results = await Promise.allSettled(Array.from({ length: this.concurrency }, worker));
    if (failure) throw failure;
    for (const r of results) if (r.status === 'rejected') throw r.reason;
  }

  /** Copy [start, end) now: block status first, then data runs and zero runs. */
  async #copyChunk(start: number, end: number, destIsZero: boolean, deferLimit: boolean): Promise<void> {
    for (const ext of await this.#extents(start, end)) {
      if (ext.zero) {
        await this.#zero(ext.offset, ext.length, destIsZero);
        continue;
      }
      const data = await this.#side('source', `read ${ext.offset}+${ext.length}`, () => this.source.read(ext.offset, ext.length));
      await this.#writeData(ext.offset, data, destIsZero, deferLimit);
    }
  }

  /**
   * File to file: the whole chunk (or batch of dirty blocks) in one worker thread
   * (FileDevice.copyTo), so the event loop that serves the guest sees one completion per
   * batch and no chunk buffers. The rate limiter is paid after the fact (the batch's data
   * bytes), and waited for before the next batch unless the caller defers that.
   */
  async #copyNative(batch: Array<[number, number]>, destIsZero: boolean, deferLimit: boolean): Promise<void> {
    const { limiter, signal } = this.opts;
    if (!deferLimit) await limiter?.ready(signal);
    let got;
    try {
      got = await this.#native!.source.copyTo(this.#native!.dest, batch.map(([start, end]) => ({ offset: start, length: end - start })), { destIsZero, writeback: true, dropBehind: this.#dropBehind });
    } catch (e) {
      if (e instanceof FileCopyError) throw new CopyError(e.side, e.errno, e.message, { cause: e });
      throw e;
    }
    const lo = batch[0]![0], hi = batch[batch.length - 1]![1];
    this.#dropBehind = got.dataBytes > 0 ? { offset: lo, length: hi - lo } : undefined;
    limiter?.charge(got.dataBytes);
    this.stats.dataBytes += got.dataBytes;
    this.stats.zeroBytes += got.zeroBytes;
    this.stats.skippedBytes += got.skippedBytes;
    this.#unflushed += got.dataBytes;
  }

  /** One periodic destination flush at a time; the worker that crosses the mark waits for it. */
  async #maybeFlush(): Promise<void> {
    if (this.#unflushed < (this.opts.flushEvery ?? 64 * 1024 * 1024)) return;
    if (!this.#flushing) {
      this.#unflushed = 0;
      this.#flushing = this.#side('destination', 'flush', () => this.destination.flush()).finally(() => (this.#flushing = null));
    }
    await this.#flushing;
  }

  /**
   * The chunks to copy, in order: short ranges cut into chunks of at most `size` (aligned
   * to it); long ones walked with block status, one answer at a time (a file answers up to
   * 1024 extents a call, an NBD export up to 4 GiB), their data extents cut into chunks,
   * their zero extents zeroed (or skipped) right here in one step. A pass costs its
   * extents, not its virtual size.
   * A data chunk is checked again when it is copied (its own block status), so an answer
   * that went stale meanwhile does no harm. A zero extent is skipped on the answer only
   * when every guest write is being tracked; with the incremental tracker (`beforeChunk`)
   * its cursor is moved past the extent first and the extent asked again: a write that
   * completed before the move shows in that answer (and is copied), one that completes
   * after it is marked. Either way no write is lost, and writes ahead of the data being
   * copied still cost nothing.
   */
  async *#plan(ranges: Iterable<CopyRange>, size: number, run: CopyRunOptions): AsyncGenerator<[number, number]> {
    const destIsZero = run.destIsZero ?? false;
    for (const r of ranges) {
      const end = Math.min(r.offset + r.length, this.source.size);
      if (!this.source.caps.canBlockStatus || end - r.offset <= PROBE_MIN) {
        yield* chunksOf(r.offset, end, size);
        continue;
      }
      for (let pos = r.offset; pos < end; ) {
        throwIfAborted(this.opts.signal);
        const answer = await this.#status(pos, end);
        for (const ext of answer) {
          const extEnd = ext.offset + ext.length;
          if (!ext.zero) {
            yield* chunksOf(ext.offset, extEnd, size);
            continue;
          }
          if (!run.beforeChunk) {
            await this.zeroRange(ext.offset, ext.length, destIsZero);
            continue;
          }
          run.beforeChunk(ext.offset, extEnd);
          for (const e of await this.#extents(ext.offset, extEnd)) {
            if (e.zero) await this.zeroRange(e.offset, e.length, destIsZero);
            else yield* chunksOf(e.offset, e.offset + e.length, size);
          }
        }
        pos = answer[answer.length - 1]!.offset + answer[answer.length - 1]!.length;
      }
    }
  }

  /** Make [offset, offset+length) read as zeroes on the destination (a zero extent of the source), counted like the copy's own. */
  async zeroRange(offset: number, length: number, destIsZero: boolean): Promise<void> {
    await this.#zero(offset, length, destIsZero);
    this.stats.processedBytes += length;
  }

  /**
   * Bytes of [offset, offset+length) the source holds as data (block status), for the
   * job's ETA; null when the source cannot tell or it took more than `maxCalls` calls.
   */
  async dataBytesIn(offset: number, length: number, maxCalls = 100_000): Promise<number | null> {
    if (!this.source.caps.canBlockStatus) return null;
    const end = Math.min(offset + length, this.source.size);
    let data = 0, calls = 0;
    for (let pos = offset; pos < end; ) {
      if (++calls > maxCalls || this.opts.signal?.aborted) return null;
      for (const e of await this.#status(pos, end)) {
        if (!e.zero) data += e.length;
        pos = e.offset + e.length;
      }
    }
    return data;
  }

  /** One block-status answer from `start` on: clipped to `end`, adjacent runs of the same kind merged, never empty. */
  async #status(start: number, end: number): Promise<Extent[]> {
    const got = await this.#side('source', `block-status ${start}+${end - start}`, () => this.source.blockStatus(start, end - start));
    const out: Extent[] = [];
    let pos = start;
    for (const e of got) {
      const s = Math.max(e.offset, pos), t = Math.min(e.offset + e.length, end);
      if (t <= s || s !== pos) continue;
      const last = out[out.length - 1];
      if (last && last.zero === e.zero) last.length += t - s;
      else out.push({ offset: s, length: t - s, hole: e.hole, zero: e.zero });
      pos = t;
    }
    if (out.length === 0) throw new CopyError('source', 'EIO', `${this.source.name}: block-status at ${start} answered nothing usable`);
    return out;
  }

  /** Block status for the whole of [start, end) (servers may answer a prefix at a time). */
  async #extents(start: number, end: number): Promise<Extent[]> {
    if (!this.source.caps.canBlockStatus) return [{ offset: start, length: end - start, hole: false, zero: false }];
    const out: Extent[] = [];
    for (let pos = start; pos < end; ) {
      for (const e of await this.#status(pos, end)) {
        const last = out[out.length - 1];
        if (last && last.zero === e.zero) last.length += e.length;
        else out.push(e);
        pos = e.offset + e.length;
      }
    }
    return out;
  }

  /** Write data, turning blocks that are all zeroes into zero runs. */
  async #writeData(offset: number, data: Buffer, destIsZero: boolean, deferLimit: boolean): Promise<void> {
    let runStart = 0;
    let runZero: boolean | null = null;
    const flush = async (to: number) => {
      if (runZero === null || to <= runStart) return;
      if (runZero) await this.#zero(offset + runStart, to - runStart, destIsZero);
      else {
        const part = data.subarray(runStart, to);
        if (deferLimit) this.opts.limiter?.charge(part.length);
        else await this.opts.limiter?.take(part.length, this.opts.signal);
        await this.#side('destination', `write ${offset + runStart}+${part.length}`, () => this.destination.write(offset + runStart, part));
        this.stats.dataBytes += part.length;
        this.#unflushed += part.length;
      }
    };
    for (let pos = 0; pos < data.length; pos += ZERO_BLOCK) {
      const n = Math.min(ZERO_BLOCK, data.length - pos);
      const zero = data.subarray(pos, pos + n).equals(this.#zeroes.subarray(0, n));
      if (zero !== runZero) {
        await flush(pos);
        runStart = pos;
        runZero = zero;
      }
    }
    await flush(data.length);
  }

  async #zero(offset: number, length: number, destIsZero: boolean): Promise<void> {
    if (destIsZero) {
      this.stats.skippedBytes += length;
      return;
    }
    const dst = this.destination;
    if (dst.caps.canZero) {
      // No NO_HOLE flag: the destination may punch a hole, which keeps it thin.
      await this.#side('destination', `write-zeroes ${offset}+${length}`, () => dst.writeZeroes(offset, length));
    } else {
      for (let done = 0; done < length; ) {
        const n = Math.min(this.#zeroes.length, length - done);
        await this.#side('destination', `write ${offset + done}+${n}`, () => dst.write(offset + done, this.#zeroes.subarray(0, n)));
        done += n;
      }
    }
    this.stats.zeroBytes += length;
  }

  /** Run one request and say which device failed, with its errno. */
  async #side<T>(side: 'source' | 'destination', what: string, fn: () => Promise<T>): Promise<T> {
    try {
      return await fn();
    } catch (e) {
      if (e instanceof CopyError) throw e;
      const dev = side === 'source' ? this.source : this.destination;
      const errno = e instanceof BlockError ? e.errno : errnoOf(e);
      const msg = (e as Error).message ?? String(e);
      throw new CopyError(side, errno, msg.includes(dev.name) ? `${what}: ${msg}` : `${dev.name}: ${what}: ${msg}`, { cause: e });
    }
  }
}
