// vmshiftd's registry: what it persists, and that it refuses files it cannot trust.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { join } from 'node:path';
import { readFileSync, writeFileSync, readdirSync } from 'node:fs';
import { Registry, RegistryError, checkName, checkSource, type ShimRecord } from '../../src/daemon/registry.ts';
import { tempDir, cleanupAll } from '../helpers/proc.ts';

test.after(cleanupAll);

function record(name: string, over: Partial<ShimRecord> = {}): ShimRecord {
  return {
    name,
    source: `/data/${name}.raw`,
    export: 'disk',
    track: 'bitmap',
    group: null,
    socket: `/run/vmshift/${name}/nbd.sock`,
    statePath: `/var/lib/vmshift/shims/${name}.state.json`,
    logPath: `/var/lib/vmshift/logs/${name}.log`,
    startedBy: null,
    desired: 'running',
    pid: 1234,
    startedAt: new Date().toISOString(),
    restarts: 0,
    createdAt: new Date().toISOString(),
    ...over,
  };
}

test('registry: records survive a reload; concurrent changes are all kept; no temp files left', async () => {
  const dir = tempDir();
  const reg = await Registry.load(dir);
  assert.equal(reg.list(), []);
  await Promise.all(['a', 'b', 'c', 'd'].map((n) => reg.put(record(n))));
  await Promise.all([reg.remove('b'), reg.put(record('e', { pid: null, desired: 'stopped' }))]);
  const again = await Registry.load(dir);
  assert.equal(again.list().map((r) => r.name), ['a', 'c', 'd', 'e']);
  assert.equal(again.get('e'), reg.get('e'));
  assert.is(again.get('e')!.desired, 'stopped');
  assert.equal(readdirSync(dir), ['vmshiftd.json']);
  assert.is(JSON.parse(readFileSync(join(dir, 'vmshiftd.json'), 'utf8')).version, 1);
});

test('registry: an invalid record is refused before anything is written', async () => {
  const dir = tempDir();
  const reg = await Registry.load(dir);
  await reg.put(record('ok'));
  const refused = await reg.put(record('bad/name')).then(() => false, () => true);
  assert.ok(refused, 'a record with a bad name was accepted');
  assert.equal((await Registry.load(dir)).list().map((r) => r.name), ['ok']);
});

test('registry: a corrupt file stops the load with an error naming the file', async () => {
  const dir = tempDir();
  const file = join(dir, 'vmshiftd.json');
  const cases: Array<[string, RegExp]> = [
    ['{"version": 1, "shims": [', /not JSON|Unexpected|JSON/],
    ['{"version": 2, "shims": []}', /version/],
    [JSON.stringify({ version: 1, shims: [{ ...record('x'), pid: 'soon' }] }), /shims\.0\.pid/],
    [JSON.stringify({ version: 1, shims: [{ ...record('x'), desired: 'maybe' }] }), /shims\.0\.desired/],
  ];
  for (const [content, why] of cases) {
    writeFileSync(file, content);
    try {
      await Registry.load(dir);
      assert.unreachable(`loaded ${content}`);
    } catch (e) {
      assert.instance(e, RegistryError);
      const msg = (e as Error).message;
      assert.ok(msg.startsWith(`${file}: corrupt registry`), msg);
      assert.match(msg, why);
      assert.match(msg, /will not start/);
    }
  }
});

test('names: letters, digits, . _ - up to 64, starting with a letter or digit', () => {
  for (const ok of ['vm1', 'A', 'guest-01.vda', 'x_y', '9'.repeat(64)]) assert.is(checkName(ok), ok);
  for (const bad of ['', '-x', '.hidden', '../etc', 'a/b', 'a b', 'é', '9'.repeat(65), 42, null]) {
    assert.throws(() => checkName(bad), /invalid shim name/, String(bad));
  }
});

test('sources: absolute paths and NBD URIs only', () => {
  for (const ok of ['/var/lib/images/a.raw', '/dev/vg/lv', 'nbd+unix:///disk?socket=/run/x.sock', 'nbd://127.0.0.1:10809/disk']) {
    assert.is(checkSource(ok), ok);
  }
  for (const bad of ['disk.raw', './disk.raw', '', 'http://x/y', 7]) assert.throws(() => checkSource(bad), /invalid source/, String(bad));
});

test.run();
