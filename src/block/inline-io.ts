// When FileDevice may make a small write, or a read from the page cache, on the event loop
// (see FileDevice.#writeAll and read).
//
// A buffered 4 KiB write only copies into the page cache; the thread pool's round trip
// around it (a futex wake-up there, an eventfd wake-up back) costs more CPU than the write,
// and while a migration keeps both CPUs busy each wake-up is another wait for a CPU. But a
// write that sleeps in the kernel (dirty-page throttling, a journal or page lock wait)
// holds up the whole event loop, every other request of the guest with it. So inline writes
// get a budget of blocked time that refills at SHARE of real time, up to BURST: a one-off
// wait (118-417 ms measured here, while a destination flush ran) is absorbed, and when the kernel keeps
// making writers sleep the budget runs out and writes go through the thread pool, where they
// wait without holding up the rest, until it has refilled. Reads share the budget; they ask
// for the page cache only (RWF_NOWAIT), so they do not wait for the disk here, and rarely
// sleep at all.

import { TokenBucket } from '../util/token-bucket.ts';

/** Largest request made inline: the guest's 4-64 KiB requests, not bulk I/O. */
export const INLINE_MAX = 64 * 1024;
/** The budget refills at this share of real time: the loop spends at most ~10% blocked. */
export const INLINE_BLOCK_SHARE = 0.1;
/** Most blocked time the budget holds. */
export const INLINE_BLOCK_BURST_MS = 250;

export class InlineBudget {
  /** Milliseconds of blocking the loop may still take; performance.now() time. */
  readonly #budget = new TokenBucket(INLINE_BLOCK_SHARE * 1000, INLINE_BLOCK_BURST_MS, INLINE_BLOCK_BURST_MS, 0);
  #offUntil = 0;
  /** Requests made inline, and how many of them slept. */
  done = 0;
  blocked = 0;

  /** Whether a request of `length` bytes (at most `max`) may be made inline at time `now` (ms). */
  allows(length: number, now: number, max = INLINE_MAX): boolean {
    return length <= max && now >= this.#offUntil;
  }

  /** Account one inline request that ended at `now` and slept for `blockedMs` (0: did not). */
  spent(blockedMs: number, now: number): void {
    this.done++;
    if (blockedMs <= 0) return;
    this.blocked++;
    const left = this.#budget.take(blockedMs, now);
    // Out of budget: the thread pool until it is back to zero.
    if (left < 0) this.#offUntil = now + this.#budget.msToRepay(-left);
  }
}
