// Running the balloon policy (src/balloon/policy.ts) against a live guest, for a migration:
//   probe   before anything starts: a balloon device, statistics switched on and reported
//   shrink  before `migrate`: rounds of sample -> decision -> target -> wait for the balloon,
//           until the policy settles or backs off (or a time limit: what it got is kept)
//   watch   during the migration: a sample a second; backs off the moment the guest faults
//   give back to the size the guest had before (the destination after `cont`; the source
//           after a rollback)
import type { QmpTransport } from '../qemu/transport.ts';
import { BalloonError, GuestBalloon } from './device.ts';
import { BalloonPolicy, defaultSettings, type BalloonDecision, type BalloonSettings, type GuestStats } from './policy.ts';

/** Seconds between the guest's reports while the policy runs. */
const POLL_S = 1;
/** A target counts as reached within this (the guest's driver works in pages, QEMU reports in pages). */
const REACHED = 1024 * 1024;
/** The balloon "stopped" when its actual size did not change for this long. */
const STILL_MS = 2000;

export interface BalloonRun {
  balloon: GuestBalloon;
  policy: BalloonPolicy;
  last: GuestStats;
  /** Said before the shrink: a device without deflate-on-oom depends on the policy's sampling alone. */
  warning: string | null;
  /** Set by giveBack: a shrink still running (its caller gave up on it) sets no more targets. */
  done?: boolean;
}

export interface ShrinkResult {
  /** The guest's memory before (what it gets back), after the shrink, and the policy's state. */
  original: number;
  actual: number;
  state: string;
  steps: number;
  ms: number;
}

/** Refuse before a migration starts unless the guest can be ballooned on statistics. */
export async function probeBalloon(qmp: QmpTransport, peer: string, o: Partial<BalloonSettings> = {}): Promise<BalloonRun> {
  const { balloon, actual } = await GuestBalloon.find(qmp, peer);
  const st = await qmp.execute<{ status: string }>('query-status');
  if (st.status !== 'running') throw new BalloonError('not-running', `${peer}: the guest is "${st.status}": only a running guest reports statistics and gives memory back`);
  const memory = (await qmp.execute<{ 'base-memory': number; 'plugged-memory'?: number }>('query-memory-size-summary'));
  await balloon.enableStats(POLL_S);
  let last: GuestStats;
  try {
    // Switching polling on asks at once; a guest with a working driver answers well within this.
    last = await balloon.freshStats(0, 3000 + 2000 * POLL_S);
  } catch (e) {
    await balloon.restoreInterval().catch(() => {});
    throw e;
  }
  const settings = defaultSettings(memory['base-memory'] + (memory['plugged-memory'] ?? 0), o);
  const warning = (await balloon.deflatesOnOom()) ? null
    : `${peer}: the balloon device has deflate-on-oom off: a guest that allocates faster than the policy samples (each ${POLL_S} s) can run out of memory before it backs off (QEMU: virtio-balloon-pci,deflate-on-oom=on; libvirt: <memballoon model='virtio'><driver deflate_on_oom='on'/>)`;
  return { balloon, policy: new BalloonPolicy(settings, actual), last, warning };
}

/** Shrink the guest toward its working set plus headroom; `onStep` sees every decision. */
export async function shrink(run: BalloonRun, onStep: (d: BalloonDecision) => void, timeoutMs = 30_000): Promise<ShrinkResult> {
  const t0 = Date.now();
  const { balloon, policy } = run;
  let stuck = false, steps = 0;
  for (;;) {
    const actual = await balloon.actual();
    const d = policy.next(run.last, actual, stuck);
    onStep(d);
    stuck = false;
    if (run.done) break;
    if (d.target !== null) {
      steps++;
      await balloon.setTarget(d.target);
      stuck = !(await settle(balloon, d.target, t0 + timeoutMs));
    }
    if (policy.state === 'settled' || policy.state === 'backed-off' || Date.now() - t0 > timeoutMs) break;
    // A report from after the balloon settled (QEMU stamps reports in host seconds).
    const after = d.target !== null ? Math.max(run.last.at, Math.floor(Date.now() / 1000)) : run.last.at;
    run.last = await balloon.freshStats(after, 3000 + 2000 * POLL_S);
  }
  return { original: policy.original, actual: await balloon.actual(), state: policy.state, steps, ms: Date.now() - t0 };
}

/** Wait until the balloon reaches `target` (true) or stops moving short of it (false). */
async function settle(balloon: GuestBalloon, target: number, deadline: number): Promise<boolean> {
  let last = -1, since = Date.now();
  for (;;) {
    const a = await balloon.actual();
    if (Math.abs(a - target) <= REACHED) return true;
    if (a !== last) { last = a; since = Date.now(); }
    if (Date.now() - since > STILL_MS || Date.now() > deadline) return false;
    await new Promise((r) => setTimeout(r, 200));
  }
}

/** During the migration: call often; it reads a new report when there is one and backs off on pressure. */
export async function watch(run: BalloonRun, onStep: (d: BalloonDecision) => void): Promise<void> {
  const s = await run.balloon.stats(run.last.at);
  if (!s || run.done) return;
  run.last = s;
  const d = run.policy.next(s, await run.balloon.actual());
  if (d.target !== null) {
    onStep(d);
    await run.balloon.setTarget(d.target);
  }
}

/** Back to the size the guest had before the policy began; statistics polling as it was. */
export async function giveBack(run: BalloonRun): Promise<void> {
  run.done = true;
  await run.balloon.setTarget(run.policy.original);
  await run.balloon.restoreInterval();
}
