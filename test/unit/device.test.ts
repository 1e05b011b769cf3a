import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { BlockError, checkRange, errnoOf } from '../../src/block/device.ts';

test('checkRange rejects ranges past the end and unsafe offsets', () => {
  const dev = { size: 4096, name: 'd' };
  checkRange(dev, 0, 4096);
  assert.throws(() => checkRange(dev, 1, 4096), (e: unknown) => e instanceof BlockError && e.errno === 'EINVAL');
  assert.throws(() => checkRange(dev, 2 ** 53, 1), (e: unknown) => e instanceof BlockError && e.errno === 'EINVAL');
  assert.throws(() => checkRange(dev, -1, 1), (e: unknown) => e instanceof BlockError);
});

test('errnoOf maps fs error codes onto NBD errnos', () => {
  assert.is(errnoOf(Object.assign(new Error('x'), { code: 'ENOSPC' })), 'ENOSPC');
  assert.is(errnoOf(Object.assign(new Error('x'), { code: 'EROFS' })), 'EPERM');
  assert.is(errnoOf(new Error('plain')), 'EIO');
});

test.run();
