// The tiny real guest on a raw file served by qemu-nbd: what it writes is byte-for-byte what
// the host-side checkers expect, its own verify mode and the checkers catch damage, and the
// sequence writer never loses an acknowledged record when QEMU is stopped under it.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { closeSync, openSync, readFileSync, writeSync } from 'node:fs';
import { join } from 'node:path';
import { connect } from 'node:net';
import { cleanupAll, run, startDaemon, tempDir, waitForSocket } from '../helpers/proc.ts';
import { bootGuest, ensureGuest, expectedRecord, verifyPattern, verifyWriterLog, type BootOptions } from '../helpers/guest.ts';

const BS = 4096;
const DISK_MIB = 16;
// Pattern blocks sit at 8..263, the writer's slots at 1000..1031: neither touches the other.
const PAT = { start: 8, blocks: 256, seed: 4242 };
const WRITER = { start: 1000, blocks: 32 };

let dir = '', file = '', sock = '';

test.before(async () => {
  await ensureGuest();
  dir = tempDir('vmshift-guest-');
  file = join(dir, 'disk.raw');
  sock = join(dir, 'nbd.sock');
  await run('qemu-img', ['create', '-q', '-f', 'raw', file, `${DISK_MIB}M`]);
  const nbd = startDaemon('qemu-nbd', ['-t', '-e', '8', '-f', 'raw', '-k', sock, '-x', 'disk', file]);
  await waitForSocket(sock, nbd);
});
test.after(cleanupAll);

/** Boot a guest on the NBD disk, wait for its final line and for QEMU to exit. */
async function runToEnd(opts: Omit<BootOptions, 'disk'>, last: RegExp): Promise<RegExpMatchArray> {
  const g = bootGuest({ ...opts, disk: { nbdSocket: sock, exportName: 'disk' } });
  const t0 = Date.now();
  await g.waitFor(/^VMSHIFT-BOOTED$/);
  console.log(`  guest mode=${opts.mode} booted in ${((Date.now() - t0) / 1000).toFixed(1)} s`);
  const m = await g.waitFor(last);
  await g.waitFor(/^VMSHIFT-DONE$/);
  assert.is(await g.waitExit(), 0, 'QEMU exits cleanly after the guest powers off');
  return m;
}

function writeAt(offset: number, data: Buffer): void {
  const fd = openSync(file, 'r+');
  try { writeSync(fd, data, 0, data.length, offset); } finally { closeSync(fd); }
}

test('pattern mode writes exactly the blocks the host expects, and nothing else', async () => {
  const m = await runToEnd({ mode: 'pattern', params: PAT }, /^VMSHIFT-WROTE (\d+)$/);
  assert.is(Number(m[1]), PAT.blocks);
  assert.equal(verifyPattern(file, PAT.blocks, PAT.seed, { start: PAT.start }), []);
  // The checker is not blind: another seed makes every block wrong.
  assert.is(verifyPattern(file, PAT.blocks, PAT.seed + 1, { start: PAT.start }).length, PAT.blocks);
  const disk = readFileSync(file);
  assert.ok(disk.subarray(0, PAT.start * BS).every((b) => b === 0), 'blocks before start untouched');
  const end = (PAT.start + PAT.blocks) * BS;
  assert.ok(disk.subarray(end, end + 64 * BS).every((b) => b === 0), 'blocks after the pattern untouched');
});

test('verify mode accepts the pattern and names the first damaged block', async () => {
  await runToEnd({ mode: 'verify', params: PAT }, /^VMSHIFT-VERIFY-OK$/);
  // Damage one 512-byte sector in the middle of block start+100 (a torn or stale sector).
  const victim = PAT.start + 100;
  writeAt(victim * BS + 1024, Buffer.alloc(512, 0x41));
  assert.equal(verifyPattern(file, PAT.blocks, PAT.seed, { start: PAT.start }), [victim]);
  const m = await runToEnd({ mode: 'verify', params: PAT }, /^VMSHIFT-VERIFY-(OK|BAD \d+)$/);
  assert.is(m[0], `VMSHIFT-VERIFY-BAD ${victim}`);
});

test('writer: after QEMU is stopped mid-run, every slot holds its newest acknowledged record', async () => {
  const g = bootGuest({ mode: 'writer', params: WRITER, disk: { nbdSocket: sock, exportName: 'disk' } });
  await g.waitFor(/^VMSHIFT-SEQ 300$/);
  await g.stop(); // hard stop while records are still being written
  const last = g.lastSeq();
  assert.ok(last >= 300, `last acknowledged record ${last}`);
  assert.equal(verifyWriterLog(file, last, WRITER.blocks, { start: WRITER.start }), []);

  // The checker catches a lost write: put an older record back into the slot of `last`.
  const slot = last % WRITER.blocks;
  writeAt((WRITER.start + slot) * BS, expectedRecord(last - WRITER.blocks, WRITER.blocks));
  // ... and a torn one: one sector of another slot zeroed.
  const torn = (slot + 5) % WRITER.blocks;
  writeAt((WRITER.start + torn) * BS + 2048, Buffer.alloc(512));
  const bad = verifyWriterLog(file, last, WRITER.blocks, { start: WRITER.start });
  assert.equal(bad.map((b) => b.slot).sort((a, b) => a - b), [slot, torn].sort((a, b) => a - b));
  const lost = bad.find((b) => b.slot === slot)!;
  assert.is(lost.expected, last);
  assert.is(lost.found, `record ${last - WRITER.blocks}`);
  assert.match(bad.find((b) => b.slot === torn)!.found, /^torn record \d+$/);
});

/** One QMP command over a fresh connection (greeting, qmp_capabilities, command). */
function qmp(path: string, execute: string): Promise<unknown> {
  return new Promise((resolve, reject) => {
    const s = connect(path);
    let buf = '', sent = 0;
    s.on('error', reject);
    s.on('data', (d) => {
      buf += d;
      for (let nl = buf.indexOf('\n'); nl >= 0; nl = buf.indexOf('\n')) {
        const msg = JSON.parse(buf.slice(0, nl)) as Record<string, unknown>;
        buf = buf.slice(nl + 1);
        if ('error' in msg) { s.destroy(); reject(new Error(`QMP ${execute}: ${JSON.stringify(msg.error)}`)); return; }
        if ('QMP' in msg) { s.write('{"execute":"qmp_capabilities"}\n'); sent = 1; }
        else if ('return' in msg && sent === 1) { s.write(JSON.stringify({ execute }) + '\n'); sent = 2; }
        else if ('return' in msg && sent === 2) { s.destroy(); resolve(msg.return); }
      }
    });
  });
}

test('idle mode reports READY and keeps running, reachable over QMP', async () => {
  const qmpSocket = join(dir, 'qmp.sock');
  const g = bootGuest({ mode: 'idle', qmpSocket });
  await g.waitFor(/^VMSHIFT-READY$/);
  const status = await qmp(qmpSocket, 'query-status') as { status: string; running: boolean };
  assert.is(status.status, 'running');
  assert.is(status.running, true);
  await g.stop();
});

test('dirty mode keeps rewriting guest memory pass after pass', async () => {
  const g = bootGuest({ mode: 'dirty', params: { mib: 8 } });
  await g.waitFor(/^VMSHIFT-READY$/);
  await g.waitFor(/^VMSHIFT-DIRTY 3$/);
  const passes = g.lines().filter((l) => l.startsWith('VMSHIFT-DIRTY ')).map((l) => Number(l.split(' ')[1]));
  assert.equal(passes.slice(0, 3), [1, 2, 3], 'passes are numbered in order');
  await g.stop();
});

test.run();
