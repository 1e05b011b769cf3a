// The disks' conversation between the two hosts of a move: JSON lines on the link's `disks`
// stream (src/relay/control.ts carries them), and one link stream per NBD connection
// (`nbd:<disk>:<n>`), which the peer connects to the shim serving that disk there.
//   source -> peer: prepare (create the thin files, start their shims), await-socket (tell
//                   me when a unix socket there accepts connections, e.g. the destination
//                   QEMU's QMP), commit (the peer's shims are the disks now), abort
//   peer -> source: prepared, present, committed, aborted, error (with a code)
export const DISKS_STREAM = 'disks';
export const nbdStreamName = (disk: string, n: number) => `nbd:${disk}:${n}`;
export const NBD_STREAM_RE = /^nbd:([A-Za-z0-9_.-]{1,64}):\d+$/;
export const DISK_NAME_RE = /^[A-Za-z0-9_.-]{1,64}$/;

export interface DiskToPrepare {
  /** Names the disk in streams and messages (the source's device name, e.g. vda). */
  name: string;
  size: number;
  /** Bytes the source has allocated: the peer's datastore must have that much free. */
  allocated: number;
  /** The new file on the peer (must not exist; inside one of the peer's datastores). */
  path: string;
  /** Where the peer's shim serves it (the path the destination QEMU connects to). */
  socket: string;
}

export type DisksMsg =
  /** domainXml (the libvirt path): the domain as it will be defined on the peer; each disk's shim is then the one its hook starts, through the peer's vmshiftd. */
  | { op: 'prepare'; disks: DiskToPrepare[]; domainXml?: string }
  | { op: 'await-socket'; path: string; timeoutMs: number }
  | { op: 'commit' }
  | { op: 'abort'; reason: string }
  | { op: 'prepared'; disks: Array<{ name: string; path: string; socket: string; pid: number }> }
  | { op: 'present'; path: string }
  | { op: 'committed' }
  | { op: 'aborted' }
  | { op: 'error'; code: string; message: string };
