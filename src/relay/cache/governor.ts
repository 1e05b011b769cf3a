// Whether the memory cache should compress right now. Compressing only pays while the link is
// the bottleneck: it then carries `ratio` times more of QEMU's stream. When the link keeps up
// with QEMU's raw stream (a fast link), compressing just spends CPU the guest and QEMU want.
//
// Every window (500 ms) it measures:
//   E  the encoder's speed while compressing (QEMU bytes per second of encoding time);
//   L  the link's speed, from the windows in which bytes waited for it (busy: the backlog above
//      BUSY in more than half of the samples, one at the window's start and one per encode call;
//      or, where the link says how long its send window held its writer (`heldMs`), held for
//      more than half the window): what the link took = written - growth of the backlog. (Both ends of the window above BUSY was the rule
//      before: the send window holds the backlog near BUSY, and on the 50 MiB/s WAN two samples
//      at the ends read busy in almost no window though the link carried its limit, and the
//      governor passed the stream through. The samples alone are biased too: the encoder runs
//      right after the link drained, when the backlog is lowest.)
// and decides: compressing while the link is busy -> keep on (link-bound: compression wins).
// Compressing while the link waits for us -> raw instead if the link is known to be faster
// than the encoder (or not known yet: probe it raw). Raw while the link is busy -> compress
// again if the encoder is faster than the link (or not measured yet).
//
// The encoder's speed is a wall-clock figure, and on a loaded machine (or in its first window:
// JIT, the first slots' page faults) it can read 10x low (14 MB/s, then 139 MB/s in the next
// migration, seen in `npm run bench -- memory-cache` at load 14). So the first compressing
// window is not measured, and a figure that kept compression off for REPROBE_MS while the link
// was busy is forgotten: the next window compresses again and measures anew.
//
// The encoder and link figures can both say "compress" while compressing still moves QEMU's
// stream slower: the limit may be the destination (its decoder costs more CPU than passing
// through) or a CPU both ends share with the guest. So it also measures the outcome: how much of
// QEMU's stream each mode carried per second (C and R; the first window of each mode is left
// out: the other mode's backlog still drains in it, or at the start the encoder is cold). In
// every window, not only the busy ones: compressing on a link that is the limit makes it not
// busy (it then carries ~4x the stream), so C was seldom measured where it mattered, and on a
// loaded host the link reads busy when the destination is slow to take the bytes, where
// compressing (the decoder's CPU) carries less, seen at 3-30 MB/s against 20-50 raw.
// When compressing carried less than 0.9 x what raw did, it goes raw and stays raw until the
// figures are forgotten (REPROBE_MS, as above). Seen: compressing carried 19 MB/s of QEMU's
// stream where the plain relay carried 33 (docs/performance.md, 2026-12-01 16:05).
//
// Turned down for good: raw while the link keeps up (never busy) for THROUGH_MS means the link
// is not the limit, and compressing cannot win time there; the encoder then stops following
// QEMU's records and passes whole chunks through (`through`; docs/memory-migration.md). A busy
// window ends it (the governor's rules above may turn compression on again).
// Above what the link's send window lets out on a 50 MiB/s WAN (rate x >= 50 ms, at least 2 MiB: src/link/window.ts).
export const BUSY = 6 * 1024 * 1024;
const WINDOW_MS = 500;
export const REPROBE_MS = 5000;
export const THROUGH_MS = 2000;

/** One window as the governor saw it: for the log, and to judge its choices afterwards. */
export interface GovernorWindow {
  /** Milliseconds since the governor started; the window's length. */
  at: number;
  ms: number;
  /** Compressing during the window; QEMU bytes in, link bytes out, encoding time, backlog at its end. */
  compressing: boolean;
  /** Passing chunks through unparsed during the window (turned down for good). */
  through: boolean;
  in: number;
  out: number;
  encMs: number;
  backlog: number;
  /** What it chose for the next window. */
  next: boolean;
}
const MAX_WINDOWS = 600; // 5 minutes of windows

