// The switch-over strategy "hand over to the peer's shim": the destination is the shim on
// the peer host (reached over the link), which already holds every acknowledged write (the
// job held a synchronized mirror until the memory phase ended). At the commit the disk
// becomes the peer's; this shim stops serving it: every request after that is refused with
// ESHUTDOWN, naming where the disk went, so a QEMU left behind on this host (postmigrate,
// about to be quit) can never write to the old copy or read a stale one.
// Nothing is recorded here: the source file stays as the guest left it (the disk's record on
// the peer is the peer shim's own state file). Restarting this shim serves the source file
// again, which is safe only because the guest runs on the peer: vmshiftd-owned moves record
// the move in the registry (the libvirt path's part, docs/architecture.md).
import { BlockError, type BlockDevice, type DeviceCaps, type Extent } from '../block/device.ts';
import type { Destination } from './destination.ts';
import type { MovableDisk } from './disk.ts';
import type { Handover } from './switchover.ts';

/** A bottom device that refuses everything: the disk moved to `peer`. */
export class MovedDevice implements BlockDevice {
  readonly name: string;
  constructor(readonly size: number, readonly caps: DeviceCaps, readonly peer: string) {
    this.name = `moved to ${peer}`;
  }
  #refuse(): Promise<never> {
    return Promise.reject(new BlockError('ESHUTDOWN', `the disk moved to ${this.peer}: this host no longer serves it`));
  }
  read(): Promise<Buffer> { return this.#refuse(); }
  write(): Promise<void> { return this.#refuse(); }
  writeZeroes(): Promise<void> { return this.#refuse(); }
  trim(): Promise<void> { return this.#refuse(); }
  flush(): Promise<void> { return this.#refuse(); }
  blockStatus(): Promise<Extent[]> { return this.#refuse(); }
  cache(): Promise<void> { return this.#refuse(); }
  async close(): Promise<void> {}
}

export function handOverToPeer(disk: MovableDisk, dest: Destination, peer: string): Handover {
  return {
    kind: 'peer-handover',
    prepare: async () => {},
    // The commit point is the flushed destination: the peer's shim has every write.
    commit: async () => {},
    apply: () => {
      const old = disk.replaceBottom(new MovedDevice(disk.gate.size, disk.gate.caps, peer));
      // The link's NBD connection is no longer needed once the peer holds the disk.
      void dest.device.close().catch(() => {});
      return old;
    },
    discard: async () => {},
  };
}
