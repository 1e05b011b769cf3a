// Gate over real file devices. A Latch layer between the gate and the file records the
// order in which requests reach it and can hold them, standing in for a slow device
// without any timing: the test decides when each request completes.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { BlockError, type BlockDevice, type WriteOpts } from '../../src/block/device.ts';
import { FileDevice } from '../../src/block/file.ts';
import { Gate } from '../../src/block/gate.ts';
import { Layer } from '../../src/block/layer.ts';
import { cleanupAll, onCleanup, tempDir } from '../helpers/proc.ts';

const SIZE = 1024 * 1024;
let dir = '';
let n = 0;

test.before(() => {
  dir = tempDir('vms-gate-');
});
test.after(cleanupAll);

/** Logs each request as it arrives ("write@4096") and, while `holding`, keeps it until released. */
class Latch extends Layer {
  log: string[] = [];
  holding = false;
  #waiting: Array<() => void> = [];

  get waiting(): number {
    return this.#waiting.length;
  }
  /** Let the oldest held request proceed. */
  releaseOne(): void {
    this.#waiting.shift()?.();
  }
  releaseAll(): void {
    this.holding = false;
    for (const go of this.#waiting.splice(0)) go();
  }
  async #arrive(entry: string): Promise<void> {
    this.log.push(entry);
    if (this.holding) await new Promise<void>((go) => this.#waiting.push(go));
  }
  override async read(offset: number, length: number): Promise<Buffer> {
    await this.#arrive(`read@${offset}`);
    return this.inner.read(offset, length);
  }
  override async write(offset: number, data: Buffer, opts?: WriteOpts): Promise<void> {
    await this.#arrive(`write@${offset}`);
    return this.inner.write(offset, data, opts);
  }
  override async writeZeroes(offset: number, length: number): Promise<void> {
    await this.#arrive(`zero@${offset}`);
    return this.inner.writeZeroes(offset, length);
  }
  override async flush(): Promise<void> {
    await this.#arrive('flush');
    return this.inner.flush();
  }
}

async function file(size = SIZE, opts: { readOnly?: boolean } = {}): Promise<FileDevice> {
  const path = join(dir, `g${n++}.raw`);
  let dev = await FileDevice.open(path, { create: { size } });
  if (opts.readOnly) {
    await dev.close();
    dev = await FileDevice.open(path, { readOnly: true });
  }
  onCleanup(() => dev.close());
  return dev;
}

/** Let pending promise callbacks and I/O completions run (no timing assumptions: several turns). */
async function settle(): Promise<void> {
  for (let i = 0; i < 5; i++) await new Promise((r) => setImmediate(r));
}

function fill(byte: number, length = 4096): Buffer {
  return Buffer.alloc(length, byte);
}

test('pause resolves only once the requests in flight have completed', async () => {
  const dev = await file();
  const latch = new Latch(dev);
  const gate = new Gate(latch);
  latch.holding = true;
  const writes = [0, 1, 2].map((i) => gate.write(i * 4096, fill(i + 1)));
  await settle();
  assert.is(gate.inFlight, 3);
  assert.is(latch.waiting, 3);

  let drained = false;
  const paused = gate.pause().then(() => { drained = true; });
  assert.ok(gate.paused);
  latch.releaseOne();
  latch.releaseOne();
  await Promise.all(writes.slice(0, 2));
  await settle();
  assert.not.ok(drained, 'pause resolved with a write still in flight');
  assert.is(gate.inFlight, 1);

  latch.releaseAll();
  await paused;
  assert.ok(drained);
  assert.is(gate.inFlight, 0);
  await Promise.all(writes);
  // The drained writes are really on the file.
  const onDisk = readFileSync(dev.path);
  for (let i = 0; i < 3; i++) assert.ok(onDisk.subarray(i * 4096, (i + 1) * 4096).equals(fill(i + 1)), `write ${i}`);
});

test('requests held while paused start in arrival order on resume, before later ones', async () => {
  const dev = await file();
  const latch = new Latch(dev);
  const gate = new Gate(latch);
  await gate.pause();
  const held = [
    gate.write(0, fill(0xa1)),
    gate.read(0, 4096),
    gate.writeZeroes(8192, 4096),
    gate.flush(),
    gate.write(16384, fill(0xb2)),
  ];
  await settle();
  assert.equal(latch.log, [], 'nothing reached the device while paused');
  assert.is(gate.held, 5);
  assert.is(gate.inFlight, 0);

  gate.resume();
  const later = gate.write(32768, fill(0xc3));
  assert.equal(latch.log, ['write@0', 'read@0', 'zero@8192', 'flush', 'write@16384', 'write@32768']);
  await Promise.all([...held, later]);
  assert.ok((await gate.read(16384, 4096)).equals(fill(0xb2)));
  assert.ok((await gate.read(32768, 4096)).equals(fill(0xc3)));
  assert.is(gate.held, 0);
});

test('swap is refused unless paused and drained, and for a different size or fewer capabilities', async () => {
  const a = await file();
  const latch = new Latch(a);
  const gate = new Gate(latch);
  const b = await file();
  assert.throws(() => gate.swap(b), /not paused/);

  latch.holding = true;
  const w = gate.write(0, fill(1));
  await settle();
  const paused = gate.pause();
  assert.throws(() => gate.swap(b), /in flight/);
  latch.releaseAll();
  await Promise.all([w, paused]);

  const bigger = await file(SIZE * 2);
  const readOnly = await file(SIZE, { readOnly: true });
  assert.throws(() => gate.swap(bigger), /size/);
  assert.throws(() => gate.swap(readOnly), /readOnly/);
  assert.is(gate.next, latch, 'refused swaps changed nothing');
  assert.is(gate.size, SIZE);
  gate.resume();
});

test('swap while paused sends held and later I/O to the new device only', async () => {
  const src = await file();
  const dst = await file();
  const gate = new Gate(src);
  await gate.write(0, fill(0x11));
  await gate.pause();
  const held = gate.write(4096, fill(0x22));
  const old: BlockDevice = gate.swap(dst);
  assert.is(old, src);
  gate.resume();
  await held;
  await gate.write(8192, fill(0x33));

  const s = readFileSync(src.path), d = readFileSync(dst.path);
  assert.ok(s.subarray(0, 4096).equals(fill(0x11)), 'source kept what was written before the swap');
  assert.ok(s.subarray(4096, 12288).equals(Buffer.alloc(8192)), 'source got nothing after the swap');
  assert.ok(d.subarray(4096, 8192).equals(fill(0x22)), 'held write went to the new device');
  assert.ok(d.subarray(8192, 12288).equals(fill(0x33)), 'later write went to the new device');
  assert.ok((await gate.read(0, 4096)).equals(Buffer.alloc(4096)), 'reads come from the new device');
});

test('close fails held requests with ESHUTDOWN', async () => {
  const gate = new Gate(await file());
  await gate.pause();
  const held = gate.read(0, 512).then(() => null, (err: unknown) => err);
  await gate.close();
  const err = await held;
  assert.instance(err, BlockError, 'held read completed after close');
  assert.is((err as BlockError).errno, 'ESHUTDOWN');
});

test.run();
