// Gate: the switch-over point. It can hold new requests and wait for the ones in flight to
// drain, so that the device below can be changed while no I/O touches it (QEMU's
// drain -> change -> resume). What it changes: while paused, requests are queued instead
// of passed on; on resume they start in the order they arrived, before any request that
// arrives later. The size and capabilities it reports are fixed when it is built, so a
// client never sees them change across a swap.
import { BlockError, type BlockDevice, type DeviceCaps, type Extent, type WriteOpts, type ZeroOpts } from './device.ts';
import { Layer } from './layer.ts';

type Held = { start: () => void; reject: (err: unknown) => void };

export class Gate extends Layer {
  readonly #size: number;
  readonly #caps: DeviceCaps;
  #paused = false;
  #closed = false;
  #inFlight = 0;
  #held: Held[] = [];
  #drained: Array<() => void> = [];

  constructor(inner: BlockDevice) {
    super(inner);
    this.#size = inner.size;
    this.#caps = Object.freeze({ ...inner.caps });
  }

  override get size(): number {
    return this.#size;
  }
  override get caps(): DeviceCaps {
    return this.#caps;
  }
  get paused(): boolean {
    return this.#paused;
  }
  /** Requests passed to the inner device and not yet completed. */
  get inFlight(): number {
    return this.#inFlight;
  }
  /** Requests waiting for resume(). */
  get held(): number {
    return this.#held.length;
  }

  /** Hold new requests; resolves once every request already passed on has completed. */
  pause(): Promise<void> {
    this.#paused = true;
    if (this.#inFlight === 0) return Promise.resolve();
    return new Promise((resolve) => this.#drained.push(resolve));
  }

  /** Start the held requests, in arrival order, and pass new ones on again. */
  resume(): void {
    if (!this.#paused) return;
    this.#paused = false;
    const held = this.#held;
    this.#held = [];
    // Started synchronously, so a request arriving after resume() queues behind all of them.
    for (const h of held) h.start();
  }

  /**
   * Replace the inner device; only while paused and drained. The new device must have the
   * same size and at least the capabilities this gate advertises. Returns the old device
   * (the caller closes it when it is done with it).
   */
  swap(next: BlockDevice): BlockDevice {
    if (!this.#paused) throw new Error(`gate ${this.name}: swap to ${next.name} refused: not paused`);
    if (this.#inFlight > 0) throw new Error(`gate ${this.name}: swap to ${next.name} refused: ${this.#inFlight} requests still in flight`);
    if (next.size !== this.#size) throw new Error(`gate ${this.name}: swap to ${next.name} refused: size ${next.size} differs from ${this.#size}`);
    const missing = (Object.keys(this.#caps) as Array<keyof DeviceCaps>).filter((k) =>
      k === 'readOnly' ? next.caps.readOnly && !this.#caps.readOnly : this.#caps[k] && !next.caps[k]);
    if (missing.length) throw new Error(`gate ${this.name}: swap to ${next.name} refused: it lacks ${missing.join(', ')}`);
    const old = this.inner;
    this.inner = next;
    return old;
  }

  override read(offset: number, length: number, into?: Buffer): Promise<Buffer> {
    return this.#pass(() => this.inner.read(offset, length, into));
  }
  /** Counted in flight like any request (a swap waits for it); while paused or closed, none (read() holds it). */
  override sendRange<T>(offset: number, length: number, send: (fd: number, position: number) => Promise<T>): Promise<T> | null {
    if (this.#paused || this.#closed) return null;
    const p = this.inner.sendRange?.(offset, length, send) ?? null;
    return p && this.#start(() => p);
  }
  override write(offset: number, data: Buffer, opts?: WriteOpts): Promise<void> {
    return this.#pass(() => this.inner.write(offset, data, opts));
  }
  override writeZeroes(offset: number, length: number, opts?: ZeroOpts): Promise<void> {
    return this.#pass(() => this.inner.writeZeroes(offset, length, opts));
  }
  override trim(offset: number, length: number, opts?: WriteOpts): Promise<void> {
    return this.#pass(() => this.inner.trim(offset, length, opts));
  }
  override flush(): Promise<void> {
    return this.#pass(() => this.inner.flush());
  }
  override blockStatus(offset: number, length: number): Promise<Extent[]> {
    return this.#pass(() => this.inner.blockStatus(offset, length));
  }
  override cache(offset: number, length: number): Promise<void> {
    return this.#pass(() => this.inner.cache(offset, length));
  }

  /** Fails held requests with ESHUTDOWN, waits for in-flight ones, then closes the inner device. */
  override async close(): Promise<void> {
    if (this.#closed) return;
    this.#closed = true;
    const held = this.#held;
    this.#held = [];
    for (const h of held) h.reject(new BlockError('ESHUTDOWN', `gate ${this.name}: closed while the request was held`));
    if (this.#inFlight > 0) await new Promise<void>((resolve) => this.#drained.push(resolve));
    await this.inner.close();
  }

  /** Pass a request on now, or hold it until resume(). `op` reads `this.inner` when it starts. */
  #pass<T>(op: () => Promise<T>): Promise<T> {
    if (this.#closed) return Promise.reject(new BlockError('ESHUTDOWN', `gate ${this.name}: closed`));
    if (!this.#paused) return this.#start(op);
    return new Promise<T>((resolve, reject) => {
      this.#held.push({ start: () => this.#start(op).then(resolve, reject), reject });
    });
  }

  #start<T>(op: () => Promise<T>): Promise<T> {
    this.#inFlight++;
    let p: Promise<T>;
    try {
      p = op();
    } catch (err) {
      p = Promise.reject(err);
    }
    return p.finally(() => {
      if (--this.#inFlight === 0) {
        const waiters = this.#drained;
        this.#drained = [];
        for (const w of waiters) w();
      }
    });
  }
}
