// How a migration job's events reach the operator, for both forms of migrate-storage: a
// progress bar on a terminal (stderr), JSON lines with --json or when stderr is not a
// terminal, and plain "what it is doing / waiting for" notes in between.
import cliProgress from 'cli-progress';
import { formatBytes } from '../util/size.ts';
import { printJson } from './output.ts';
import type { JobFigures } from '../migrate/context.ts';

export interface JobView {
  onEvent(event: string, data: unknown): void;
  /** A line about what the command waits for now (a terminal line, or a `note` JSON event). */
  note(text: string): void;
  stop(): void;
}

/** Smoothing of the rate the bar shows when the job reports none yet (first pass). */
const RATE_WEIGHT = 0.3;

export interface BarFields {
  total: number;
  done: number;
  payload: { phase: string; pass: number; pct: number; copied: string; rate: string; dirty: string; left: string };
}

/**
 * What the bar shows for each progress event. The job's rate covers its previous pass (0 in
 * the first): then the rate is measured here from bytesCopied, and the ETA follows from it.
 */
export function barFields(): (f: Partial<JobFigures>, now: number) => BarFields {
  let last: { t: number; bytes: number } | null = null;
  let measured = 0;
  return (f, now) => {
    const bytes = f.bytesCopied ?? 0;
    if (last && now > last.t && bytes >= last.bytes) {
      const r = ((bytes - last.bytes) * 1000) / (now - last.t);
      measured = measured ? RATE_WEIGHT * r + (1 - RATE_WEIGHT) * measured : r;
    }
    last = { t: now, bytes };
    const total = Math.max(1, f.passTotal ?? 0), done = Math.min(f.passDone ?? 0, total);
    const rate = f.rate && f.rate > 0 ? f.rate : measured;
    const eta = f.etaSeconds != null && f.etaSeconds >= 0 ? f.etaSeconds : rate > 0 ? (total - done) / rate : null;
    const payload = {
      phase: f.phase ?? '', pass: f.pass ?? 0, pct: Math.floor((100 * done) / total),
      copied: formatBytes(bytes), rate: rate > 0 ? formatBytes(Math.round(rate)) : '-', dirty: formatBytes(f.dirtyBytes ?? 0),
      left: eta === null ? '-' : `${Math.ceil(eta)}s`,
    };
    return { total, done, payload };
  };
}

export function jobView(opts: { json: boolean; label?: string }): JobView {
  const human = !opts.json && process.stderr.isTTY === true;
  if (!human) {
    return {
    // Without a terminal: one JSON line per event, on stdout, as before.
      onEvent: (event, data) => printJson({ event, data }),
      note: (text) => (opts.json ? printJson({ event: 'note', data: { message: text } }) : process.stderr.write(`vmshift: ${text}\n`)),
      stop: () => {},
    };
  }
  const label = opts.label ? `${opts.label} ` : '';
  // cli-progress fills {eta} and {percentage} itself (from its own clock): ours have other names.
  const bar = new cliProgress.SingleBar({
    format: `${label}{phase} pass {pass} |{bar}| {pct}% {copied} copied, {rate}/s, dirty {dirty}, ETA {left}`,
    hideCursor: true,
    stream: process.stderr,
  }, cliProgress.Presets.shades_classic);
  let started = false;
  const fields = barFields();
  const render = (f: Partial<JobFigures>) => {
    const { total, done, payload } = fields(f, Date.now());
    if (!started) bar.start(total, done, payload);
    started = true;
    bar.setTotal(total);
    bar.update(done, payload);
  };
  return {
    onEvent: (event, data) => {
      if (event === 'progress' && (data as Partial<JobFigures>).passTotal !== undefined) render(data as Partial<JobFigures>);
    },
    note: (text) => {
      if (started) bar.stop();
      started = false;
      process.stderr.write(`vmshift: ${text}\n`);
    },
    stop: () => {
      if (started) bar.stop();
      started = false;
    },
  };
}
