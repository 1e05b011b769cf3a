// What root trusts on disk (src/util/trusted-fs.ts, src/util/atomic-file.ts) and which disks
// vmshiftd may serve (src/daemon/datastores.ts), each refusal replayed with files made the way
// an unprivileged local user (uid 65534, nobody) would make them.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { chmodSync, chownSync, mkdirSync, readFileSync, statSync, symlinkSync, writeFileSync, readdirSync } from 'node:fs';
import { basename, join } from 'node:path';
import { tempDir, cleanupAll, rejection, run } from '../helpers/proc.ts';
import { readJsonIfExists, writeFileAtomic } from '../../src/util/atomic-file.ts';
import { ensureDir } from '../../src/util/trusted-fs.ts';
import { DEFAULT_DATASTORES, checkDestination, resolveSource, type SourcePolicy } from '../../src/daemon/datastores.ts';
import { loadSourcePolicy } from '../../src/daemon/config.ts';

test.after(cleanupAll);

const NOBODY = 65534;
const dir = tempDir('vtf-');

test('state is read only from files root may trust: not another user\'s, not writable by others, not a symlink', async () => {
  const good = join(dir, 'good.json');
  writeFileSync(good, '{"ok":1}', { mode: 0o600 });
  assert.equal(await readJsonIfExists(good), { ok: 1 });

  const planted = join(dir, 'planted.json');
  writeFileSync(planted, '{"backing":"/etc/shadow"}', { mode: 0o600 });
  chownSync(planted, NOBODY, NOBODY);
  assert.match(String(await rejection(readJsonIfExists(planted))), /planted\.json is owned by uid 65534, not root/);

  const open = join(dir, 'group-writable.json');
  writeFileSync(open, '{}');
  chmodSync(open, 0o620);
  assert.match(String(await rejection(readJsonIfExists(open))), /writable by its group \(mode 0620\)/);

  const link = join(dir, 'link.json');
  symlinkSync(good, link);
  assert.match(String(await rejection(readJsonIfExists(link))), /link\.json is a symlink/);

  // A root-owned file in a directory someone else owns could be replaced at any time.
  const theirs = join(dir, 'theirs');
  mkdirSync(theirs);
  writeFileSync(join(theirs, 's.json'), '{}', { mode: 0o600 });
  chownSync(theirs, NOBODY, NOBODY);
  assert.match(String(await rejection(readJsonIfExists(join(theirs, 's.json')))), /theirs is owned by uid 65534/);
  assert.is(await readJsonIfExists(join(dir, 'absent.json')), undefined);
});

test('an atomic write never writes through a file planted at its temp name', async () => {
  const target = join(dir, 'state.json');
  const victim = join(dir, 'victim');
  writeFileSync(victim, 'precious\n');
  // The old temp name was predictable (pid and time): plant a symlink at it, time frozen.
  const realNow = Date.now;
  Date.now = () => 42;
  try {
    symlinkSync(victim, join(dir, `.${basename(target)}.${process.pid}.42.tmp`));
    await writeFileAtomic(target, '{"v":1}\n');
  } finally {
    Date.now = realNow;
  }
  assert.is(readFileSync(victim, 'utf8'), 'precious\n');
  assert.is(readFileSync(target, 'utf8'), '{"v":1}\n');
  assert.is(statSync(target).mode & 0o777, 0o600);
  assert.not.ok(readdirSync(dir).some((n) => n.startsWith('.state.json.') && !n.endsWith('.42.tmp')), 'no temp file left');
});

test('ensureDir refuses a symlink or another user\'s directory, and never changes what a link points at', async () => {
  const victim = join(dir, 'victim-dir');
  mkdirSync(victim, { mode: 0o755 });
  chmodSync(victim, 0o755);
  const run = join(dir, 'run');
  mkdirSync(run, { mode: 0o755 });
  symlinkSync(victim, join(run, 'vm1'));
  assert.match(String(await rejection(ensureDir(join(run, 'vm1'), { mode: 0o2750, gid: NOBODY }))), /vm1 is a symlink: refusing/);
  assert.is(statSync(victim).mode & 0o7777, 0o755);
  assert.is(statSync(victim).gid, 0);

  const theirs = join(dir, 'their-run');
  mkdirSync(theirs);
  chownSync(theirs, NOBODY, NOBODY);
  assert.match(String(await rejection(ensureDir(join(theirs, 'vm1'), { mode: 0o700 }))), /their-run is owned by uid 65534/);
  assert.match(String(await rejection(ensureDir(theirs, { mode: 0o755 }))), /their-run is owned by uid 65534, not root: refusing/);

  const open = join(dir, 'open');
  mkdirSync(open);
  chmodSync(open, 0o777);
  assert.match(String(await rejection(ensureDir(join(open, 'x'), { mode: 0o700 }))), /open is writable by everyone \(mode 0777\)/);

  // What it is for: create, or fix the mode and group of, a directory of our own.
  await ensureDir(join(dir, 'a/b'), { mode: 0o2750, gid: NOBODY });
  assert.is(statSync(join(dir, 'a/b')).mode & 0o7777, 0o2750);
  assert.is(statSync(join(dir, 'a/b')).gid, NOBODY);
});

