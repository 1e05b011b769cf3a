// Node allocates a new buffer (up to 64 KiB) for every socket read, and V8 frees it only at a
// garbage collection, which it starts for such off-heap memory only after ~64 MiB more of it.
// A client writing 1 MiB blocks sends about 1 GB/s: tens of MiB of dead read buffers piled up
// between collections, the largest part of the shim's peak RSS. Where the process has gc()
// (`vmshift serve`: bin/vmshift runs node with --expose-gc), a young-generation collection
// after every GC_EVERY_BYTES received frees them early; it is cheap (well under a millisecond
// here, where few young objects are alive). Without gc() (tests, other embedders) this does
// nothing. Sockets the server reads in direct mode (Wire.adopt: plain unix and TCP) allocate
// no read buffers and are not counted; this is for the rest (TLS, and Node without `onread`).
type Gc = (opts?: { type?: 'minor' | 'major'; execution?: 'sync' | 'async' }) => void;

const gc = (globalThis as { gc?: Gc }).gc;
export const GC_EVERY_BYTES = 8 * 1024 * 1024;
let received = 0;

/** Count bytes read from a socket; collect the young generation every GC_EVERY_BYTES. */
export function noteReceived(bytes: number): void {
  if (!gc) return;
  received += bytes;
  if (received >= GC_EVERY_BYTES) {
    received = 0;
    gc({ type: 'minor' });
  }
}