export class Governor {
  readonly windows: GovernorWindow[] = [];
  private readonly start = performance.now();
  compressing = true;
  changes = 0;
  /** Bytes per second; null until measured. */
  encoderRate: number | null = null;
  linkRate: number | null = null;
  /** QEMU bytes per second carried, compressing and raw (first window of a mode left out); null until measured. */
  carried: { compressing: number | null; raw: number | null } = { compressing: null, raw: null };
  private sinceSwitch = 0;
  private t0 = performance.now();
  private backlog0: number;
  private written = 0;
  private qemuIn = 0;
  private encIn = 0;
  private encMs = 0;
  private warm = false;
  private rawSince = 0;
  /** This window's samples of the backlog, and how many were above BUSY. */
  private samples = 1;
  private busySamples = 0;
  /** Since when every window was raw with the link keeping up; null: not so now. */
  private quietRawSince: number | null = null;
  /** Raw, and the link kept up with QEMU's raw stream for THROUGH_MS: pass chunks through unparsed. */
  through = false;

  private held0: number;

  constructor(private readonly backlog: () => number, private readonly reprobeMs = REPROBE_MS, private readonly throughMs = THROUGH_MS, private readonly heldMs: () => number = () => 0) {
    this.backlog0 = backlog();
    this.held0 = heldMs();
    if (this.backlog0 > BUSY) this.busySamples = 1;
  }

  /** Account one encode call: QEMU bytes in, link bytes out, time spent; returns whether to compress next. */
  account(bytesIn: number, bytesOut: number, ms: number): boolean {
    this.written += bytesOut;
    this.qemuIn += bytesIn;
    if (this.compressing) { this.encIn += bytesIn; this.encMs += ms; }
    const now = performance.now();
    const dt = now - this.t0;
    const b1 = this.backlog();
    this.samples++;
    if (b1 > BUSY) this.busySamples++;
    if (dt < WINDOW_MS) return this.compressing;
    const held = this.heldMs();
    const busy = this.busySamples * 2 > this.samples || (held - this.held0) * 2 > dt;
    this.held0 = held;
    if (busy) this.linkRate = Math.max(0, (this.written - (b1 - this.backlog0)) / (dt / 1000));
    if (this.compressing && this.encMs > 50) {
      if (this.warm) this.encoderRate = this.encIn / (this.encMs / 1000);
      this.warm = true;
    }
    this.sinceSwitch++;
    // Not the first window of a mode (the other mode's backlog drains; at the start, the encoder is cold).
    if (this.sinceSwitch > 1 || (this.changes === 0 && !this.compressing)) {
      const rate = this.qemuIn / (dt / 1000);
      const k = this.compressing ? 'compressing' : 'raw';
      const old = this.carried[k];
      this.carried[k] = old === null ? rate : (old + rate) / 2;
    }
    if (!this.compressing && busy && now - this.rawSince > this.reprobeMs) { this.encoderRate = null; this.carried.compressing = null; }
    const { compressing: c, raw: r } = this.carried;
    const carriesLess = c !== null && r !== null && c < r * 0.9;
    const was = this.compressing, wasThrough = this.through;
    let want = this.compressing;
    if (this.compressing && !busy) want = !carriesLess && this.linkRate !== null && this.encoderRate !== null && this.encoderRate > this.linkRate * 1.1;
    else if (this.compressing && busy) want = !carriesLess;
    else if (!this.compressing && busy) want = !carriesLess && (this.encoderRate === null || this.encoderRate > this.linkRate! * 1.1);
    if (want !== this.compressing) {
      this.compressing = want;
      this.changes++;
      this.sinceSwitch = 0;
      if (!want) this.rawSince = now;
    }
    if (!was && !busy) this.quietRawSince ??= this.t0;
    else this.quietRawSince = null;
    this.through = !this.compressing && this.quietRawSince !== null && now - this.quietRawSince >= this.throughMs;
    if (this.windows.length === MAX_WINDOWS) this.windows.shift();
    this.windows.push({ at: Math.round(this.t0 - this.start), ms: Math.round(dt), compressing: was, through: wasThrough, in: this.qemuIn, out: this.written, encMs: Math.round(this.encMs), backlog: b1, next: this.compressing });
    this.t0 = now;
    this.backlog0 = b1;
    this.samples = 1;
    this.busySamples = b1 > BUSY ? 1 : 0;
    this.qemuIn = 0;
    this.written = 0;
    this.encIn = 0;
    this.encMs = 0;
    return this.compressing;
  }
}
