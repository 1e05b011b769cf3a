// The token bucket behind --bandwidth and the inline I/O budget: refill rate, burst cap,
// debt, and the time to repay it.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { TokenBucket } from '../../src/util/token-bucket.ts';

test('refills at its rate and never above the burst', () => {
  const b = new TokenBucket(1000, 500, 0, 0);
  assert.is(b.level(0), 0);
  assert.is(b.level(200), 200, '1000/s for 200 ms');
  assert.is(b.level(10_000), 500, 'capped at the burst');
});

test('taking runs into debt, which refills repay; msToRepay says how long', () => {
  const b = new TokenBucket(100, 250, 250, 0);
  assert.is(b.take(200, 0), 50);
  assert.is(b.take(200, 0), -150);
  assert.is(b.msToRepay(150), 1500);
  assert.ok(b.level(1499) < 0);
  assert.ok(Math.abs(b.level(1500)) < 1e-9, 'back to zero after msToRepay');
});

test('a large take passes, leaving the whole difference as debt', () => {
  const b = new TokenBucket(1_000_000, 65_536, 0, 0);
  assert.is(b.take(1_048_576, 0), -1_048_576);
  assert.is(b.msToRepay(1_048_576), 1048.576);
});

test.run();
