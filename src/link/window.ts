// How many bytes of one stream may be unacknowledged while the network carries it: the
// link's own measure of its bandwidth x round-trip time, the way BBR sizes TCP's window.
//
// Why not a fixed bound: a large one (32 MiB) lets the writer run far ahead of the network,
// so a QEMU writing its migration stream into the link sees its socket drain at memory
// speed, estimates that as its bandwidth, and stops the guest with megabytes still in
// flight (downtime 2-8x its limit, docs/performance.md); a small one (2 MiB) cut the
// downtime to the limit but throttled a loaded link whose round trip (two node processes and
// sshd between the QEMUs) reached ~100 ms, and doubled the migration's time. This window is
// GAIN x (the highest delivery rate of the last RATE_WINDOW_MS) x (the lowest round trip,
// see RTT_VALID_MS), between a floor and the memory bound: enough to keep the pipe
// full (while the writer is held by the window, the rate it measures is W / RTT, so W grows
// by GAIN each round trip until the rate stops rising), and no more than GAIN round trips of
// bytes in flight beyond that.
const GAIN = 2;
/** Delivery-rate samples are taken over at least this long (acks come per socket read). */
const RATE_SAMPLE_MS = 20;
const RATE_WINDOW_MS = 1000;
/**
 * A round trip measured behind our own queue is longer than the path's, so the window keeps
 * the lowest one seen; once no sample came close to it for this long, it drains the queue
 * (the window at its floor for two round trips, BBR's ProbeRTT) and takes the lowest round
 * trip measured meanwhile. Without that, the lowest of recent samples, all taken behind a
 * full window, doubled the window every time the old minimum expired.
 */
const RTT_VALID_MS = 3000;

export class SendWindow {
  /** The bound now, bytes. */
  bytes: number;
  private probe: { end: number; t: number } | null = null;
  private minRtt = Infinity;
  private minRttAt = 0;
  private lastRtt = 0;
  /** While draining: until when, and the lowest round trip seen meanwhile. */
  private drain: { until: number; min: number } | null = null;
  private rates: Array<{ perMs: number; t: number }> = [];
  private sampleFrom: { acked: number; t: number } | null = null;

  constructor(private readonly floor: number, private readonly ceiling: number) {
    this.bytes = Math.max(floor, Math.min(ceiling, 4 * floor));
  }

  /** Bytes up to `end` went on the network for the first time. */
  onSend(end: number, now: number): void {
    if (!this.probe) this.probe = { end, t: now };
  }

  /** The peer acknowledged everything below `acked`. */
  onAck(acked: number, now: number): void {
    if (this.probe && acked >= this.probe.end) this.rtt(now - this.probe.t, now);
    if (!this.sampleFrom) { this.sampleFrom = { acked, t: now }; return; }
    const dt = now - this.sampleFrom.t;
    if (dt < RATE_SAMPLE_MS) return;
    this.rates.push({ perMs: (acked - this.sampleFrom.acked) / dt, t: now });
    this.sampleFrom = { acked, t: now };
    while (this.rates.length > 1 && now - this.rates[0].t > RATE_WINDOW_MS) this.rates.shift();
    this.update(now);
  }

  /** A new carrier: what was measured on the old one in flight says nothing (a cut stalls every ack). */
  restart(): void {
    this.probe = null;
    this.sampleFrom = null;
  }

  /** Round trip (ms) and rate (bytes/ms) the bound is made of, for stats and tests. */
  measured(): { rttMs: number | null; bytesPerMs: number | null } {
    return { rttMs: Number.isFinite(this.minRtt) ? this.minRtt : null, bytesPerMs: this.rates.length ? Math.max(...this.rates.map((r) => r.perMs)) : null };
  }

  private rtt(ms: number, now: number): void {
    this.probe = null;
    this.lastRtt = ms;
    if (this.drain) this.drain.min = Math.min(this.drain.min, ms);
    // A sample close to the minimum confirms it.
    if (ms <= this.minRtt * 1.1) {
      this.minRtt = Math.min(this.minRtt, ms);
      this.minRttAt = now;
    }
  }

  private update(now: number): void {
    if (!this.drain && Number.isFinite(this.minRtt) && now - this.minRttAt > RTT_VALID_MS) {
      this.drain = { until: now + 2 * this.lastRtt + RATE_SAMPLE_MS, min: Infinity };
    } else if (this.drain && now >= this.drain.until && Number.isFinite(this.drain.min)) {
      this.minRtt = this.drain.min;
      this.minRttAt = now;
      this.drain = null;
    }
    const { rttMs, bytesPerMs } = this.measured();
    if (rttMs === null || bytesPerMs === null) return;
    // A round trip below a millisecond is the timer's resolution, not the path's.
    const want = this.drain ? this.floor : GAIN * bytesPerMs * Math.max(rttMs, 1);
    this.bytes = Math.round(Math.max(this.floor, Math.min(this.ceiling, want)));
  }
}
