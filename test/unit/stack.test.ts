// The stack recipes and their self-description, and the seam between the shim and the
// migration code: the shim's module graph reaches nothing in src/migrate (the job talks to
// it through MovableDisk; `vmshift serve` adds the migrate.* methods).
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { readFile } from 'node:fs/promises';
import { dirname, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { MemoryDevice } from '../../src/block/memory.ts';
import { describeStack, migratingStack, servedDisk } from '../../src/block/stack.ts';
import { Gate } from '../../src/block/gate.ts';
import { JobCursors } from '../../src/migrate/cursors.ts';

const MiB = 1024 * 1024;
const root = resolve(dirname(fileURLToPath(import.meta.url)), '../..');

test('a served disk describes itself top-down, bottom device last', () => {
  const gate = servedDisk(new MemoryDevice(MiB, { name: 'memory:disk' }), { track: 'bitmap', granularity: 64 * 1024 });
  assert.equal(describeStack(gate), ['gate', 'tracker bitmap 64 KiB +heat', 'memory:disk']);
  const untracked = servedDisk(new MemoryDevice(MiB, { name: 'm' }), { track: 'none', granularity: 64 * 1024 });
  assert.equal(describeStack(untracked), ['gate', 'tracker none +heat', 'm']);
});

test('a migration stack names its mirror and shows the job\'s cursors as they move', async () => {
  const cursors = new JobCursors();
  const src = new MemoryDevice(MiB, { name: 'src' }), dst = new MemoryDevice(MiB, { name: 'dst' });
  const { tracker, mirror } = migratingStack(src, dst, { kind: 'bitmap', granularity: 4096, heat: false, cursors });
  const gate = new Gate(tracker);
  assert.equal(describeStack(gate), ['gate', 'tracker bitmap 4 KiB', 'mirror to dst (inactive)', 'src']);
  cursors.trackBehindCopier();
  cursors.copierReaches(256 * 1024);
  cursors.mirrorFromStart();
  mirror.start(null);
  cursors.mirroredUpTo(64 * 1024);
  const p = gate.pause();
  await p;
  assert.equal(describeStack(gate), ['gate (paused, 0 held)', 'tracker bitmap 4 KiB below 262144', 'mirror to dst (active, in step below 65536)', 'src']);
  gate.resume();
  // One object moves both: the tracker reads the same cursor the job moved.
  assert.is(tracker.cursor, 256 * 1024);
  assert.is(mirror.cursor, 64 * 1024);
});

/** Relative .ts imports of a module, transitively (type-only imports included: a type is a dependency too). */
async function reach(file: string, seen = new Set<string>()): Promise<Set<string>> {
  if (seen.has(file)) return seen;
  seen.add(file);
  const text = await readFile(file, 'utf8');
  for (const m of text.matchAll(/^\s*(?:import|export)\b[^'"]*?from\s+'(\.[^']+\.ts)'/gm)) await reach(resolve(dirname(file), m[1]!), seen);
  return seen;
}

test('shim.ts reaches no migration code: the circle control -> job -> switchover -> shim is broken', async () => {
  const reached = [...(await reach(resolve(root, 'src/shim/shim.ts')))].map((f) => f.slice(root.length + 1));
  assert.ok(reached.includes('src/block/stack.ts'), `the walk follows imports (${reached.join(', ')})`);
  const migrate = reached.filter((f) => f.startsWith('src/migrate/'));
  assert.equal(migrate, [], `shim.ts reaches ${migrate.join(', ')}`);
});

test.run();
