// A token bucket for --bandwidth: the copier asks for its bytes before writing them to the
// destination. At most about a quarter second of burst, so a limit holds over short spans.
import { TokenBucket } from '../util/token-bucket.ts';

export class RateLimiter {
  readonly #bucket: TokenBucket;

  /** `bytesPerSecond` 0 or less means unlimited. */
  constructor(readonly bytesPerSecond: number) {
    this.#bucket = new TokenBucket(bytesPerSecond, Math.max(bytesPerSecond / 4, 64 * 1024), 0, Date.now());
  }

  get limited(): boolean {
    return this.bytesPerSecond > 0;
  }

  /** Wait until `bytes` may be sent; an abort ends the wait early (the caller checks). */
  async take(bytes: number, signal?: AbortSignal): Promise<void> {
    if (!this.limited) return;
    let tokens = this.#bucket.take(bytes, Date.now());
    // In debt: wait until the debt is paid. Requests larger than the burst still pass, late.
    while (tokens < 0 && !signal?.aborted) {
      const ms = Math.min(250, Math.ceil(this.#bucket.msToRepay(-tokens)));
      await new Promise((r) => setTimeout(r, Math.max(1, ms)));
      tokens = this.#bucket.level(Date.now());
    }
  }

  /** Take `bytes` without waiting: the debt is paid by the next `ready()` or `take()`. */
  charge(bytes: number): void {
    if (!this.limited) return;
    this.#bucket.take(bytes, Date.now());
  }

  /** Wait until no debt is left (takes nothing). */
  async ready(signal?: AbortSignal): Promise<void> {
    await this.take(0, signal);
  }
}
