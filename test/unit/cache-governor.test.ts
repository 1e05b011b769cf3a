// The governor turns the memory cache's compression down when the link keeps up with QEMU's
// raw stream (a fast link), and keeps it on while the link is the bottleneck.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { BUSY, Governor } from '../../src/relay/cache/governor.ts';

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

test('a fast link (nothing ever waits for it): compression goes off and stays off', async () => {
  const g = new Governor(() => 0);
  g.account(1 << 20, 300_000, 10);
  await sleep(520);
  assert.is(g.account(1 << 20, 300_000, 10), false, 'the link waited for the encoder: sent raw');
  await sleep(520);
  assert.is(g.account(1 << 20, 1 << 20, 0), false, 'raw, and the link still keeps up');
  assert.is(g.changes, 1);
});

test('a slow link (bytes wait for it the whole time): compression stays on', async () => {
  let backlog = BUSY * 2;
  const g = new Governor(() => backlog);
  await sleep(520);
  backlog += 1 << 20;
  assert.is(g.account(4 << 20, 1 << 20, 20), true);
  assert.is(g.changes, 0);
});

test('raw on a link that became the bottleneck: compression back on when the encoder is faster than the link', async () => {
  let backlog = 0;
  const g = new Governor(() => backlog);
  // Compressing: 8 MiB encoded in 40 ms (200 MiB/s), the link keeps up -> probe raw.
  await sleep(520);
  assert.is(g.account(8 << 20, 2 << 20, 40), false);
  // Raw: the backlog stays above BUSY, the link took ~2 MiB in the window (~4 MiB/s).
  backlog = BUSY + (1 << 20);
  g.account(0, 0, 0);
  await sleep(520);
  backlog = BUSY + (2 << 20);
  g.account(4 << 20, 4 << 20, 0);
  await sleep(520);
  backlog = BUSY + (3 << 20);
  assert.is(g.account(4 << 20, 4 << 20, 0), true, `link ${g.linkRate} B/s, encoder ${g.encoderRate} B/s`);
});

test.run();
