// What a migration job needs of the disk it moves, and nothing more: the gate it drains,
// the device at the bottom, one claim at a time, and a new backing it prepares outside the
// stall and commits inside it. A Shim (src/shim/shim.ts) is one; so is anything else that
// serves a disk through a gate (a test's stand-in, later a disk vmshiftd serves itself).
// The job never sees the NBD server, the control socket or the state file behind this.
import type { BlockDevice } from '../block/device.ts';
import type { Gate } from '../block/gate.ts';

/** A new backing written durably but not in effect: commit() makes it the record, discard() drops it. */
export interface PreparedBacking {
  commit(): Promise<void>;
  discard(): Promise<void>;
}

export interface MovableDisk {
  /** How the disk is named in messages (the shim's NBD socket). */
  readonly label: string;
  /** The disk's own durable record; the job keeps its journal beside it (journal.ts). */
  readonly statePath: string;
  readonly readOnly: boolean;
  /** The disk's own tracking grain: the job never tracks coarser. */
  readonly granularity: number;
  /** The drain point on top of the stack: jobs change what is below it only while it is paused. */
  readonly gate: Gate;
  /** The device the disk lives on now. */
  readonly bottom: BlockDevice;
  /** Its spec (path or NBD URI), as recorded. */
  readonly backing: string;
  /** Sockets the disk is served on (a destination that is one of them would be itself). */
  readonly sockets: readonly string[];
  /** One job at a time: throws a ControlError('busy') when another holds it; returns the release. */
  claim(job: string): () => void;
  /** Lock `spec` and write the state naming it as the backing, synced, not yet in place. */
  prepareBacking(spec: string): Promise<PreparedBacking>;
  /** Gate paused and drained: put the disk's own stack back on top of `device`; returns the old bottom. */
  replaceBottom(device: BlockDevice): BlockDevice;
}
