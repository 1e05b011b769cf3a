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

test('the first compressing window (JIT, first page faults) is not taken as the encoder\'s speed', async () => {
  const g = new Governor(() => 0);
  await sleep(520);
  // 1 MiB in 400 ms: 2.6 MB/s, as a cold encoder on a loaded machine reads.
  g.account(1 << 20, 1 << 18, 400);
  assert.is(g.encoderRate, null);
});

test('a slow encoder figure that kept compression off is forgotten after the reprobe time: compression is tried again', async () => {
  let backlog = BUSY * 2;
  const g = new Governor(() => backlog, 1200);
  const window = async (inB: number, outB: number, ms: number) => { await sleep(520); return g.account(inB, outB, ms); };
  await window(1 << 20, 1 << 18, 400); // warm-up, not measured
  backlog -= 4 << 20; // the link took ~4.25 MiB in the window (~8.6 MB/s)
  assert.is(await window(1 << 20, 1 << 18, 400), true, 'link busy: compressing');
  assert.ok(g.encoderRate! < 3e6 && g.linkRate !== null, `encoder ${g.encoderRate}, link ${g.linkRate}`);
  backlog = 0;
  assert.is(await window(1 << 20, 1 << 18, 400), false, 'the link waits for a slow encoder: raw');
  backlog = BUSY * 2;
  assert.is(await window(4 << 20, 4 << 20, 0), false, 'raw, link busy, encoder known slower: stays raw');
  await sleep(800);
  assert.is(await window(4 << 20, 4 << 20, 0), true, 'after the reprobe time: compress again to measure anew');
  assert.is(g.encoderRate, null);
});

test('compressing carries less of QEMU\'s stream than raw did while the link was busy (the destination or the CPU is the limit): raw, and it stays raw', async () => {
  const backlog = BUSY * 2;
  const g = new Governor(() => backlog, 60_000);
  g.compressing = false;
  const window = async (inB: number, outB: number, ms: number) => { await sleep(520); return g.account(inB, outB, ms); };
  // Raw, the link busy: ~40 MB/s of QEMU's stream carried; the encoder not measured yet -> try compressing.
  assert.is(await window(20 << 20, 20 << 20, 0), true);
  assert.ok(g.carried.raw! > 30e6, `raw carried ${g.carried.raw}`);
  // The first compressing window: the raw backlog drains (not counted).
  assert.is(await window(5 << 20, 1 << 20, 20), true);
  assert.is(g.carried.compressing, null);
  // Compressing carries ~10 MB/s, though the encoder is fast and the link busy: raw.
  assert.is(await window(5 << 20, 1 << 20, 20), false, `carried ${JSON.stringify(g.carried)}`);
  // Raw, link busy, the encoder never measured slow: it stays raw on the outcome.
  assert.is(await window(20 << 20, 20 << 20, 0), false);
  assert.is(await window(20 << 20, 20 << 20, 0), false);
  assert.is(g.changes, 2);
  assert.ok(g.windows.length === 5 && g.windows[2]!.compressing && !g.windows[2]!.next, JSON.stringify(g.windows));
});

test('compressing carries less of QEMU\'s stream than raw did, the link not busy either way (the host\'s CPU is the limit): raw, though the encoder reads faster than the link', async () => {
  const g = new Governor(() => 0, 60_000);
  // As measured before: raw carried ~30 MB/s, the link ~30 MB/s, the encoder 100 MB/s.
  g.carried.raw = 30e6;
  g.linkRate = 30e6;
  g.encoderRate = 100e6;
  const window = async (inB: number, outB: number, ms: number) => { await sleep(520); return g.account(inB, outB, ms); };
  assert.is(await window(2 << 20, 1 << 19, 20), true, 'the first compressing window: not counted');
  // Compressing carries ~4 MB/s of QEMU's stream, the link not busy: raw.
  assert.is(await window(2 << 20, 1 << 19, 20), false, `carried ${JSON.stringify(g.carried)}, encoder ${g.encoderRate}, link ${g.linkRate}`);
});

test('the backlog above BUSY in most samples of a window is a busy link, whatever the window\'s two ends read (the send window holds it near BUSY)', async () => {
  let backlog = 0;
  const g = new Governor(() => backlog);
  const t0 = performance.now();
  backlog = BUSY * 2;
  while (performance.now() - t0 < 480) { assert.is(g.account(64 << 10, 16 << 10, 0.1), true); await sleep(20); }
  backlog = 0;
  await sleep(40);
  assert.is(g.account(64 << 10, 16 << 10, 0.1), true, 'link busy while compressing: compression stays on');
  assert.ok(g.linkRate !== null, 'and the link\'s rate was measured');
});

test('raw with the link keeping up for the through time: turned down for good (chunks pass through); a busy link ends it', async () => {
  let backlog = 0;
  const g = new Governor(() => backlog, 60_000, 1000);
  g.compressing = false;
  const window = async () => { await sleep(520); return g.account(4 << 20, 4 << 20, 0); };
  await window();
  assert.is(g.through, false, 'one quiet raw window is not enough');
  await window();
  await window();
  assert.is(g.through, true, `quiet raw since more than 1 s: ${JSON.stringify(g.windows)}`);
  backlog = BUSY * 2;
  await window();
  backlog = BUSY * 3;
  assert.is(await window(), true, 'the link became the limit: compressing again (the encoder not measured yet)');
  assert.is(g.through, false);
});

test('compressing on a busy link is never through, however long', async () => {
  const g = new Governor(() => BUSY * 2, 60_000, 0);
  for (let i = 0; i < 3; i++) { await sleep(520); g.account(4 << 20, 1 << 20, 10); }
  assert.is(g.compressing, true);
  assert.is(g.through, false);
});

test.run();
