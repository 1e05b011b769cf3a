// Human sizes and durations for CLI flags: "64K", "1M", "2GiB", "512"; "50ms", "2s".
const UNITS: Record<string, number> = { '': 1, b: 1, k: 2 ** 10, m: 2 ** 20, g: 2 ** 30, t: 2 ** 40 };

export function parseSize(text: string, what = 'size'): number {
  const m = /^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b)?\s*$/i.exec(String(text));
  if (!m) throw new Error(`${what}: "${text}" is not a size (examples: 4096, 64K, 1M, 2GiB)`);
  const v = Math.round(Number(m[1]) * UNITS[m[2]!.toLowerCase()]!);
  if (!Number.isSafeInteger(v)) throw new Error(`${what}: "${text}" is too large`);
  return v;
}

export function parseDuration(text: string, what = 'duration'): number {
  const m = /^\s*(\d+(?:\.\d+)?)\s*(ms|s|m)?\s*$/i.exec(String(text));
  if (!m) throw new Error(`${what}: "${text}" is not a duration (examples: 50ms, 2s)`);
  const unit = (m[2] ?? 'ms').toLowerCase();
  return Number(m[1]) * (unit === 's' ? 1000 : unit === 'm' ? 60000 : 1);
}

export function formatBytes(n: number): string {
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let i = 0;
  while (Math.abs(n) >= 1024 && i < units.length - 1) {
    n /= 1024;
    i++;
  }
  return `${Number.isInteger(n) ? n : n.toFixed(n < 10 ? 2 : 1)} ${units[i]}`;
}
