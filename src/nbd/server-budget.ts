// The server's budget of payload bytes held across all connections: READ data from the
// device read until the socket has written it, WRITE data from its header until the device
// wrote it. That is the memory a client can make the server hold; a client that sends
// requests and never reads the replies holds it for as long as it likes.
//
// Each connection is also capped on its own (TransmissionLimits.maxConnectionBytes), and the
// number of connections is limited (NbdServerOptions.maxConnections), so what the server
// holds is bounded whatever the clients do:
//  - a request is admitted while the connection's own bytes and the global bytes stay under
//    their limits;
//  - a connection that holds nothing may always take one request of up to RESERVE_BYTES, even
//    past the global limit: clients that hold the budget and never let go cannot starve the
//    others. So the server holds at most limit + connections x RESERVE_BYTES;
//  - a connection refused for the global budget waits (its input paused) and is woken when
//    bytes come back.

/**
 * What a connection holding nothing may always take past the global limit: a guest's or a
 * tool's ordinary request (QEMU's are up to 2 MiB, nbdcopy's 256 KiB) gets through even
 * while other clients hold the whole budget; a larger one waits for the budget.
 */
export const RESERVE_BYTES = 2 * 1024 * 1024;

export class ByteBudget {
  #held = 0;
  readonly #waiting = new Set<() => void>();

  constructor(readonly limit: number) {
    if (!(limit > 0)) throw new Error(`byte budget: limit ${limit} must be positive`);
  }

  /** Bytes held now, across every connection. */
  get held(): number {
    return this.#held;
  }

  /**
   * Take `bytes` for a connection that holds `mine` bytes already, or return false (the
   * caller waits: see wait()).
   */
  take(bytes: number, mine: number): boolean {
    if (this.#held + bytes > this.limit && !(mine === 0 && bytes <= RESERVE_BYTES)) return false;
    this.#held += bytes;
    return true;
  }

  /** Give bytes back and wake the connections that waited for some. */
  give(bytes: number): void {
    if (bytes <= 0) return;
    this.#held -= bytes;
    if (this.#waiting.size === 0) return;
    // Woken after the current call: the caller is in the middle of its own bookkeeping.
    const woken = [...this.#waiting];
    this.#waiting.clear();
    queueMicrotask(() => {
      for (const wake of woken) wake();
    });
  }

  /** Call `wake` once, the next time bytes come back (again with a later wait()). */
  wait(wake: () => void): void {
    this.#waiting.add(wake);
  }

  /** A connection that went away stops waiting. */
  cancel(wake: () => void): void {
    this.#waiting.delete(wake);
  }
}
