// What attach/detach need from whoever runs shims: start one on a file, ask where its disk
// lives now, stop it. Two implementations: DirectShims (spawns `vmshift serve` itself) and,
// once vmshiftd is there, the daemon (`shim.start` / `shim.stop` / `shim.list`).

export interface StartedShim {
  /** Unix socket QEMU's nbd node connects to. */
  socket: string;
  exportName: string;
  /** The file the shim serves (what it was started on). */
  backing: string;
}

export interface ShimStarter {
  /** Start a shim named `name` serving `source` (an absolute file path); ready when it resolves. */
  start(name: string, source: string): Promise<StartedShim>;
  /** Where the shim's disk lives NOW: a storage migration may have moved it. */
  backing(name: string): Promise<string>;
  /** Stop the shim (it flushes first); a shim that is not running is not an error. */
  stop(name: string): Promise<void>;
}

/** Shim and node names become file and node names: keep them short and plain. */
export function safeName(s: string, max = 48): string {
  const clean = s.replace(/[^A-Za-z0-9._-]+/g, '-').replace(/^[^A-Za-z0-9]+/, '').slice(0, max);
  return clean || 'x';
}
