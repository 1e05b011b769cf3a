// FileDevice: a raw image file or a block device as a BlockDevice.
//
// Reads and writes are positional on one FileHandle (so requests may run concurrently);
// small ones are made on the event loop while they do not block it (inline-io.ts);
// flush is fdatasync, FUA is write then fdatasync. Sparse-aware through the native addon
// (native/vmshift_native.c): blockStatus comes from SEEK_DATA/SEEK_HOLE, and write-zeroes
// and trim punch holes. Without the addon everything still works, only less cleverly:
// every byte is reported as data, zeroes are written for real, trim does nothing and is
// not advertised, and fast-zero fails with ENOTSUP.
import { constants as fsc, promises as fsp, readFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import { join } from 'node:path';
import { projectRoot } from '../util/paths.ts';
import { preadFull, pwriteFull } from './pio.ts';
import { InlineBudget } from './inline-io.ts';
import { debuglog } from 'node:util';
import {
  BlockError, DEFAULT_CAPS, checkRange, errnoOf,
  type BlockDevice, type DeviceCaps, type Extent, type WriteOpts, type ZeroOpts,
} from './device.ts';

const debug = debuglog('vmshift');

/** The native addon's functions (see native/vmshift_native.c). */
export interface NativeFileOps {
  /** Next data offset at or after `offset`, or -1 when only a hole follows. */
  seekData(fd: number, offset: number): number;
  /** Next hole offset at or after `offset` (the end counts as a hole), or -1 past the end. */
  seekHole(fd: number, offset: number): number;
  punchHole(fd: number, offset: number, length: number): void;
  zeroRange(fd: number, offset: number, length: number): void;
  blockDeviceSize(fd: number): number;
  /** pwrite all of `data` on this thread: 0, or the milliseconds it took when the thread had to sleep for it. */
  writeInline(fd: number, data: Buffer, offset: number): number;
  /** Fill `into` from the page cache only, as writeInline; -1 when not all of it is cached, -2 when the file cannot read that way. */
  readInline(fd: number, into: Buffer, offset: number): number;
  /** Copy ranges (offset, length pairs) file to file in a worker thread (see native/vmshift_native.c). */
  copyRanges(src: number, dst: number, ranges: Float64Array, destIsZero: boolean, writeback: boolean, dropOffset: number, dropLength: number): Promise<FileCopyCounts>;
  /**
   * Send READ replies from the page cache in a worker thread (sendfile: no copy in user
   * space): for each item (header offset and length in `headers`, file offset, length), its
   * header then its bytes of `fd`, on the non-blocking socket `sock`, until one cannot go
   * whole (native/vmshift_native.c says why). Absent from addons built before it.
   */
  sendFileBatch?(sock: number, fd: number, headers: Buffer, items: Float64Array): Promise<SendFileResult>;
  /** 0 when fd's range is all data and all in the page cache (sendFileBatch would send it), 2 when not, 3 when this kernel cannot tell (absent from addons built before it). */
  sendable?(fd: number, offset: number, length: number): number;
  /** A new descriptor (close-on-exec) of the same socket (absent from addons built before it). */
  dupSocket?(fd: number): number;
  /** SO_SNDBUF of a socket (absent from addons built before it). */
  setSendBuffer?(sock: number, bytes: number): void;
  /** A page-aligned Buffer of its own mapping, unmapped once collected (absent from addons built before it). */
  alignedBuffer?(length: number): Buffer;
}

/** How far a sendFileBatch got: `items` sent whole, then `bytes` of the next, and why it stopped. */
export interface SendFileResult {
  items: number;
  bytes: number;
  /** 0: all sent; 1: the socket is full; 2: the next range is not all cached data (nothing of it sent); 3: no cachestat here; else an errno. */
  stop: number;
}

/** What one FileDevice.copyTo did. */
export interface FileCopyCounts {
  /** Bytes written as data. */
  dataBytes: number;
  /** Bytes zeroed on the destination (holes punched, or zeroes written). */
  zeroBytes: number;
  /** Zero bytes left alone because the destination already reads as zeroes there. */
  skippedBytes: number;
}

/** A failed copyTo, saying which of the two files failed. */
export class FileCopyError extends BlockError {
  constructor(
    readonly side: 'source' | 'destination',
    errno: BlockError['errno'],
    message: string,
    options?: { cause?: unknown },
  ) {
    super(errno, message, options);
    this.name = 'FileCopyError';
  }
}

let nativeOps: NativeFileOps | null | undefined;

/**
 * The addon, loaded on first use (scripts/build-native.sh builds it), or null when it is
 * missing or VMSHIFT_NO_NATIVE is set. The fallback is said once, in the NODE_DEBUG=vmshift log.
 */
export function loadNative(): NativeFileOps | null {
  if (nativeOps !== undefined) return nativeOps;
  if (process.env.VMSHIFT_NO_NATIVE) {
    debug('native addon disabled by VMSHIFT_NO_NATIVE: no sparse files, zeroes are written');
    return (nativeOps = null);
  }
  nativeOps = loadAddon() as NativeFileOps | null;
  if (!nativeOps) debug('native addon not loaded (%s): run scripts/build-native.sh; until then no sparse files, zeroes are written', addonError);
  return nativeOps;
}

let addon: Record<string, unknown> | null | undefined;
let addonError = '';

/**
 * The addon module itself, loaded once for every user, or null when it is not built. Unlike
 * loadNative it ignores VMSHIFT_NO_NATIVE, which turns off the file fast paths only: the
 * disk lock (src/shim/disk-lock.ts) stays.
 */
export function loadAddon(): Record<string, unknown> | null {
  if (addon !== undefined) return addon;
  try {
    addon = createRequire(import.meta.url)(join(projectRoot, 'native/build/vmshift_native.node')) as Record<string, unknown>;
  } catch (err) {
    addonError = String((err as Error).message).split('\n')[0]!;
    addon = null;
  }
  return addon;
}

export interface FileOpenOptions {
  readOnly?: boolean;
  /** Create the file with this size if it does not exist (or is empty); an existing file must already have it. */
  create?: { size: number };
  /** Use the native addon when available (default true); false forces the portable fallback. */
  native?: boolean;
}

/**
 * Writes given to the thread pool at once per file; the rest wait their turn here (FIFO).
 * Buffered writes to one file take its inode lock one at a time (ext4, xfs): more of them at
 * once only park threads on that lock (perf showed rwsem spinning and futex wake-ups under
 * nbdcopy's 4 x 64 writes of 256 KiB) and wake them again.
 */
const POOL_WRITES = 4;

/**
 * Writes up to this size are made on the event loop too (while the inline budget lasts), not
 * only the guest's small ones: a bulk writer's 256 KiB requests (nbdcopy, QEMU's mirror, the
 * NBD destination of a migration) arrive one at a time, each as its payload completes, so
 * batching them into one pool job gathered ~1.0 write per job (measured), and the pool's
 * round trip per write (a futex wake-up of a worker, its sleep, an eventfd wake-up back, and
 * four workers contending for the file's inode lock) cost about as much CPU as the write's
 * copy. Made inline, nbdcopy file -> export took ~half the shim's CPU (docs/performance.md).
 * Reads stay at INLINE_MAX: larger cached ones go by sendfile, without a copy at all.
 */
const INLINE_WRITE_MAX = 256 * 1024;

/** At most `limit` of the operations run() is given run at once; the others wait in order. */
class Slots {
  #running = 0;
  readonly #queue: Array<() => void> = [];
  constructor(readonly limit: number) {}

  run<T>(op: () => Promise<T>): Promise<T> {
    if (this.#running >= this.limit) return new Promise<void>((resolve) => this.#queue.push(resolve)).then(() => this.#start(op));
    return this.#start(op);
  }

  #start<T>(op: () => Promise<T>): Promise<T> {
    this.#running++;
    return op().finally(() => {
      this.#running--;
      this.#queue.shift()?.();
    });
  }
}

/** Largest single buffer for zeroes written by hand (fallback path). */
const ZERO_CHUNK = 1024 * 1024;
/** Bound on extents in one blockStatus answer; NBD allows answering a prefix. */
const MAX_EXTENTS = 1024;

/** Errnos that mean "this filesystem/device cannot do that fallocate mode". */
function unsupported(err: unknown): boolean {
  const code = (err as { code?: unknown } | null)?.code;
  return code === 'EOPNOTSUPP' || code === 'ENOTSUP' || code === 'ENOSYS' || code === 'EINVAL' || code === 'ENOTTY';
}

/** Linux dev_t -> "major:minor" (glibc's encoding), to find a block device in /sys. */
function majorMinor(rdev: number): string {
  const major = ((rdev >>> 8) & 0xfff) | (Math.floor(rdev / 2 ** 32) & ~0xfff);
  const minor = (rdev & 0xff) | ((rdev >>> 12) & ~0xff);
  return `${major}:${minor}`;
}

export class FileDevice implements BlockDevice {
  readonly caps: DeviceCaps;
  readonly name: string;
  #closed = false;
  #rawInFlight = 0;
  #rawIdle: (() => void) | undefined;
  #syncs = 0;
  readonly #poolWrites = new Slots(POOL_WRITES);
  readonly #inline = new InlineBudget();
  /** False once the file turned out not to support page-cache-only reads (RWF_NOWAIT). */
  #inlineReads = true;

  private constructor(
    private readonly handle: fsp.FileHandle,
    readonly path: string,
    readonly size: number,
    readonly isBlockDevice: boolean,
    private readonly native: NativeFileOps | null,
    readOnly: boolean,
  ) {
    this.name = `file:${path}`;
    this.caps = Object.freeze({
      ...DEFAULT_CAPS,
      readOnly,
      canTrim: !readOnly && native !== null,
      canZero: !readOnly,
      canFastZero: !readOnly && native !== null,
      // fsync and the page cache make several connections to one file consistent.
      canMultiConn: true,
    });
  }

  static async open(path: string, opts: FileOpenOptions = {}): Promise<FileDevice> {
    const readOnly = opts.readOnly ?? false;
    if (readOnly && opts.create) throw new BlockError('EINVAL', `file:${path}: cannot create a read-only device`);
    const native = opts.native === false ? null : loadNative();
    let flags = readOnly ? fsc.O_RDONLY : fsc.O_RDWR;
    if (opts.create) flags |= fsc.O_CREAT;
    let handle: fsp.FileHandle;
    try {
      handle = await fsp.open(path, flags, 0o600);
    } catch (err) {
      throw new BlockError(errnoOf(err), `file:${path}: open failed: ${(err as Error).message}`, { cause: err });
    }
    try {
      const st = await handle.stat();
      let size: number;
      if (st.isBlockDevice()) {
        size = native ? native.blockDeviceSize(handle.fd) : FileDevice.#sysfsSize(st.rdev);
      } else if (st.isFile()) {
        size = st.size;
        if (opts.create) {
          const want = opts.create.size;
          if (!Number.isSafeInteger(want) || want < 0) throw new BlockError('EINVAL', `file:${path}: bad create size ${want}`);
          if (size === 0 && want > 0) {
            await handle.truncate(want);
            size = want;
          } else if (size !== want) {
            throw new BlockError('EINVAL', `file:${path}: exists with size ${size}, not the requested ${want}`);
          }
        }
      } else {
        throw new BlockError('EINVAL', `file:${path}: not a regular file or block device`);
      }
      return new FileDevice(handle, path, size, st.isBlockDevice(), native, readOnly);
    } catch (err) {
      await handle.close().catch(() => {});
      if (err instanceof BlockError) throw err;
      throw new BlockError(errnoOf(err), `file:${path}: open failed: ${(err as Error).message}`, { cause: err });
    }
  }

  /** Block device size without the addon: /sys/dev/block/MAJ:MIN/size counts 512-byte sectors. */
  static #sysfsSize(rdev: number): number {
    const sectors = Number(readFileSync(`/sys/dev/block/${majorMinor(rdev)}/size`, 'utf8').trim());
    if (!Number.isSafeInteger(sectors)) throw new Error(`cannot read the size of block device ${majorMinor(rdev)}`);
    return sectors * 512;
  }

  /** Whether the sparse-file addon is in use for this device. */
  get sparse(): boolean {
    return this.native !== null;
  }

  /** fdatasync calls made so far (flushes and FUA writes): lets tests and status see durability work. */
  get syncCount(): number {
    return this.#syncs;
  }

  async read(offset: number, length: number, into?: Buffer): Promise<Buffer> {
    this.#check('read', offset, length);
    const buf = into?.length === length ? into : Buffer.allocUnsafe(length);
    try {
      // Cached data is copied right here; anything else is read in the pool (see #writeAll).
      if (this.native && this.#inlineReads && this.#inline.allows(length, performance.now())) {
        const blockedMs = this.native.readInline(this.handle.fd, buf, offset);
        if (blockedMs >= 0) {
          this.#inline.spent(blockedMs, performance.now());
          return buf;
        }
        // This file cannot answer from its cache alone (NFS, FUSE): no more asking.
        if (blockedMs === -2) this.#inlineReads = false;
      }
      await this.#raw(preadFull(this.handle.fd, buf, offset));
    } catch (err) {
      throw this.#wrap('read', offset, length, err);
    }
    return buf;
  }

  /** The file's own fd at the same offset, open until `send` settles (null once closed, or for a bad range: read() says why). */
  sendRange<T>(offset: number, length: number, send: (fd: number, position: number) => Promise<T>): Promise<T> | null {
    if (this.#closed || offset < 0 || length < 0 || offset + length > this.size) return null;
    return this.#raw(send(this.handle.fd, offset));
  }

  async write(offset: number, data: Buffer, opts: WriteOpts = {}): Promise<void> {
    this.#check('write', offset, data.length, true);
    try {
      await this.#writeAll(offset, data);
      if (opts.fua) await this.#sync();
    } catch (err) {
      throw this.#wrap('write', offset, data.length, err);
    }
  }

  async writeZeroes(offset: number, length: number, opts: ZeroOpts = {}): Promise<void> {
    this.#check('write-zeroes', offset, length, true);
    if (length === 0) return;
    await this.#io('write-zeroes', offset, length, async () => {
      if (!(await this.#zeroFast(offset, length, opts.noHole ?? false))) {
        if (opts.fastZero) throw new BlockError('ENOTSUP', `${this.name}: write-zeroes ${offset}+${length}: no fast zeroing here`);
        await this.#writeZeroesSlowly(offset, length);
      }
      if (opts.fua) await this.#sync();
    });
  }

  async trim(offset: number, length: number, opts: WriteOpts = {}): Promise<void> {
    this.#check('trim', offset, length, true);
    if (length === 0 || !this.native) return; // trim is advisory: doing nothing is correct
    await this.#io('trim', offset, length, async () => {
      try {
        this.native!.punchHole(this.handle.fd, offset, length);
      } catch (err) {
        if (!unsupported(err)) throw err;
      }
      if (opts.fua) await this.#sync();
    });
  }

  async flush(): Promise<void> {
    this.#check('flush', 0, 0);
    await this.#io('flush', 0, 0, () => this.#sync());
  }

  async blockStatus(offset: number, length: number): Promise<Extent[]> {
    this.#check('block-status', offset, length);
    if (length === 0) return [];
    const end = offset + length;
    // Block devices reject SEEK_DATA (EINVAL): report them, like files without the addon, as all data.
    if (!this.native || this.isBlockDevice) return [{ offset, length, hole: false, zero: false }];
    const extents: Extent[] = [];
    await this.#io('block-status', offset, length, async () => {
      const fd = this.handle.fd;
      let pos = offset;
      while (pos < end && extents.length < MAX_EXTENTS) {
        const data = this.native!.seekData(fd, pos);
        if (data < 0 || data > pos) {
          // A hole up to the next data (or to the end: -1 means no data follows).
          const holeEnd = data < 0 ? end : Math.min(data, end);
          extents.push({ offset: pos, length: holeEnd - pos, hole: true, zero: true });
          pos = holeEnd;
        } else {
          const hole = this.native!.seekHole(fd, pos);
          const dataEnd = hole < 0 ? end : Math.min(hole, end);
          extents.push({ offset: pos, length: dataEnd - pos, hole: false, zero: false });
          pos = dataEnd;
        }
      }
    });
    return extents;
  }

  /** Whether copyTo(dest) can run: both files have the addon, and dest is writable. */
  canCopyTo(dest: BlockDevice): boolean {
    return dest instanceof FileDevice && this.native !== null && dest.native !== null && !dest.caps.readOnly && dest.size === this.size;
  }

  /**
   * Copy `ranges` of this file to the same ranges of `dest` in one libuv worker thread: the
   * migration copier's file-to-file path (one chunk, or a batch of scattered dirty blocks).
   * Holes and 64 KiB blocks of zeroes become holes on `dest` (or are skipped when
   * `destIsZero`); `writeback` starts the new data's writeback at once (sync_file_range)
   * instead of leaving it dirty in the page cache; `dropBehind` (a span an earlier call
   * wrote) is waited for on disk and dropped from the page cache, so a long copy recycles
   * a little memory instead of filling the cache with the whole disk.
   */
  async copyTo(dest: FileDevice, ranges: ReadonlyArray<{ offset: number; length: number }>, opts: { destIsZero?: boolean; writeback?: boolean; dropBehind?: { offset: number; length: number } } = {}): Promise<FileCopyCounts> {
    if (!this.canCopyTo(dest)) throw new BlockError('ENOTSUP', `${this.name}: cannot copy natively to ${dest.name}`);
    const what = ranges.length === 1 ? `${ranges[0]!.offset}+${ranges[0]!.length}` : `${ranges.length} ranges from ${ranges[0]?.offset}`;
    const side = (which: 'source' | 'destination', err: unknown) => {
      const dev = which === 'source' ? this : dest;
      const msg = (err as Error).message ?? String(err);
      return new FileCopyError(which, errnoOf(err), msg.includes(dev.name) ? msg : `${dev.name}: copy ${what}: ${msg}`, { cause: err });
    };
    const pairs = new Float64Array(ranges.length * 2);
    let n = 0;
    for (const { offset, length } of ranges) {
      for (const [dev, which] of [[this, 'source'], [dest, 'destination']] as const) {
        try {
          dev.#check('copy', offset, length, which === 'destination');
        } catch (err) {
          throw side(which, err);
        }
      }
      if (length === 0) continue;
      pairs[n++] = offset;
      pairs[n++] = length;
    }
    if (n === 0) return { dataBytes: 0, zeroBytes: 0, skippedBytes: 0 };
    if (opts.dropBehind?.length) {
      try {
        dest.#check('drop-behind', opts.dropBehind.offset, opts.dropBehind.length);
      } catch (err) {
        throw side('destination', err);
      }
    }
    try {
      // Counted on both files: neither fd may be closed while the worker thread uses it.
      const drop = opts.dropBehind;
      return await dest.#raw(this.#raw(this.native!.copyRanges(this.handle.fd, dest.handle.fd, pairs.subarray(0, n), opts.destIsZero ?? false, opts.writeback ?? false, drop?.offset ?? 0, drop?.length ?? 0)));
    } catch (err) {
      throw side((err as { side?: unknown }).side === 'destination' ? 'destination' : 'source', err);
    }
  }

  async cache(offset: number, length: number): Promise<void> {
    // Advisory; the page cache does read-ahead on its own.
    this.#check('cache', offset, length);
  }

  async close(): Promise<void> {
    if (this.#closed) return;
    this.#closed = true;
    // Raw-fd reads and writes are not tracked by the FileHandle: let them finish first, so
    // the fd is never closed (and reused) under a request still in the thread pool.
    while (this.#rawInFlight > 0) await new Promise<void>((r) => (this.#rawIdle = r));
    await this.handle.close();
  }

  /** Count a raw-fd request until it settles (see close). */
  #raw<T>(p: Promise<T>): Promise<T> {
    this.#rawInFlight++;
    return p.finally(() => {
      if (--this.#rawInFlight === 0) this.#rawIdle?.();
    });
  }

  /** Zero with one fallocate call; false when that is not possible here (caller writes zeroes). */
  async #zeroFast(offset: number, length: number, noHole: boolean): Promise<boolean> {
    if (!this.native) return false;
    const fd = this.handle.fd;
    // Punching a hole both zeroes and frees space; ZERO_RANGE zeroes and keeps it allocated,
    // which NO_HOLE asks for. A filesystem without PUNCH_HOLE may still have ZERO_RANGE.
    const modes = noHole ? [this.native.zeroRange] : [this.native.punchHole, this.native.zeroRange];
    for (const mode of modes) {
      try {
        mode(fd, offset, length);
        return true;
      } catch (err) {
        if (!unsupported(err)) throw err;
      }
    }
    return false;
  }

  async #writeZeroesSlowly(offset: number, length: number): Promise<void> {
    const zeroes = Buffer.alloc(Math.min(length, ZERO_CHUNK));
    for (let done = 0; done < length; ) {
      const n = Math.min(zeroes.length, length - done);
      await this.#writeAll(offset + done, n === zeroes.length ? zeroes : zeroes.subarray(0, n));
      done += n;
    }
  }

  /** Small reads and writes made on the event loop, and how many of them slept there (see #writeAll). */
  get inlineCounts(): { done: number; blocked: number } {
    return { done: this.#inline.done, blocked: this.#inline.blocked };
  }

  /**
   * Small writes are made right here on the event loop (the addon's writeInline) while
   * their budget of blocked time lasts (src/block/inline-io.ts says why), the rest
   * through the thread pool. Small reads likewise, when all their data is in the page
   * cache (readInline). Measured: unthrottled 4k writes through the shim during a
   * migration, p99 0.8-1.2 ms instead of 2.0-2.2 with 50% more writes done
   * (docs/storage-migration.md).
   */
  #writeAll(offset: number, data: Buffer): Promise<void> {
    if (this.native && this.#inline.allows(data.length, performance.now(), INLINE_WRITE_MAX)) {
      try {
        const blockedMs = this.native.writeInline(this.handle.fd, data, offset);
        this.#inline.spent(blockedMs, performance.now());
        if (blockedMs > 0) debug('%s: an inline %d-byte write at %d slept %s ms', this.name, data.length, offset, blockedMs.toFixed(3));
      } catch (err) {
        return Promise.reject(err);
      }
      return Promise.resolve();
    }
    return this.#poolWrites.run(() => this.#raw(pwriteFull(this.handle.fd, data, offset)));
  }

  async #sync(): Promise<void> {
    this.#syncs++;
    await this.handle.datasync();
  }

  #check(op: string, offset: number, length: number, modifies = false): void {
    if (this.#closed) throw new BlockError('ESHUTDOWN', `${this.name}: ${op} after close`);
    if (modifies && this.caps.readOnly) throw new BlockError('EPERM', `${this.name}: ${op} on a read-only device`);
    checkRange(this, offset, length);
  }

  /** Runs one operation, turning any failure into a BlockError that names the device and request. */
  async #io(op: string, offset: number, length: number, fn: () => Promise<void>): Promise<void> {
    try {
      await fn();
    } catch (err) {
      throw this.#wrap(op, offset, length, err);
    }
  }

  #wrap(op: string, offset: number, length: number, err: unknown): BlockError {
    if (err instanceof BlockError) return err;
    return new BlockError(errnoOf(err), `${this.name}: ${op} ${offset}+${length} failed: ${(err as Error).message}`, { cause: err });
  }
}
