// What the shared-file carrier syncs (src/link/shared-dir.ts, record-file.ts): appends go to
// the file at once and are readable there; their fdatasync is grouped, one in flight per
// file, so a stream through the file is not held to one sync per write (it was: ~4 MB/s).
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { SharedDir } from '../../src/link/shared-dir.ts';
import { RecordReader, Rec, encodeRecord, syncCount } from '../../src/link/record-file.ts';
import { cleanupAll, tempDir } from '../helpers/proc.ts';

test.after.each(cleanupAll);

const until = async (ok: () => boolean, what: string) => {
  for (let i = 0; i < 1000 && !ok(); i++) await new Promise((r) => setTimeout(r, 10));
  assert.ok(ok(), what);
};

test('a burst of appends is readable at once and costs two syncs, not one each', async () => {
  const dir = tempDir('vmshift-link-sync-');
  const warnings: string[] = [];
  const id = { dir, link: 'lsync', migration: 'm1' };
  const a = new SharedDir({ ...id, role: 'a' }, (m) => warnings.push(m));
  a.open();
  const payload = Buffer.alloc(64 * 1024, 7);
  // Creates the file (its header is synced at once) and starts one grouped sync.
  a.append(0, 'bulk', [encodeRecord(a.seed, Rec.DATA, 0, 0, payload)]);
  const before = syncCount();
  for (let i = 1; i <= 100; i++) a.append(0, 'bulk', [encodeRecord(a.seed, Rec.DATA, 0, i * payload.length, payload)]);
  // Readable before any sync has finished (the peer on a coherent filesystem reads it now).
  const r = new RecordReader(a.dataPath('a', 0), a.seed, { link: 'lsync', migration: 'm1', from: 'a' });
  assert.is(r.readNew().length, 101);
  r.close();
  // The sync the first append started, then one more for the whole burst: two, however slow
  // the disk (a sync per append made 100).
  await until(() => syncCount() - before >= 2, 'the grouped syncs ran');
  await new Promise((res) => setTimeout(res, 200));
  const n = syncCount() - before;
  assert.is(n, 2, `100 appends in one burst made ${n} syncs`);
  assert.equal(warnings, []);
  a.removeOwn(true);
});

test.run();
