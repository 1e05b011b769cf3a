// The budget that decides when FileDevice may read or write on the event loop: a one-off sleep is
// absorbed, repeated sleeps send writes to the thread pool until the budget has refilled.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { INLINE_BLOCK_BURST_MS, INLINE_BLOCK_SHARE, INLINE_MAX, InlineBudget } from '../../src/block/inline-io.ts';

test('small writes are allowed, larger ones are not', () => {
  const b = new InlineBudget();
  assert.ok(b.allows(4096, 0));
  assert.ok(b.allows(INLINE_MAX, 0));
  assert.not.ok(b.allows(INLINE_MAX + 1, 0));
});

test('writes that do not sleep never use up the budget', () => {
  const b = new InlineBudget();
  for (let t = 0; t < 10_000; t++) b.spent(0, t);
  assert.ok(b.allows(4096, 10_000));
  assert.equal([b.done, b.blocked], [10_000, 0]);
});

test('one long sleep within the burst is absorbed; a second one right after sends writes to the pool until refilled', () => {
  const b = new InlineBudget();
  b.spent(200, 1000);
  assert.ok(b.allows(4096, 1000), 'a 200 ms sleep fits the 250 ms burst');
  b.spent(200, 1001);
  // 250 - 200 + 1 * 0.1 - 200 = -149.9 ms: 1499 ms in the pool.
  const back = 1001 + (200 + 200 - INLINE_BLOCK_BURST_MS - 1 * INLINE_BLOCK_SHARE) / INLINE_BLOCK_SHARE;
  assert.not.ok(b.allows(4096, 1002));
  assert.not.ok(b.allows(4096, back - 1));
  assert.ok(b.allows(4096, back + 1e-6));
  assert.equal([b.done, b.blocked], [2, 2]);
});

test('steady short sleeps are held to the refill share of the time', () => {
  const b = new InlineBudget();
  // A write every ms that sleeps 1 ms would block the loop half the time; the budget lets
  // through at most BURST + SHARE * elapsed of it.
  let slept = 0;
  for (let t = 0; t < 60_000; t++) {
    if (!b.allows(4096, t)) continue;
    b.spent(1, t);
    slept += 1;
  }
  assert.ok(slept <= INLINE_BLOCK_BURST_MS + INLINE_BLOCK_SHARE * 60_000 + 1, `slept ${slept} ms in 60 s`);
  assert.ok(slept >= INLINE_BLOCK_SHARE * 60_000 * 0.9, `the budget refills: slept ${slept} ms in 60 s`);
});

test.run();
