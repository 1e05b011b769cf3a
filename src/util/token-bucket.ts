// A token bucket: tokens refill at `perSecond` up to `burst`, and taking may run into debt
// (a negative level) that later refills pay. The caller passes the clock (milliseconds), so
// one bucket serves --bandwidth (bytes, Date.now) and the inline I/O budget (milliseconds
// blocked, performance.now), and tests can drive it.
export class TokenBucket {
  #tokens: number;
  #last: number;

  constructor(readonly perSecond: number, readonly burst: number, initial: number, nowMs: number) {
    this.#tokens = initial;
    this.#last = nowMs;
  }

  /** Tokens at `nowMs`; negative while in debt. */
  level(nowMs: number): number {
    this.#tokens = Math.min(this.burst, this.#tokens + ((nowMs - this.#last) / 1000) * this.perSecond);
    this.#last = nowMs;
    return this.#tokens;
  }

  /** Take `n` tokens at `nowMs`, into debt if need be; returns the level left. */
  take(n: number, nowMs: number): number {
    this.#tokens = this.level(nowMs) - n;
    return this.#tokens;
  }

  /** Milliseconds until a level of `-debt` is back to zero. */
  msToRepay(debt: number): number {
    return (debt / this.perSecond) * 1000;
  }
}
