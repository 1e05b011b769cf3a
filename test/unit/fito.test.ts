// The FITO list sizes the memory cache from the ages pages have when they are touched again:
// with synthetic page-touch traces of known reuse distances it must converge to a size whose
// hit rate is within 5% of a cache four times larger, shrinking from the budget and growing
// from a small start.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { FitoList } from '../../src/relay/cache/fito.ts';
import { prng as rng } from '../fixtures/nbd-raw.ts';

/**
 * A trace: with probability `hot` a page of a hot set of `hotPages` pages, touched round robin
 * (reuse distance hotPages/hot ticks), else a page never seen before (streaming, never reused).
 */
function* trace(ticks: number, hotPages: number, hot: number, seed = 1): Generator<number> {
  const r = rng(seed);
  let h = 0, cold = 0;
  for (let i = 0; i < ticks; i++) yield r() < hot ? h++ % hotPages : 1e7 + cold++;
}

/** Runs `keys` through a list; the hit rate over the last `tail` touches. */
function simulate(list: FitoList<number, number>, keys: Iterable<number>, tail: number, total: number): number {
  let i = 0, hits = 0;
  for (const k of keys) {
    const v = list.touch(k);
    if (i >= total - tail && v !== undefined) hits++;
    list.add(k, 0);
    i++;
  }
  return hits / tail;
}

const TICKS = 250_000;
const TAIL = 60_000;

function check(hotPages: number, hot: number, start: 'budget' | 'small') {
  const budget = 65536;
  const fito = new FitoList<number, number>({ maxEntries: budget, minEntries: 256, initialTarget: start === 'budget' ? budget : 256 });
  const h = simulate(fito, trace(TICKS, hotPages, hot), TAIL, TICKS);
  const size = fito.target;
  const big = new FitoList<number, number>({ maxEntries: size * 4, minEntries: size * 4 });
  const h4 = simulate(big, trace(TICKS, hotPages, hot), TAIL, TICKS);
  return { h, h4, size, need: Math.ceil(hotPages / hot), history: fito.history };
}

test('converges from the budget down to a size within 5% of a 4x larger cache', () => {
  const r = check(2000, 0.6, 'budget');
  assert.ok(r.h4 > 0.55, `the 4x cache catches the hot set: ${r.h4}`);
  assert.ok(r.h >= r.h4 - 0.05, `hit rate ${r.h.toFixed(3)} at ${r.size} entries vs ${r.h4.toFixed(3)} at ${r.size * 4}`);
  assert.ok(r.size < r.need * 2, `shrank from the budget (65536) towards the ~${r.need} entries the reuse distance needs: ${r.size}`);
});

test('grows from a small start when touched pages were evicted recently', () => {
  const r = check(3000, 0.5, 'small');
  assert.ok(r.h >= r.h4 - 0.05, `hit rate ${r.h.toFixed(3)} at ${r.size} entries vs ${r.h4.toFixed(3)} at ${r.size * 4}`);
  assert.ok(r.size >= r.need * 0.9, `grew from 256 to about the ${r.need} entries needed: ${r.size}`);
  assert.ok(r.history.length > 10 && r.history[0]!.target < r.size, 'the size over time is reported');
});

test('mixed reuse distances (two hot sets): within 5% of a 4x larger cache', () => {
  // 70% from a set touched every ~1400 ticks, 25% from one touched every ~24000, 5% streaming.
  function* mixed(): Generator<number> {
    const r = rng(7);
    let a = 0, b = 0, c = 0;
    for (let i = 0; i < TICKS; i++) {
      const x = r();
      yield x < 0.7 ? a++ % 1000 : x < 0.95 ? 1e6 + (b++ % 6000) : 1e7 + c++;
    }
  }
  const fito = new FitoList<number, number>({ maxEntries: 65536 });
  const h = simulate(fito, mixed(), TAIL, TICKS);
  const big = new FitoList<number, number>({ maxEntries: fito.target * 4, minEntries: fito.target * 4 });
  const h4 = simulate(big, mixed(), TAIL, TICKS);
  assert.ok(h >= h4 - 0.05, `hit rate ${h.toFixed(3)} at ${fito.target} entries vs ${h4.toFixed(3)} at ${fito.target * 4}`);
  assert.ok(fito.target < 65536 / 2, `did not stay at the budget: ${fito.target}`);
});

test('never beyond the budget; evictions hand back the value', () => {
  const freed: number[] = [];
  const l = new FitoList<number, number>({ maxEntries: 4, minEntries: 4 }, (_k, v) => freed.push(v));
  for (let i = 0; i < 10; i++) { l.touch(i); l.add(i, i); }
  assert.is(l.size, 4);
  assert.equal(freed, [0, 1, 2, 3, 4, 5]);
  assert.is(l.touch(9), 9, 'a hit returns the value and takes the entry out');
  assert.is(l.size, 3);
  assert.is(l.touch(2), undefined);
  assert.is(l.stats.ghostHits, 1, 'k2 was evicted recently: a ghost hit');
});

test('a cycle longer than the budget: the list says it is outgrown, and an owner that then keeps what it has hits where first-in-first-out hits nothing', () => {
  const budget = 4096, cycle = 6500; // QEMU's passes over a working set larger than the cache
  const run = (keep: boolean) => {
    const fito = new FitoList<number, number>({ maxEntries: budget, minEntries: 256, adjustEvery: 1024 });
    let hits = 0, last = 0;
    for (let i = 0; i < cycle * 8; i++) {
      const k = i % cycle;
      const hit = fito.touch(k) !== undefined;
      if (i >= cycle * 6) { if (hit) hits++; last++; }
      if (hit || !keep || !fito.outgrown || !fito.full) fito.add(k, 0);
    }
    return { rate: hits / last, outgrown: fito.outgrown };
  };
  const fifo = run(false), kept = run(true);
  assert.ok(fifo.outgrown && kept.outgrown, 'the reuse distance lies beyond the list');
  assert.ok(fifo.rate < 0.01, `first-in-first-out on a long cycle: ${fifo.rate}`);
  assert.ok(kept.rate > 0.5 * (budget / cycle), `keeping what it has: ${kept.rate} (at best ${(budget / cycle).toFixed(2)})`);
});

test('a cycle within the budget is not outgrown', () => {
  const fito = new FitoList<number, number>({ maxEntries: 4096, adjustEvery: 1024 });
  for (let i = 0; i < 3000 * 6; i++) { fito.touch(i % 3000); fito.add(i % 3000, 0); }
  assert.is(fito.outgrown, false);
});

test.run();
