// The balloon policy's state machine (src/balloon/policy.ts) on synthetic guest statistics:
// what it takes first (free memory), then (caches, half at a time), where it stops (working
// set plus headroom, the floor), and that it backs off at the first sign of pressure (major
// faults or swap-in above the rates it measured first, too little available, a stuck balloon).
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { BalloonPolicy, defaultSettings, type GuestStats } from '../../src/balloon/policy.ts';
import { loadBalloonDefaults } from '../../src/daemon/config.ts';
import { reported } from '../../src/balloon/device.ts';
import { tempDir } from '../helpers/proc.ts';
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';

const MiB = 1024 * 1024;
const GUEST = 256 * MiB;
const settings = defaultSettings(GUEST); // headroom 32 MiB, floor 64 MiB, step 8 MiB

let clock = 1000;
function stats(o: Partial<GuestStats>): GuestStats {
  clock += 1;
  return { at: clock, total: 220 * MiB, free: 10 * MiB, available: 40 * MiB, caches: 4 * MiB, majorFaults: 0, swapIn: 0, ...o };
}

/** A policy past its measuring sample. */
function measured(first: Partial<GuestStats> = {}) {
  const p = new BalloonPolicy(settings, GUEST);
  const d = p.next(stats(first), GUEST);
  assert.is(d.state, 'measuring');
  assert.is(d.target, null, 'nothing is taken before the rates are known');
  return p;
}

test('defaults for a 256 MiB guest: headroom 32 MiB, floor 64 MiB; for 16 GiB: 5% and 25%', () => {
  assert.equal([settings.headroom, settings.floor], [32 * MiB, 64 * MiB]);
  const big = defaultSettings(16384 * MiB);
  assert.equal([big.headroom, big.floor], [819 * MiB, 4096 * MiB]);
  assert.is(defaultSettings(GUEST, { floor: 100 * MiB }).floor, 100 * MiB, 'an option wins');
});

test('free memory beyond the headroom goes first, in one step, rounded down to a MiB', () => {
  const p = measured();
  const d = p.next(stats({ free: 190.5 * MiB, available: 200 * MiB }), GUEST);
  assert.is(d.state, 'shrinking');
  assert.is(d.target, GUEST - 159 * MiB, 'takes 158.5 MiB of free memory (190.5 - 32), the target rounded down');
  assert.match(d.why, /free memory beyond the headroom/);
  assert.equal(d.figures.available, 200 * MiB);
  assert.is(d.figures.majorFaultsPerS, 0);
});

test('then half of the reclaimable caches per step, then it settles at working set plus headroom', () => {
  const p = measured();
  // 8 MiB free (inside the headroom), 96 MiB available: 64 MiB beyond the headroom, half of it.
  const d1 = p.next(stats({ free: 8 * MiB, available: 96 * MiB, caches: 90 * MiB }), 200 * MiB);
  assert.is(d1.state, 'shrinking');
  assert.is(d1.target, 168 * MiB);
  assert.match(d1.why, /half of what the guest could reclaim/);
  const d2 = p.next(stats({ free: 8 * MiB, available: 64 * MiB }), 168 * MiB);
  assert.is(d2.target, 152 * MiB);
  const d3 = p.next(stats({ free: 8 * MiB, available: 40 * MiB }), 152 * MiB);
  assert.is(d3.state, 'settled');
  assert.is(d3.target, null);
  assert.match(d3.why, /working set plus headroom reached/);
});

test('never below the floor', () => {
  const p = measured();
  const d = p.next(stats({ free: 230 * MiB, available: 235 * MiB }), GUEST);
  assert.is(d.target, 64 * MiB, 'clamped at the floor');
  const d2 = p.next(stats({ free: 40 * MiB, available: 45 * MiB }), 64 * MiB);
  assert.is(d2.state, 'settled');
  assert.match(d2.why, /floor/);
});

test('major faults above the measured rate: backs off at once, gives everything back, never shrinks again', () => {
  const p = measured({ majorFaults: 1000 });
  assert.is(p.next(stats({ free: 150 * MiB, available: 160 * MiB, majorFaults: 1005 }), GUEST).target, GUEST - 118 * MiB);
  // The base rate was 5/s; 40/s now is more than base + 10.
  const d = p.next(stats({ free: 40 * MiB, available: 50 * MiB, majorFaults: 1045 }), 138 * MiB);
  assert.is(d.state, 'backed-off');
  assert.is(d.target, GUEST, 'all of it');
  assert.match(d.why, /40\.0 major faults\/s \(was 5\.0\)/);
  const d2 = p.next(stats({ free: 120 * MiB, available: 130 * MiB, majorFaults: 1046 }), GUEST);
  assert.is(d2.target, null, 'free memory again, but a guest that faulted is not shrunk again');
  assert.is(d2.state, 'backed-off');
});

test('a guest that was already faulting at a steady rate is not "pressure"', () => {
  const p = measured({ majorFaults: 0 });
  assert.is(p.next(stats({ free: 100 * MiB, available: 110 * MiB, majorFaults: 50 }), GUEST).state, 'shrinking');
  assert.is(p.next(stats({ free: 100 * MiB, available: 110 * MiB, majorFaults: 105 }), GUEST).state, 'shrinking', '55/s against a base of 50/s');
});

test('swap-in, too little available, or a balloon stuck above its target: backs off to the original size', () => {
  for (const [why, s, stuck] of [
    [/swap-in/, { swapIn: 10 * MiB }, false],
    [/only 10 MiB available/, { available: 10 * MiB }, false],
    [/stopped above its target/, {}, true],
  ] as const) {
    const p = measured();
    p.next(stats({}), GUEST - 8 * MiB); // the second sample sets the base rates
    const d = p.next(stats(s), GUEST - 8 * MiB, stuck);
    assert.is(d.state, 'backed-off', String(why));
    assert.match(d.why, why);
    assert.is(d.target, GUEST, 'no more than the guest had before');
  }
});

test('a statistic QEMU prints as 2^64-1 (the guest\'s -1) counts as not reported', () => {
  const parsed = JSON.parse('{"a": 18446744073709551615, "b": 0, "c": 262144000}') as Record<string, number>;
  assert.equal([reported(parsed.a), reported(parsed.b), reported(parsed.c), reported(-1), reported(undefined)], [false, true, true, false, false]);
});

test("the config file's balloon section: sizes parsed, unknown keys and bad sizes refused with the file's name", async () => {
  const dir = tempDir();
  const f = join(dir, 'vmshiftd.json');
  assert.equal(await loadBalloonDefaults(join(dir, 'absent.json')), { enabled: false, floor: undefined, headroom: undefined });
  writeFileSync(f, JSON.stringify({ balloon: { enabled: true, floor: '1G', headroom: '256M' } }), { mode: 0o600 });
  assert.equal(await loadBalloonDefaults(f), { enabled: true, floor: 1024 * MiB, headroom: 256 * MiB });
  writeFileSync(f, JSON.stringify({ balloon: { enabled: true, flor: '1G' } }));
  await loadBalloonDefaults(f).then(() => assert.unreachable('accepted'), (e: Error) => assert.match(e.message, /vmshiftd\.json: balloon: Unrecognized key/));
  writeFileSync(f, JSON.stringify({ balloon: { floor: 'lots' } }));
  await loadBalloonDefaults(f).then(() => assert.unreachable('accepted'), (e: Error) => assert.match(e.message, /balloon\.floor: "lots" is not a size/));
});

test.run();
