// Base class for a layer: a device that wraps another and passes every call through.
// Subclasses override only what they change (as nbdkit filters do), and say why in their
// own doc comment.
import type { BlockDevice, DeviceCaps, Extent, WriteOpts, ZeroOpts } from './device.ts';

export class Layer implements BlockDevice {
  constructor(protected inner: BlockDevice) {}

  get size(): number {
    return this.inner.size;
  }
  get caps(): DeviceCaps {
    return this.inner.caps;
  }
  get name(): string {
    return this.inner.name;
  }
  /** The device this layer wraps (for status and for walking a stack). */
  get next(): BlockDevice {
    return this.inner;
  }
  read(offset: number, length: number, into?: Buffer): Promise<Buffer> {
    return this.inner.read(offset, length, into);
  }
  /**
   * Passed through only by layers that leave reads alone: a subclass that overrides read()
   * must not be bypassed by the zero-copy path, so it offers none unless it says how.
   */
  sendRange<T>(offset: number, length: number, send: (fd: number, position: number) => Promise<T>): Promise<T> | null {
    if (this.read !== Layer.prototype.read) return null;
    return this.inner.sendRange?.(offset, length, send) ?? null;
  }
  write(offset: number, data: Buffer, opts?: WriteOpts): Promise<void> {
    return this.inner.write(offset, data, opts);
  }
  writeZeroes(offset: number, length: number, opts?: ZeroOpts): Promise<void> {
    return this.inner.writeZeroes(offset, length, opts);
  }
  trim(offset: number, length: number, opts?: WriteOpts): Promise<void> {
    return this.inner.trim(offset, length, opts);
  }
  flush(): Promise<void> {
    return this.inner.flush();
  }
  blockStatus(offset: number, length: number): Promise<Extent[]> {
    return this.inner.blockStatus(offset, length);
  }
  cache(offset: number, length: number): Promise<void> {
    return this.inner.cache(offset, length);
  }
  close(): Promise<void> {
    return this.inner.close();
  }
}
