// A tiny real guest runs a continuous sequence writer on a shimmed disk while auto mode
// migrates the disk: the guest keeps running (its sequence advances after the switch-over)
// and every record it saw acknowledged is on the destination.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { join } from 'node:path';
import { tempDir, cleanupAll } from '../helpers/proc.ts';
import { bootGuest, ensureGuest, verifyWriterLog } from '../helpers/guest.ts';
import { MiB, startShim, makeDisk, migrate, status, compareWithShim } from './migrate-helpers.ts';

const WRITER = { start: 1000, blocks: 32 };

test.after(cleanupAll);

test('auto mode under a real guest writer: it keeps running, no acknowledged record lost', async () => {
  await ensureGuest();
  const dir = tempDir('vmsF-');
  const src = join(dir, 'src.raw'), dst = join(dir, 'dst.raw');
  await makeDisk(src, 16 * MiB, 0);
  const shim = await startShim(src, join(dir, 's'));
  const g = bootGuest({ mode: 'writer', params: WRITER, disk: { nbdSocket: shim.socket, exportName: 'disk' } });
  await g.waitFor(/^VMSHIFT-SEQ 50$/, 120000);
  const r = await migrate(shim.socket, dst, ['--mode', 'auto', '--bandwidth', '4M']);
  assert.is(r.code, 0, `migrate-storage failed: ${JSON.stringify(r.error)} ${r.stderr}`);
  const atSwitch = g.lastSeq();
  assert.ok(atSwitch > 50, 'the guest wrote during the migration');
  await g.waitFor(new RegExp(`^VMSHIFT-SEQ ${atSwitch + 100}$`), 120000);
  await g.stop();
  const last = g.lastSeq();
  assert.equal(verifyWriterLog(dst, last, WRITER.blocks, { start: WRITER.start }), []);
  assert.is((await status(shim.socket)).backing, dst);
  await compareWithShim(dst, shim.socket);
});

test.run();
