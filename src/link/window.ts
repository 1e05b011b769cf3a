// How many bytes of one stream may be unacknowledged while the network carries it: the
// link's own measure of its rate and round trip, the way TCP's autotuning and BBR size theirs.
//
// Why not a fixed bound: a large one (32 MiB) lets the writer run far ahead of the network,
// so a QEMU writing its migration stream into the link sees its socket drain at memory
// speed, estimates that as its bandwidth, and stops the guest with megabytes still in
// flight (downtime 2-8x its limit, docs/performance.md); a small one (2 MiB) cut the
// downtime to the limit but throttled a loaded link whose round trip (two node processes and
// sshd between the QEMUs) reached ~100 ms, and doubled the migration's time. This window is
// (the highest delivery rate of the last RATE_WINDOW_MS) x max(BUDGET_MS, GAIN x the typical
// round trip), between a floor and the memory bound. While the writer is held by the window
// the rate it measures is W / round trip, so W grows each round trip until the rate stops
// rising; then the bytes in flight are about max(BUDGET_MS, GAIN round trips) at the path's
// rate: what QEMU's downtime may grow by. The typical round trip is the median of those
// sampled with little in flight (see CLEAN_IN_FLIGHT and typicalRtt): on this loaded 2-core
// machine the lowest was 1-2 ms and the median 20-90 ms, so BBR's bandwidth x lowest round
// trip sat at the floor and throttled the link (measured: docs/performance.md).
/** Bytes in flight the window allows at least, as time at the measured rate. */
const BUDGET_MS = 50;
/**
 * Round trips of headroom over the typical one: the typical round trip is measured without our
 * own queue, so 1 would fill the pipe on average; 2 let a loaded TLS run (median round trip
 * 160 ms) hold 13 MiB in flight and took 1.1 s of downtime.
 */
const GAIN = 1.5;
/**
 * Delivery-rate samples are taken over at least this long: acks come in bursts (per event-loop
 * turn, and a process that waited for a CPU acknowledges all it read at once), and 20 ms
 * samples measured 125 MiB/s where the migration moved ~100 MiB in 3.6-7.7 s. QEMU too
 * measures its bandwidth over 100 ms.
 */
const RATE_SAMPLE_MS = 100;
const RATE_WINDOW_MS = 1000;
/**
 * A round trip is sampled only for a frame sent while little was in flight before it (at most
 * half the floor): one measured behind our own queue is the queue's, and taking those fed
 * the window back into itself (W = 2 x rate x round trip, the round trip W / rate: doubled
 * every round trip, seen in the unit test of a slow reader).
 */
const CLEAN_IN_FLIGHT = 0.5;

export class SendWindow {
  /** The bound now, bytes. */
  bytes: number;
  private probe: { end: number; t: number } | null = null;
  /** The lowest round trip sampled on this carrier, ms. */
  private minRtt = Infinity;
  /** The last 64 round trips sampled: their median is the typical one. */
  private recent: number[] = [];
  private rates: Array<{ perMs: number; t: number }> = [];
  private sampleFrom: { acked: number; t: number } | null = null;

  constructor(private readonly floor: number, private readonly ceiling: number) {
    // Until the first rate sample: twice the floor (4 MiB by default, the fixed network window this replaced).
    this.bytes = Math.max(floor, Math.min(ceiling, 2 * floor));
  }

  /** Bytes up to `end` went on the network for the first time, with `before` unacknowledged ahead of them. */
  onSend(end: number, now: number, before: number): void {
    if (!this.probe && before <= CLEAN_IN_FLIGHT * this.floor) this.probe = { end, t: now };
  }

  /** The peer acknowledged everything below `acked`. */
  onAck(acked: number, now: number): void {
    if (this.probe && acked >= this.probe.end) {
      const ms = now - this.probe.t;
      this.probe = null;
      this.minRtt = Math.min(this.minRtt, ms);
      this.recent.push(ms);
      if (this.recent.length > 64) this.recent.shift();
    }
    if (!this.sampleFrom) { this.sampleFrom = { acked, t: now }; return; }
    const dt = now - this.sampleFrom.t;
    if (dt < RATE_SAMPLE_MS) return;
    this.rates.push({ perMs: (acked - this.sampleFrom.acked) / dt, t: now });
    this.sampleFrom = { acked, t: now };
    while (this.rates.length > 1 && now - this.rates[0].t > RATE_WINDOW_MS) this.rates.shift();
    const rate = this.rate();
    const rtt = this.typicalRtt();
    const want = rate * Math.max(BUDGET_MS, rtt === null ? 0 : GAIN * rtt);
    this.bytes = Math.round(Math.max(this.floor, Math.min(this.ceiling, want)));
  }

  /** A new carrier (perhaps another path): what was measured in flight on the old one says nothing. */
  restart(): void {
    this.probe = null;
    this.sampleFrom = null;
    this.minRtt = Infinity;
  }

  /** What the window is made of, for the link's stats: the bound, the lowest and the median round trip sampled, the rate. */
  stats(): { bytes: number; minRttMs: number | null; medianRttMs: number | null; mibps: number | null } {
    const sorted = [...this.recent].sort((a, b) => a - b);
    return {
      bytes: this.bytes, minRttMs: Number.isFinite(this.minRtt) ? this.minRtt : null, medianRttMs: sorted.length ? sorted[sorted.length >> 1] : null,
      mibps: this.rates.length ? Math.round((this.rate() * 1000) / (1024 * 1024)) : null,
    };
  }

  /**
   * The median of the recent round trips sampled with little in flight (at least 3 of them):
   * not the lowest, which on a loaded machine was 1-2 ms against a typical 20-90 ms (every hop
   * a process waiting for a CPU), so a window sized from it throttled the link; not one
   * sample, which was once 1.2 s.
   */
  private typicalRtt(): number | null {
    if (this.recent.length < 3) return null;
    const sorted = [...this.recent].sort((a, b) => a - b);
    return sorted[sorted.length >> 1];
  }

  private rate(): number {
    let best = 0;
    for (const r of this.rates) best = Math.max(best, r.perMs);
    return best;
  }
}
