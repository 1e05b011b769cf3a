// QEMU's migration parameters chosen for `vmshift migrate` (src/policy/qemu-params.ts).
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { chooseParameters, type ParamInputs } from '../../src/policy/qemu-params.ts';

const base: ParamInputs = { compress: 'none', cacheSize: 64 << 20, maxDowntimeMs: 300, bandwidth: 0, linkRate: null, dirtyRate: null };

test('every capability it decides is set both ways: a QEMU that arrived by an XBZRLE migration keeps xbzrle on otherwise', () => {
  for (const compress of ['none', 'cache'] as const) {
    const c = chooseParameters({ ...base, compress });
    assert.equal(c.capabilities, { xbzrle: false, 'auto-converge': false }, compress);
    assert.ok(c.reasons.includes(`xbzrle off: --compress ${compress}`), c.reasons.join('; '));
  }
  const x = chooseParameters({ ...base, compress: 'xbzrle', cacheSize: 100 << 20 });
  assert.equal(x.capabilities, { xbzrle: true, 'auto-converge': false });
  assert.is(x.parameters['xbzrle-cache-size'], 64 << 20, 'the largest power of two of pages within the budget');
  assert.ok(x.reasons.some((r) => r.startsWith('xbzrle on, xbzrle-cache-size 64 MiB: ') && r.includes('100 MiB budget')), x.reasons.join('; '));
});

test('auto-converge on only when the guest dirties above 80% of the link, off (explicitly) otherwise', () => {
  const on = chooseParameters({ ...base, linkRate: 50 << 20, dirtyRate: 45 << 20 });
  assert.is(on.capabilities['auto-converge'], true);
  assert.ok(on.reasons.some((r) => r.startsWith('auto-converge on: the guest dirties 45 MiB/s, the link carries 50 MiB/s')), on.reasons.join('; '));
  const off = chooseParameters({ ...base, linkRate: 50 << 20, dirtyRate: 20 << 20 });
  assert.is(off.capabilities['auto-converge'], false);
});

test('max-bandwidth: --bandwidth wins; the cache alone raises QEMU\'s limit; plain keeps QEMU\'s default', () => {
  assert.is(chooseParameters({ ...base, bandwidth: 10 << 20, compress: 'cache' }).parameters['max-bandwidth'], 10 << 20);
  assert.is(chooseParameters({ ...base, compress: 'cache' }).parameters['max-bandwidth'], 4 * 1024 ** 3);
  assert.is(chooseParameters(base).parameters['max-bandwidth'], undefined);
  assert.is(chooseParameters(base).parameters['downtime-limit'], 300);
});

test.run();
