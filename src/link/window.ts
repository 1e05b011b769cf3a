// How many bytes of one stream may be unacknowledged while the network carries it: the
// link's own measure of its bandwidth x round-trip time, the way BBR sizes TCP's window.
//
// Why not a fixed bound: a large one (32 MiB) lets the writer run far ahead of the network,
// so a QEMU writing its migration stream into the link sees its socket drain at memory
// speed, estimates that as its bandwidth, and stops the guest with megabytes still in
// flight (downtime 2-8x its limit, docs/performance.md); a small one (2 MiB) cut the
// downtime to the limit but throttled a loaded link whose round trip (two node processes and
// sshd between the QEMUs) reached ~100 ms, and doubled the migration's time. This window is
// GAIN x (the highest delivery rate of the last RATE_WINDOW_MS) x (the lowest round trip of
// the last RTT_WINDOW_MS), between a floor and the memory bound: enough to keep the pipe
// full (while the writer is held by the window, the rate it measures is W / RTT, so W grows
// by GAIN each round trip until the rate stops rising), and no more than GAIN round trips of
// bytes in flight beyond that.
const GAIN = 2;
/** Delivery-rate samples are taken over at least this long (acks come per socket read). */
const RATE_SAMPLE_MS = 20;
const RATE_WINDOW_MS = 1000;
/** A round trip measured under our own queue is higher than the path's: keep the lowest recent one. */
const RTT_WINDOW_MS = 2000;

export class SendWindow {
  /** The bound now, bytes. */
  bytes: number;
  private probe: { end: number; t: number } | null = null;
  private rtts: Array<{ ms: number; t: number }> = [];
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
    if (this.probe && acked >= this.probe.end) {
      this.rtts.push({ ms: now - this.probe.t, t: now });
      this.probe = null;
    }
    if (!this.sampleFrom) { this.sampleFrom = { acked, t: now }; return; }
    const dt = now - this.sampleFrom.t;
    if (dt < RATE_SAMPLE_MS) return;
    this.rates.push({ perMs: (acked - this.sampleFrom.acked) / dt, t: now });
    this.sampleFrom = { acked, t: now };
    this.update(now);
  }

  /** A new carrier: what was measured on the old one in flight says nothing (a cut stalls every ack). */
  restart(): void {
    this.probe = null;
    this.sampleFrom = null;
  }

  /** Round trip (ms) and rate (bytes/ms) the bound is made of, for stats and tests. */
  measured(): { rttMs: number | null; bytesPerMs: number | null } {
    return { rttMs: this.rtts.length ? Math.min(...this.rtts.map((r) => r.ms)) : null, bytesPerMs: this.rates.length ? Math.max(...this.rates.map((r) => r.perMs)) : null };
  }

  private update(now: number): void {
    while (this.rtts.length > 1 && now - this.rtts[0].t > RTT_WINDOW_MS) this.rtts.shift();
    while (this.rates.length > 1 && now - this.rates[0].t > RATE_WINDOW_MS) this.rates.shift();
    const { rttMs, bytesPerMs } = this.measured();
    if (rttMs === null || bytesPerMs === null) return;
    // A round trip below a millisecond is the timer's resolution, not the path's.
    const want = GAIN * bytesPerMs * Math.max(rttMs, 1);
    this.bytes = Math.round(Math.max(this.floor, Math.min(this.ceiling, want)));
  }
}
