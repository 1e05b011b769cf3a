// The switch-over strategies at their commit point, on a stand-in MovableDisk (the job's view
// of a shim): swapping to a local file commits the prepared state and serves the destination;
// handing over to the peer serves nothing here any more (every request refused, naming the
// peer) and records nothing.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { MemoryDevice } from '../../src/block/memory.ts';
import { BlockError, type BlockDevice } from '../../src/block/device.ts';
import { describeStack, servedDisk, servingStack } from '../../src/block/stack.ts';
import { handOverToPeer } from '../../src/migrate/peer-handover.ts';
import { swapToLocalFile } from '../../src/migrate/switchover.ts';
import type { MovableDisk } from '../../src/migrate/disk.ts';
import type { Destination } from '../../src/migrate/destination.ts';

const MiB = 1024 * 1024;

function standIn(bottom: BlockDevice) {
  const gate = servedDisk(bottom, { track: 'bitmap', granularity: 64 * 1024 });
  const log: string[] = [];
  let current = bottom;
  const disk: MovableDisk = {
    label: 'test', statePath: '/nonexistent', readOnly: false, granularity: 64 * 1024, gate, sockets: [],
    get bottom() { return current; },
    get backing() { return current.name; },
    claim: () => () => {},
    prepareBacking: async (spec) => {
      log.push(`prepare ${spec}`);
      return { commit: async () => void log.push(`commit ${spec}`), discard: async () => void log.push(`discard ${spec}`) };
    },
    replaceBottom: (device) => {
      const old = current;
      gate.swap(servingStack(device, { track: 'bitmap', granularity: 64 * 1024 }));
      current = device;
      return old;
    },
  };
  return { disk, gate, log };
}

const dest = (device: BlockDevice): Destination => ({ device, spec: device.name, created: false, initiallyZero: false });

test('swap to a local file: prepare, commit, then the destination is served', async () => {
  const src = new MemoryDevice(MiB, { name: 'src' }), dst = new MemoryDevice(MiB, { name: 'dst' });
  await dst.write(0, Buffer.alloc(4096, 7));
  const { disk, gate, log } = standIn(src);
  const h = swapToLocalFile(disk, dest(dst));
  const early = await h.commit().then(() => null, (e: Error) => e.message);
  assert.match(early ?? '', /commit before prepare/);
  await h.prepare();
  await gate.pause();
  await h.commit();
  assert.is(h.apply(), src);
  gate.resume();
  assert.equal(log, ['prepare dst', 'commit dst']);
  assert.equal(await gate.read(0, 4096), Buffer.alloc(4096, 7));
  assert.is(describeStack(gate).at(-1), 'dst');
});

test('hand over to the peer: nothing recorded, every later request refused with ESHUTDOWN naming the peer', async () => {
  const src = new MemoryDevice(MiB, { name: 'src' }), dst = new MemoryDevice(MiB, { name: 'peer-shim' });
  const { disk, gate, log } = standIn(src);
  const h = handOverToPeer(disk, dest(dst), 'root@hostb:22');
  await h.prepare();
  await gate.pause();
  await h.commit();
  assert.is(h.apply(), src, 'the source device is handed back for the job to close');
  gate.resume();
  assert.equal(log, [], 'no new backing is recorded here');
  for (const op of [() => gate.read(0, 4096), () => gate.write(0, Buffer.alloc(4096)), () => gate.flush()]) {
    const e = await op().then(() => null, (x: unknown) => x);
    assert.ok(e instanceof BlockError && e.errno === 'ESHUTDOWN', String(e));
    assert.match((e as Error).message, /moved to root@hostb:22/);
  }
  assert.equal(describeStack(gate), ['gate', 'tracker bitmap 64 KiB +heat', 'moved to root@hostb:22']);
  assert.is(gate.size, MiB, 'the size clients were promised stays');
});

test.run();
