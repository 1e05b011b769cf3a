// The balloon policy as a small state machine, with no I/O: fed one fresh sample of the
// guest's own statistics (virtio-balloon's `guest-stats`) and the balloon's actual size at a
// time, it answers with the next target and the figures behind it. src/balloon/shrink.ts
// drives it through QMP.
//
//   measuring --(second sample: fault and swap-in rates while nothing was taken)--> shrinking
//   shrinking --(free memory beyond the headroom: take all of it)--> shrinking
//             --(no free memory left, caches beyond the headroom: take half of them)--> shrinking
//             --(less than a step left, or the floor reached)--> settled
//   any state --(major faults or swap-in above the rates measured first, available memory
//               under half the headroom, or the balloon stuck above its target)--> backed-off
//
// Why this order: free memory costs the guest nothing to give; caches it must drop, and may
// need again (major faults tell), so they go half at a time. Backing off gives everything back
// at once and stops shrinking for good: the guest samples once a second, and a guest that
// allocates faster than that would run out before a step-wise retreat caught up (more bytes
// to migrate is the only cost). Never below `floor`.
export interface GuestStats {
  /** Host time (s) of the guest's report (QEMU's `last-update`). */
  at: number;
  /** MemTotal: shrinks as the balloon grows. */
  total: number;
  free: number;
  /** MemAvailable: free memory plus what the guest could reclaim without swapping. */
  available: number;
  /** Page cache; null when the guest does not report it (informational only). */
  caches: number | null;
  /** Counters since the guest booted. */
  majorFaults: number;
  /** Bytes swapped in since the guest booted. */
  swapIn: number;
}

export interface BalloonSettings {
  /** Never shrink the guest below this many bytes. */
  floor: number;
  /** Available memory the guest keeps on top of its working set. */
  headroom: number;
  /** Steps smaller than this are not worth a round (bytes). */
  minStep: number;
  /** Major faults per second above the first rate measured that mean "the guest needs it back". */
  faultRate: number;
  /** Swap-in bytes per second above the first rate measured that mean the same. */
  swapInRate: number;
}

export type BalloonState = 'measuring' | 'shrinking' | 'settled' | 'backed-off';

export interface BalloonDecision {
  state: BalloonState;
  /** The balloon's new target (the guest's memory size in bytes), or null: leave it. */
  target: number | null;
  why: string;
  /** What the decision was made from. */
  figures: {
    actual: number; available: number; free: number; caches: number | null;
    majorFaultsPerS: number | null; swapInPerS: number | null;
  };
}

const MiB = 1024 * 1024;

/** Defaults for a guest of `memory` bytes: headroom max(32 MiB, 5%), floor max(64 MiB, 25%). */
export function defaultSettings(memory: number, o: Partial<BalloonSettings> = {}): BalloonSettings {
  return {
    floor: o.floor ?? Math.max(64 * MiB, Math.round(memory / 4 / MiB) * MiB),
    headroom: o.headroom ?? Math.max(32 * MiB, Math.round(memory / 20 / MiB) * MiB),
    minStep: o.minStep ?? 8 * MiB,
    faultRate: o.faultRate ?? 10,
    swapInRate: o.swapInRate ?? 64 * 1024,
  };
}

export class BalloonPolicy {
  state: BalloonState = 'measuring';
  private first: GuestStats | null = null;
  private prev: GuestStats | null = null;
  private baseFaults = 0;
  private baseSwapIn = 0;

  /** `original`: the balloon's size before the policy began; it never asks for more than that. */
  constructor(readonly settings: BalloonSettings, readonly original: number) {}

  /** `stuck`: the last target was not reached and the balloon stopped moving (the guest could not give more). */
  next(s: GuestStats, actual: number, stuck = false): BalloonDecision {
    const { floor, headroom, minStep } = this.settings;
    const prev = this.prev;
    this.prev = s;
    const dt = prev ? Math.max(1, s.at - prev.at) : 0;
    const faults = prev ? Math.max(0, s.majorFaults - prev.majorFaults) / dt : null;
    const swapIn = prev ? Math.max(0, s.swapIn - prev.swapIn) / dt : null;
    const figures = { actual, available: s.available, free: s.free, caches: s.caches, majorFaultsPerS: faults, swapInPerS: swapIn };
    const decide = (state: BalloonState, target: number | null, why: string): BalloonDecision => {
      this.state = state;
      return { state, target, why, figures };
    };

    if (this.state === 'measuring' && !this.first) {
      this.first = s;
      return decide('measuring', null, 'first sample: measuring the fault and swap-in rates before taking anything');
    }
    if (this.state === 'measuring') {
      this.baseFaults = faults ?? 0;
      this.baseSwapIn = swapIn ?? 0;
    } else {
      const pressure =
        faults !== null && faults > this.baseFaults + this.settings.faultRate ? `${faults.toFixed(1)} major faults/s (was ${this.baseFaults.toFixed(1)})`
        : swapIn !== null && swapIn > this.baseSwapIn + this.settings.swapInRate ? `swap-in at ${Math.round(swapIn)} B/s (was ${Math.round(this.baseSwapIn)})`
        : s.available < headroom / 2 ? `only ${mib(s.available)} available (headroom ${mib(headroom)})`
        : stuck ? 'the balloon stopped above its target: the guest could not give more'
        : null;
      if (pressure) {
        const target = this.original;
        return decide('backed-off', target > actual ? target : null, `backing off: ${pressure}; giving ${mib(Math.max(0, target - actual))} back`);
      }
    }
    if (this.state === 'settled' || this.state === 'backed-off') return decide(this.state, null, 'holding');

    const freeSpare = s.free - headroom;
    const spare = s.available - headroom;
    let take: number, what: string;
    if (freeSpare >= minStep) { take = freeSpare; what = `free memory beyond the headroom (${mib(s.free)} free)`; }
    else if (spare >= 2 * minStep) { take = spare / 2; what = `half of what the guest could reclaim beyond the headroom (${mib(s.available)} available, ${s.caches === null ? '?' : mib(s.caches)} of caches)`; }
    else return decide('settled', null, `working set plus headroom reached (${mib(s.available)} available)`);
    const target = Math.max(floor, Math.floor((actual - take) / MiB) * MiB);
    if (actual - target < minStep) return decide('settled', null, `the floor (${mib(floor)}) is reached`);
    return decide('shrinking', target, `taking ${mib(actual - target)}: ${what}`);
  }
}

export function mib(n: number): string {
  return `${Math.round(n / MiB)} MiB`;
}
