// A guest's virtio-balloon through QMP: find the device, turn its statistics on, read them,
// set the target. QEMU's side of it: `query-balloon` (the actual size), `balloon {value}`
// (the target, in bytes of guest memory), and on the device's QOM object the properties
// `guest-stats-polling-interval` (seconds; 0 = off, the default) and `guest-stats` (the last
// report: `stats` by name and `last-update`). What the guest does not report is -1, which
// QEMU prints as an unsigned 64-bit number (18446744073709551615): anything that is not a
// safe integer counts as "not reported".
import { QmpError, type QmpTransport } from '../qemu/transport.ts';
import type { GuestStats } from './policy.ts';

export class BalloonError extends Error {
  constructor(readonly code: 'no-balloon' | 'no-stats' | 'not-running', message: string) {
    super(message);
    this.name = 'BalloonError';
  }
}

interface RawStats { stats?: Record<string, number>; 'last-update'?: number }

/** What the policy needs; the guest must report all of these (Linux does since 4.6). */
const REQUIRED = ['stat-total-memory', 'stat-free-memory', 'stat-available-memory', 'stat-major-faults', 'stat-swap-in'] as const;

export class GuestBalloon {
  private savedInterval: number | null = null;

  private constructor(readonly qmp: QmpTransport, readonly path: string, readonly peer: string) {}

  /** The guest's balloon device and its actual size when found; BalloonError('no-balloon') when it has none. */
  static async find(qmp: QmpTransport, peer: string): Promise<{ balloon: GuestBalloon; actual: number }> {
    const actual = await queryActual(qmp, peer);
    // Devices with an id sit under /machine/peripheral, the others under peripheral-anon.
    for (const dir of ['/machine/peripheral', '/machine/peripheral-anon']) {
      const entries = await qmp.execute<Array<{ name: string; type: string }>>('qom-list', { path: dir }).catch(() => []);
      const hit = entries.find((e) => /^child<virtio-balloon/.test(e.type));
      if (hit) return { balloon: new GuestBalloon(qmp, `${dir}/${hit.name}`, peer), actual };
    }
    throw new BalloonError('no-balloon', `${peer}: QEMU has a balloon, but no virtio-balloon device under /machine/peripheral*: cannot read its statistics`);
  }

  /** The balloon's actual size: the memory the guest has, in bytes. */
  actual(): Promise<number> {
    return queryActual(this.qmp, this.peer);
  }

  async setTarget(bytes: number): Promise<void> {
    await this.qmp.execute('balloon', { value: bytes });
  }

  /** Ask the guest for statistics every `seconds`; `restoreInterval` puts the old value back. */
  async enableStats(seconds: number): Promise<void> {
    const old = await this.qmp.execute<number>('qom-get', { path: this.path, property: 'guest-stats-polling-interval' });
    if (this.savedInterval === null) this.savedInterval = old;
    if (old !== seconds) await this.qmp.execute('qom-set', { path: this.path, property: 'guest-stats-polling-interval', value: seconds });
  }

  async restoreInterval(): Promise<void> {
    if (this.savedInterval === null) return;
    await this.qmp.execute('qom-set', { path: this.path, property: 'guest-stats-polling-interval', value: this.savedInterval });
    this.savedInterval = null;
  }

  /** The last report as QEMU keeps it: every stat by name (-1 = not reported) and its time. */
  async rawStats(): Promise<{ stats: Record<string, number>; lastUpdate: number }> {
    const r = await this.qmp.execute<RawStats>('qom-get', { path: this.path, property: 'guest-stats' });
    return { stats: r.stats ?? {}, lastUpdate: r['last-update'] ?? 0 };
  }

  /** The guest's last report if it is newer than `after` (host seconds) and complete; else null. */
  async stats(after = 0): Promise<GuestStats | null> {
    const { stats, lastUpdate } = await this.rawStats();
    if (lastUpdate <= after) return null;
    const missing = REQUIRED.filter((k) => !reported(stats[k]));
    if (missing.length) throw new BalloonError('no-stats', `${this.peer}: the guest's balloon driver does not report ${missing.join(', ')}`);
    const caches = stats['stat-disk-caches'];
    return {
      at: lastUpdate, total: stats['stat-total-memory']!, free: stats['stat-free-memory']!, available: stats['stat-available-memory']!,
      caches: reported(caches) ? caches! : null, majorFaults: stats['stat-major-faults']!, swapIn: stats['stat-swap-in']!,
    };
  }

  /** Whether the guest's driver gives pages back on its own when it runs out (virtio's deflate-on-oom). */
  async deflatesOnOom(): Promise<boolean> {
    return this.qmp.execute<boolean>('qom-get', { path: this.path, property: 'deflate-on-oom' }).catch(() => false);
  }

  /** A report newer than `after`, waiting up to `timeoutMs`; BalloonError('no-stats') when none comes. */
  async freshStats(after: number, timeoutMs: number): Promise<GuestStats> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const s = await this.stats(after);
      if (s) return s;
      if (Date.now() > deadline) {
        throw new BalloonError('no-stats', `${this.peer}: the guest reports no memory statistics (no report within ${Math.round(timeoutMs / 1000)} s of asking: is its virtio_balloon driver loaded?)`);
      }
      await new Promise((r) => setTimeout(r, 200));
    }
  }
}

/** `query-balloon`'s actual size; BalloonError('no-balloon') when QEMU has no balloon device. */
async function queryActual(qmp: QmpTransport, peer: string): Promise<number> {
  try {
    return (await qmp.execute<{ actual: number }>('query-balloon')).actual;
  } catch (e) {
    if (e instanceof QmpError && e.errorClass === 'DeviceNotActive') {
      throw new BalloonError('no-balloon', `${peer}: the guest has no balloon device (QEMU: -device virtio-balloon-pci,id=balloon0; libvirt: <memballoon model='virtio'/>)`);
    }
    throw e;
  }
}

/** A statistic the guest reported: -1 arrives as 2^64-1, which is no safe integer. */
export function reported(v: unknown): boolean {
  return typeof v === 'number' && Number.isSafeInteger(v) && v >= 0;
}
