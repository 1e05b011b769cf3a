// A shim: one disk served over NBD through the block stack
//     NbdServer -> Gate -> Tracker -> bottom device (file or NBD export)
// plus its control socket (`<socket>.ctl`) and its durable state (`<socket>.state.json` by
// default). Jobs (storage migration) change the stack below the Gate only while it is
// paused, and record a new backing durably before they swap it in.
import type { BlockDevice } from '../block/device.ts';
import { Gate } from '../block/gate.ts';
import { Tracker } from '../block/tracker.ts';
import { openDevice } from '../block/open.ts';
import { NbdServer } from '../nbd/server.ts';
import { ControlServer } from '../control/server.ts';
import { ControlError } from '../control/protocol.ts';
import { loadShimState, prepareShimState, saveShimState, type ShimState } from './state.ts';
import { registerMigrationMethods } from '../migrate/control.ts';

export type TrackKind = 'bitmap' | 'bloom' | 'none';

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
  tls?: { cert: string; key: string; ca?: string };
  statePath?: string;
  /** Mode of the NBD socket; 0600 by default (0660 lets QEMU's group in). */
  socketMode?: number;
  /** Memory bounds of the NBD server (defaults in src/nbd/server.ts and server-transmission.ts). */
  nbdLimits?: NbdMemoryLimits;
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
    const bottom = await openDevice(state.backing, { readOnly: opts.readOnly });
    if (!opts.readOnly) await saveShimState(opts.statePath, state);
    const gate = new Gate(new Tracker(bottom, { kind: opts.track, granularity: opts.granularity, heat: true }));
    const server = new NbdServer({
      exports: [{ name: opts.exportName, description: `vmshift shim of ${state.origin}`, device: gate }],
      tls: opts.tls ? { ...opts.tls, required: true } : undefined,
      maxConnections: opts.nbdLimits?.maxConnections,
      maxBytes: opts.nbdLimits?.maxBytes,
      limits: opts.nbdLimits?.maxConnectionBytes ? { maxInFlightBytes: opts.nbdLimits.maxConnectionBytes } : undefined,
    });
    const control = new ControlServer();
    const shim = new Shim(opts, gate, state, server, control, bottom);
    try {
      await server.listenUnix(opts.socket, opts.socketMode ?? 0o600);
      if (opts.tcp) await server.listenTcp(opts.tcp.host, opts.tcp.port);
      control.on('status', () => shim.status());
      await registerMigrationMethods(shim);
      await control.listen(controlSocketFor(opts.socket));
    } catch (e) {
      await shim.stop().catch(() => {});
      throw e;
    }
    return shim;
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
    const file = await prepareShimState(this.opts.statePath, next);
    return {
      commit: async () => {
        await file.commit();
        this.state = next;
      },
      discard: () => file.discard(),
    };
  }

  /** Swap the stack below the gate (gate must be paused) onto a new bottom device. */
  replaceBottom(device: BlockDevice): BlockDevice {
    const old = this.bottomDevice;
    this.gate.swap(new Tracker(device, { kind: this.opts.track, granularity: this.opts.granularity, heat: true }));
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
    if (flushError) throw new Error(`the flush before stopping failed: ${flushError.message}`);
  }
}