test('sources only from allowed datastores, resolved first: no .., no symlink out, whole components', async () => {
  const ds = join(dir, 'ds');
  mkdirSync(ds);
  writeFileSync(join(ds, 'd.raw'), Buffer.alloc(4096));
  writeFileSync(join(dir, 'outside.raw'), Buffer.alloc(4096));
  mkdirSync(join(dir, 'ds10'));
  writeFileSync(join(dir, 'ds10/x.raw'), Buffer.alloc(4096));
  symlinkSync('/etc/shadow', join(ds, 'shadow.raw'));
  const policy: SourcePolicy = { datastores: [ds], allowNbd: false };

  const d = await resolveSource(join(ds, 'd.raw'), policy);
  assert.is(d.canonical, join(ds, 'd.raw'));
  // Every spelling of one file is one disk.
  for (const p of [`${ds}//d.raw`, `${ds}/./d.raw`, `${ds}/../ds/d.raw`]) assert.equal(await resolveSource(p, policy), d, p);
  symlinkSync(join(ds, 'd.raw'), join(ds, 'alias.raw'));
  assert.equal(await resolveSource(join(ds, 'alias.raw'), policy), d);

  const refused = async (p: string) => String(await rejection(resolveSource(p, policy)));
  assert.match(await refused('/etc/shadow'), /source \/etc\/shadow is outside the allowed datastores/);
  assert.match(await refused(`${ds}/../outside.raw`), /outside\.raw \(which is .*\/outside\.raw\) is outside the allowed datastores/);
  assert.match(await refused(join(ds, 'shadow.raw')), /shadow\.raw \(which is \/etc\/shadow\) is outside/);
  assert.match(await refused(join(dir, 'ds10/x.raw')), /is outside the allowed datastores/);
  assert.match(await refused('nbd+unix:///disk?socket=/run/vmshift/other-vda/nbd.sock'), /NBD sources are not allowed/);
  assert.is((await resolveSource('nbd+unix:///disk?socket=/s', { ...policy, allowNbd: true })).canonical, 'nbd+unix:///disk?socket=/s');

  await checkDestination(join(ds, 'new.raw'), policy);
  assert.match(String(await rejection(checkDestination(join(dir, 'new.raw'), policy))), /destination .*new\.raw is outside/);
  assert.match(String(await rejection(checkDestination(join(ds, 'shadow.raw'), policy))), /which is \/etc\/shadow/);
});

test('a block device named through root-owned symlinks in a datastore (LVM /dev/VG/LV -> /dev/dm-N) is allowed; through a link others could change, not', async () => {
  const blk = join(dir, 'blk');
  mkdirSync(blk);
  await run('mknod', [join(blk, 'dm-9'), 'b', '7', '201']); // never opened: only stat and realpath
  const vg = join(dir, 'vg');
  mkdirSync(vg, { mode: 0o755 });
  symlinkSync('../blk/dm-9', join(vg, 'lv'));
  writeFileSync(join(blk, 'file.raw'), Buffer.alloc(512));
  symlinkSync('../blk/file.raw', join(vg, 'file.raw'));
  const policy: SourcePolicy = { datastores: [vg], allowNbd: false };
  const r = await resolveSource(join(vg, 'lv'), policy);
  assert.is(r.canonical, join(blk, 'dm-9'));
  assert.is(r.id, `blk:${statSync(join(blk, 'dm-9')).rdev}`);
  // Only block devices: a file is judged by its realpath alone.
  assert.match(String(await rejection(resolveSource(join(vg, 'file.raw'), policy))), /which is .*blk\/file\.raw\) is outside/);
  // A link in a directory someone else may write could point anywhere.
  chmodSync(vg, 0o777);
  assert.match(String(await rejection(resolveSource(join(vg, 'lv'), policy))), /lv \(which is .*dm-9\) is outside/);
  chmodSync(vg, 0o755);
});

test("vmshiftd's config: defaults when absent, datastores replace them, --datastore adds, a file others may write is refused", async () => {
  const cfg = join(dir, 'vmshiftd.json');
  assert.equal(await loadSourcePolicy(cfg), { datastores: [...DEFAULT_DATASTORES], allowNbd: false });
  writeFileSync(cfg, JSON.stringify({ datastores: ['/srv/a'], allowNbdSources: true }));
  assert.equal(await loadSourcePolicy(cfg, { datastores: ['/srv/b'] }), { datastores: ['/srv/a', '/srv/b'], allowNbd: true });
  writeFileSync(cfg, JSON.stringify({ datastore: ['/srv/a'] }));
  assert.match(String(await rejection(loadSourcePolicy(cfg))), /vmshiftd\.json: top level: Unrecognized key\(s\) in object: 'datastore'/);
  writeFileSync(cfg, JSON.stringify({ datastores: ['srv'] }));
  assert.match(String(await rejection(loadSourcePolicy(cfg))), /datastores\.0: a datastore is an absolute directory path/);
  chmodSync(cfg, 0o666);
  assert.match(String(await rejection(loadSourcePolicy(cfg))), /vmshiftd\.json is writable by everyone/);
});

test.run();
