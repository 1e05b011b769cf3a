// A shim: one disk served over NBD through the block stack
//     NbdServer -> Gate -> Tracker -> bottom device (file or NBD export)
// plus its control socket (`<socket>.ctl`) and its durable state (`<socket>.state.json` by
// default). Jobs (storage migration) change the stack below the Gate only while it is
// paused, and record a new backing durably before they swap it in. The shim knows nothing of
// migrations: it is a MovableDisk (src/migrate/disk.ts) to them, and their control methods
// are added by whoever starts it (`extend`; `vmshift serve` adds migrate.*). While it serves a file
// or block device it holds that disk's one-writer lock (disk-lock.ts), and moves the lock to
// the destination at a switch-over.
import { realpath } from 'node:fs/promises';
import type { BlockDevice } from '../block/device.ts';
import type { Gate } from '../block/gate.ts';
import { Tracker } from '../block/tracker.ts';
import { describeStack, servedDisk, servingStack, type TrackKind } from '../block/stack.ts';
import { isNbdUri, openDevice } from '../block/open.ts';
import { lockDisk, type DiskLock } from './disk-lock.ts';
import { NbdServer } from '../nbd/server.ts';
import { ControlServer } from '../control/server.ts';
import { ControlError } from '../control/protocol.ts';
import { loadShimState, prepareShimState, saveShimState, type ShimState } from './state.ts';
import type { PreparedFile } from '../util/atomic-file.ts';

export type { TrackKind };

export interface ShimOptions {
  /** File path or NBD URI the operator gave (the origin). */
  source: string;
  /** Unix socket QEMU connects to. */
  socket: string;
  exportName?: string;
  readOnly?: boolean;
  track?: TrackKind;
  granularity?: number;
  /** Also listen on TCP (with TLS when tls is given). */
  tcp?: { host: string; port: number };
  /** Client certificates signed by `ca` are required unless verifyClient is false (src/nbd/tls.ts). */
  tls?: { cert: string; key: string; ca?: string; verifyClient?: boolean };
  statePath?: string;
  /** Mode of the NBD socket; 0600 by default (0660 lets QEMU's group in). */
  socketMode?: number;
  /** Memory bounds of the NBD server (defaults in src/nbd/server.ts and server-transmission.ts). */
  nbdLimits?: NbdMemoryLimits;
  /** Runs with the state path before the shim serves anything (nothing may write the disk before it resolves). */
  beforeServe?: (statePath: string) => Promise<void>;
  /** Adds control methods (e.g. migrate.*) once the shim serves, before its control socket listens. */
  extend?: (shim: Shim) => void | Promise<void>;
}

/** What clients can make the shim hold: see src/nbd/server-budget.ts. */
export interface NbdMemoryLimits {
  /** Connections served at once. */
  maxConnections?: number;
  /** Payload bytes all connections together hold. */
  maxBytes?: number;
  /** Payload bytes one connection holds. */
  maxConnectionBytes?: number;
}

export function controlSocketFor(nbdSocket: string): string {
  return `${nbdSocket}.ctl`;
}

export class Shim {
  private job: string | undefined;
  private constructor(
    readonly opts: Required<Pick<ShimOptions, 'source' | 'socket' | 'exportName' | 'readOnly' | 'track' | 'granularity' | 'statePath'>> & ShimOptions,
    readonly gate: Gate,
    private state: ShimState,
    readonly server: NbdServer,
    readonly control: ControlServer,
    private bottomDevice: BlockDevice,
    private lock: DiskLock | undefined,
    readonly startedAt = Date.now(),
  ) {}

  static async start(options: ShimOptions): Promise<Shim> {
    const opts = {
      ...options,
      exportName: options.exportName ?? 'disk',
      readOnly: options.readOnly ?? false,
      track: options.track ?? ('bitmap' as TrackKind),
      granularity: options.granularity ?? 64 * 1024,
      statePath: options.statePath ?? `${options.socket}.state.json`,
    };
    let state = await loadShimState(opts.statePath);
    if (state && state.origin !== opts.source) {
      throw new Error(`${opts.statePath} belongs to a shim of ${state.origin}, not ${opts.source}: use another --socket or --state, or remove it`);
    }
    const now = new Date().toISOString();
    state ??= { version: 1, origin: opts.source, backing: opts.source, updatedAt: now, history: [] };
    const lock = await lockBacking(state.backing, opts.readOnly);
    let bottom: BlockDevice;
    try {
      bottom = await openDevice(state.backing, { readOnly: opts.readOnly });
      if (!opts.readOnly) await saveShimState(opts.statePath, state);
    } catch (e) {
      await lock?.release();
      throw e;
    }
    const gate = servedDisk(bottom, { track: opts.track, granularity: opts.granularity });
    const server = new NbdServer({
      // The description never names the host path: every client may read it.
      exports: [{ name: opts.exportName, description: 'vmshift shim', device: gate }],
      tls: opts.tls ? { ...opts.tls, required: true } : undefined,
      maxConnections: opts.nbdLimits?.maxConnections,
      maxBytes: opts.nbdLimits?.maxBytes,
      limits: opts.nbdLimits?.maxConnectionBytes ? { maxInFlightBytes: opts.nbdLimits.maxConnectionBytes } : undefined,
    });
    const control = new ControlServer();
    const shim = new Shim(opts, gate, state, server, control, bottom, lock);
    try {
      if (!opts.readOnly) await opts.beforeServe?.(opts.statePath);
      await server.listenUnix(opts.socket, opts.socketMode ?? 0o600);
      if (opts.tcp) await server.listenTcp(opts.tcp.host, opts.tcp.port);
      control.on('status', () => shim.status());
      await opts.extend?.(shim);
      await control.listen(controlSocketFor(opts.socket));
    } catch (e) {
      await shim.stop().catch(() => {});
      throw e;
    }
    return shim;
  }

