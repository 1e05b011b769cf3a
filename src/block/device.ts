// The one interface every piece of the data path implements: files, NBD exports, and the
// layers (gate, tracker, mirror) that wrap them. Modelled on nbdkit's plugin/filter API:
// a layer wraps "the next device" and changes only the calls it cares about.

/** What a device can do. Layers inherit their inner device's capabilities by default. */
export interface DeviceCaps {
  readOnly: boolean;
  canFlush: boolean;
  canFua: boolean;
  canTrim: boolean;
  canZero: boolean;
  canFastZero: boolean;
  canBlockStatus: boolean;
  canCache: boolean;
  /** True only when several connections may be used at once with consistent results. */
  canMultiConn: boolean;
}

/** One run of a block-status answer: `hole` = unallocated, `zero` = reads as zeroes. */
export interface Extent {
  offset: number;
  length: number;
  hole: boolean;
  zero: boolean;
}

export interface WriteOpts {
  /** Force unit access: the write is durable when it completes. */
  fua?: boolean;
}

export interface ZeroOpts extends WriteOpts {
  /** Zeroes must be allocated (NBD_CMD_FLAG_NO_HOLE). */
  noHole?: boolean;
  /** Fail with ENOTSUP instead of writing zeroes slowly (NBD_CMD_FLAG_FAST_ZERO). */
  fastZero?: boolean;
}

export interface BlockDevice {
  /** Size in bytes; fixed for the device's lifetime. */
  readonly size: number;
  readonly caps: DeviceCaps;
  /** A short human name for errors and status, e.g. "file:/var/lib/x.raw". */
  readonly name: string;
  /**
   * The bytes at [offset, offset+length). `into` (exactly `length` bytes) is a buffer the
   * caller offers to read into, so that it can reuse it: a device may fill and return it, or
   * ignore it and return a buffer of its own. The caller must not touch `into` until the
   * promise settles, nor reuse it at all after a rejection (the device may still be using it).
   */
  read(offset: number, length: number, into?: Buffer): Promise<Buffer>;
  /**
   * Optional, for replies that leave without a copy (the NBD server's sendfile path): when
   * the bytes at [offset, offset+length) are those at `position` of a file this device reads,
   * calls `send(fd, position)` and returns its promise; fd stays open, and the device
   * unchanged, until that settles. Null when it cannot now (the caller uses read()). A
   * device or layer that changes what reads return must not offer it (Layer sees to that).
   */
  sendRange?<T>(offset: number, length: number, send: (fd: number, position: number) => Promise<T>): Promise<T> | null;
  write(offset: number, data: Buffer, opts?: WriteOpts): Promise<void>;
  writeZeroes(offset: number, length: number, opts?: ZeroOpts): Promise<void>;
  trim(offset: number, length: number, opts?: WriteOpts): Promise<void>;
  flush(): Promise<void>;
  /** Extents covering at least [offset, offset+1) and at most [offset, offset+length). */
  blockStatus(offset: number, length: number): Promise<Extent[]>;
  /** Advisory prefetch. */
  cache(offset: number, length: number): Promise<void>;
  close(): Promise<void>;
}

export const DEFAULT_CAPS: DeviceCaps = {
  readOnly: false,
  canFlush: true,
  canFua: true,
  canTrim: true,
  canZero: true,
  canFastZero: true,
  canBlockStatus: true,
  canCache: true,
  canMultiConn: true,
};

/** Errno names that cross the NBD wire (the protocol defines exactly these). */
export type BlockErrno = 'EPERM' | 'EIO' | 'ENOMEM' | 'EINVAL' | 'ENOSPC' | 'EOVERFLOW' | 'ENOTSUP' | 'ESHUTDOWN';

/** An error a device reports; `errno` is what an NBD server sends back to its client. */
export class BlockError extends Error {
  constructor(
    readonly errno: BlockErrno,
    message: string,
    options?: { cause?: unknown },
  ) {
    super(message, options);
    this.name = 'BlockError';
  }
}

/** Map any thrown value to a BlockErrno (Node's fs errors carry `code`). */
export function errnoOf(err: unknown): BlockErrno {
  if (err instanceof BlockError) return err.errno;
  const code = (err as { code?: unknown } | null)?.code;
  switch (code) {
    case 'EPERM':
    case 'EACCES':
    case 'EROFS':
      return 'EPERM';
    case 'ENOMEM':
      return 'ENOMEM';
    case 'EINVAL':
      return 'EINVAL';
    case 'ENOSPC':
    case 'EDQUOT':
    case 'EFBIG':
      return 'ENOSPC';
    case 'EOVERFLOW':
      return 'EOVERFLOW';
    case 'ENOTSUP':
    case 'EOPNOTSUPP':
      return 'ENOTSUP';
    case 'ESHUTDOWN':
      return 'ESHUTDOWN';
    default:
      return 'EIO';
  }
}

/** Throws EINVAL/ENOSPC-style errors for requests outside the device, as NBD requires. */
export function checkRange(dev: { size: number; name: string }, offset: number, length: number): void {
  if (!Number.isSafeInteger(offset) || !Number.isSafeInteger(length) || offset < 0 || length < 0) {
    throw new BlockError('EINVAL', `${dev.name}: bad range offset=${offset} length=${length}`);
  }
  if (offset + length > dev.size) {
    throw new BlockError('EINVAL', `${dev.name}: range ${offset}+${length} is past the end (${dev.size})`);
  }
}
