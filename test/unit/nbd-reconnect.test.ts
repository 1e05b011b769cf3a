// The reconnect delay given to QEMU: whole seconds, 0 to an hour, from options and configs.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { checkReconnectDelay, DEFAULT_RECONNECT_DELAY_S } from '../../src/qemu/nbd-reconnect.ts';
import { loadHookConfig } from '../../src/libvirt/hook-config.ts';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { runStatus } from '../helpers/proc.ts';

test('whole seconds from 0 to 3600, as numbers or digit strings; anything else is refused by name', () => {
  assert.is(checkReconnectDelay(0), 0);
  assert.is(checkReconnectDelay('30'), 30);
  assert.is(checkReconnectDelay(3600), 3600);
  for (const bad of [-1, 1.5, 3601, 'ten', '', null, Number.NaN]) {
    assert.throws(() => checkReconnectDelay(bad, '--reconnect-delay'), /^--reconnect-delay: .* is not a whole number of seconds from 0 to 3600$/);
  }
});

test('hooks.json: reconnectDelay defaults to the attach default, and is checked', async () => {
  const dir = mkdtempSync(join(tmpdir(), 'vrc-'));
  try {
    const f = join(dir, 'hooks.json');
    writeFileSync(f, '{}');
    assert.is((await loadHookConfig(f)).reconnectDelay, DEFAULT_RECONNECT_DELAY_S);
    writeFileSync(f, '{"reconnectDelay": 5}');
    assert.is((await loadHookConfig(f)).reconnectDelay, 5);
    writeFileSync(f, '{"reconnectDelay": 99999}');
    try {
      await loadHookConfig(f);
      assert.unreachable();
    } catch (e) {
      assert.match((e as Error).message, /hooks\.json: reconnectDelay: Number must be less than or equal to 3600/);
    }
  } finally {
    rmSync(dir, { recursive: true });
  }
});

test('a bad --reconnect-delay is a usage error (exit 2) before anything is touched', async () => {
  const vmshift = new URL('../../bin/vmshift', import.meta.url).pathname;
  for (const args of [['attach', 'g', '--qmp', '/nonexistent/q.sock', '--reconnect-delay', '99999'], ['enable', 'dom', '--reconnect-delay', 'soon']]) {
    const r = await runStatus(vmshift, args);
    assert.is(r.code, 2, r.stderr);
    assert.match(r.stderr, /^vmshift: --reconnect-delay: (99999|NaN) is not a whole number of seconds from 0 to 3600\n$/);
  }
});

test.run();
