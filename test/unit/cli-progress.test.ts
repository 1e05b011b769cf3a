// The migrate-storage bar's fields: a real rate and ETA during the first pass (when the job's
// own rate, measured over the previous pass, is still 0), percentages that match the bytes.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { barFields } from '../../src/cli/progress.ts';

const MiB = 1024 * 1024;

test('first pass: rate measured from bytesCopied, ETA from it, percent of the pass', () => {
  const next = barFields();
  const a = next({ phase: 'precopy', pass: 1, passDone: 0, passTotal: 64 * MiB, bytesCopied: 0, rate: 0, etaSeconds: null, dirtyBytes: 0 }, 1000);
  assert.is(a.payload.rate, '-');
  assert.is(a.payload.left, '-');
  assert.is(a.payload.pct, 0);
  const b = next({ phase: 'precopy', pass: 1, passDone: 16 * MiB, passTotal: 64 * MiB, bytesCopied: 16 * MiB, rate: 0, etaSeconds: null, dirtyBytes: 0 }, 2000);
  assert.is(b.payload.pct, 25);
  assert.is(b.payload.copied, '16 MiB');
  assert.is(b.payload.rate, '16 MiB');
  assert.is(b.payload.left, '3s'); // 48 MiB left at 16 MiB/s
  assert.not.match(Object.values(b.payload).join(" "), /[{}]|NaN|Infinity/);
});

test("the job's own rate and ETA win once it reports them", () => {
  const next = barFields();
  next({ passDone: 0, passTotal: 10 * MiB, bytesCopied: 0 }, 0);
  const r = next({ passDone: 5 * MiB, passTotal: 10 * MiB, bytesCopied: 70 * MiB, rate: 2 * MiB, etaSeconds: 2.5 }, 1000);
  assert.is(r.payload.rate, '2 MiB');
  assert.is(r.payload.left, '3s');
  assert.is(r.payload.pct, 50);
});

test('no total yet: 0%, never a division by zero', () => {
  const r = barFields()({ phase: 'starting', pass: 0, passDone: 0, passTotal: 0 }, 0);
  assert.is(r.total, 1);
  assert.is(r.payload.pct, 0);
});

test.run();
