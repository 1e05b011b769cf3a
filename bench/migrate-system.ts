// What the storage-migration bench needs from each system it compares: serve a disk over
// NBD (fio writes through that export), then move it to a destination file while fio runs.

export interface JobSpec {
  /** Destination raw file (does not exist yet: each system creates it as it normally would). */
  dest: string;
  /** Disk size in bytes. */
  size: number;
  /** Copy rate limit, bytes/s; 0 for none. */
  bandwidth: number;
  /** Give up after this long (cancel the job, report "did not converge"). */
  capMs: number;
}

export interface JobOutcome {
  /** False when the job hit the cap and was cancelled, or failed (see `error`). */
  converged: boolean;
  /** The job's span in unix ms: fio latencies are taken from I/Os completing inside it. */
  startMs: number;
  endMs: number;
  /** Bytes the job wrote to the destination by its own count (re-copies and mirrored writes included). */
  bytesToDest: number;
  /** Copy passes ("-" where the system has no such notion). */
  passes: string;
  /** vmshift: guest I/O stall at the switch-over; QEMU: job-complete to job concluded. */
  switchMs: number;
  error?: string;
}

export interface Served {
  /** NBD URI fio writes through. */
  uri: string;
  /** The process that writes both source and destination (its /proc/PID/io cross-checks the bytes). */
  pid: number;
  migrate(spec: JobSpec): Promise<JobOutcome>;
  stop(): Promise<void>;
}

export interface MigrateSystem {
  /** "QEMU" or "vmshift". */
  system: string;
  /** Copy mode: QEMU's copy-mode or vmshift's --mode. */
  mode: string;
  /** Serve `source` from a process of its own, with sockets under `dir`. */
  start(dir: string, source: string): Promise<Served>;
}
