// A token bucket for --bandwidth: the copier asks for its bytes before writing them to the
// destination. At most about a quarter second of burst, so a limit holds over short spans.
export class RateLimiter {
  #tokens: number;
  #last = Date.now();
  readonly #burst: number;

  /** `bytesPerSecond` 0 or less means unlimited. */
  constructor(readonly bytesPerSecond: number) {
    this.#burst = Math.max(bytesPerSecond / 4, 64 * 1024);
    this.#tokens = 0;
  }

  get limited(): boolean {
    return this.bytesPerSecond > 0;
  }

  /** Wait until `bytes` may be sent; an abort ends the wait early (the caller checks). */
  async take(bytes: number, signal?: AbortSignal): Promise<void> {
    if (!this.limited) return;
    this.#refill();
    this.#tokens -= bytes;
    // In debt: wait until the debt is paid. Requests larger than the burst still pass, late.
    while (this.#tokens < 0 && !signal?.aborted) {
      const ms = Math.min(250, Math.ceil((-this.#tokens / this.bytesPerSecond) * 1000));
      await new Promise((r) => setTimeout(r, Math.max(1, ms)));
      this.#refill();
    }
  }

  /** Take `bytes` without waiting: the debt is paid by the next `ready()` or `take()`. */
  charge(bytes: number): void {
    if (!this.limited) return;
    this.#refill();
    this.#tokens -= bytes;
  }

  /** Wait until no debt is left (takes nothing). */
  async ready(signal?: AbortSignal): Promise<void> {
    await this.take(0, signal);
  }

  #refill(): void {
    const now = Date.now();
    this.#tokens = Math.min(this.#burst, this.#tokens + ((now - this.#last) / 1000) * this.bytesPerSecond);
    this.#last = now;
  }
}