  /** MovableDisk: how messages name this disk. */
  get label(): string {
    return this.opts.socket;
  }
  get statePath(): string {
    return this.opts.statePath;
  }
  get readOnly(): boolean {
    return this.opts.readOnly;
  }
  get granularity(): number {
    return this.opts.granularity;
  }
  /** The unix socket and, when given, nothing else: a TCP address is no path to compare. */
  get sockets(): readonly string[] {
    return [this.opts.socket];
  }

  /** The device the disk lives on now. */
  get bottom(): BlockDevice {
    return this.bottomDevice;
  }
  get backing(): string {
    return this.state.backing;
  }
  get origin(): string {
    return this.state.origin;
  }
  /** The tracker directly under the gate (jobs may replace it with their own). */
  get tracker(): Tracker | undefined {
    const next = this.gate.next;
    return next instanceof Tracker ? next : undefined;
  }

  /** One job at a time per disk: a second one gets a clear error. */
  claim(job: string): () => void {
    if (this.job) throw new ControlError('busy', `${this.opts.socket}: a ${this.job} job is already running on this disk`);
    this.job = job;
    return () => {
      if (this.job === job) this.job = undefined;
    };
  }
  get activeJob(): string | undefined {
    return this.job;
  }

  /**
   * Write the state that names `spec` as the backing, synced but not in place; commit()
   * renames it into place (the durable record a restarted shim reads), discard() drops it.
   * The switch-over prepares before it holds I/O and commits inside the stall, with the gate
   * paused and the destination flushed, BEFORE the swap: if we crash after the commit, a
   * restart serves the destination, which already holds every acknowledged write.
   */
  async prepareBacking(spec: string): Promise<{ commit(): Promise<void>; discard(): Promise<void> }> {
    const at = new Date().toISOString();
    const next: ShimState = { ...this.state, backing: spec, updatedAt: at, history: [...this.state.history, { from: this.state.backing, to: spec, at }] };
    // The destination is locked before the stall, so a disk another shim serves is refused
    // while the guest still runs on its source.
    const lock = await lockBacking(spec, this.opts.readOnly);
    let file: PreparedFile;
    try {
      file = await prepareShimState(this.opts.statePath, next);
    } catch (e) {
      await lock?.release();
      throw e;
    }
    return {
      commit: async () => {
        await file.commit();
        this.state = next;
        const old = this.lock;
        this.lock = lock;
        await old?.release();
      },
      discard: async () => {
        await file.discard();
        await lock?.release();
      },
    };
  }

  /** Swap the stack below the gate (gate must be paused) onto a new bottom device. */
  replaceBottom(device: BlockDevice): BlockDevice {
    const old = this.bottomDevice;
    this.gate.swap(servingStack(device, { track: this.opts.track, granularity: this.opts.granularity }));
    this.bottomDevice = device;
    return old;
  }

  status() {
    const tracker = this.tracker;
    return {
      socket: this.opts.socket,
      export: this.opts.exportName,
      origin: this.state.origin,
      backing: this.state.backing,
      size: this.gate.size,
      readOnly: this.opts.readOnly,
      uptimeSeconds: Math.round((Date.now() - this.startedAt) / 1000),
      job: this.job ?? null,
      /** The stack top-down, each layer by its own name, the bottom device last. */
      stack: describeStack(this.gate),
      nbd: this.server.stats(),
      tracking: tracker ? tracker.stats() : null,
    };
  }

  /**
   * Stop serving: close NBD clients after in-flight requests, flush, close devices. A failed
   * flush still closes everything, then throws: `vmshift serve` exits 1 with "stop failed",
   * which is how vmshiftd tells a restart's old process did not stop cleanly.
   */
  async stop(): Promise<void> {
    await this.control.close().catch(() => {});
    await this.server.close().catch(() => {});
    let flushError: Error | undefined;
    if (!this.opts.readOnly) await this.gate.flush().catch((e: Error) => { flushError = e; });
    await this.gate.close().catch(() => {});
    await this.lock?.release();
    if (flushError) throw new Error(`the flush before stopping failed: ${flushError.message}`);
  }
}

/** The one-writer lock on a file or block device backing (none for an NBD export). */
async function lockBacking(backing: string, readOnly: boolean): Promise<DiskLock | undefined> {
  if (isNbdUri(backing)) return undefined;
  const real = await realpath(backing).catch(() => undefined);
  return real === undefined ? undefined : lockDisk(real, readOnly); // a missing file: openDevice says so
}
