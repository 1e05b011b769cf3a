// What clients can make a real `vmshift serve` hold: clients that send READs and never read
// the replies (the issue-11 replay: 32 of them took a shim from 72 MiB to 2.16 GiB, for
// good) stay within the byte budget, other clients are still served meanwhile (qemu-io reads
// the right bytes, nbdinfo connects), connections beyond --max-connections are closed, and
// the memory comes back once the hoarders leave.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { join } from 'node:path';
import { readFileSync, writeFileSync } from 'node:fs';
import { connect, type Socket } from 'node:net';
import { tempDir, startDaemon, waitForSocket, run, runStatus, cleanupAll, onCleanup } from '../helpers/proc.ts';

const vmshift = new URL('../../bin/vmshift', import.meta.url).pathname;
const MiB = 1024 * 1024;
test.after(cleanupAll);

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));
const rssMiB = (pid: number) => Number(/VmRSS:\s+(\d+)/.exec(readFileSync(`/proc/${pid}/status`, 'utf8'))![1]) / 1024;

/** Bytes at `offset` of the served file (no two MiB alike, none zero: replies carry data). */
function content(size: number): Buffer {
  const b = Buffer.alloc(size);
  for (let i = 0; i < size; i += 4) b.writeUInt32LE((Math.imul(i, 2654435761) | 1) >>> 0, i);
  return b;
}

/** A raw client past the handshake (NBD_OPT_EXPORT_NAME, no zeroes), or null when the server closed it. */
async function rawClient(sock: string): Promise<Socket | null> {
  const s = connect(sock);
  onCleanup(() => { s.destroy(); });
  let got = Buffer.alloc(0);
  const need = (n: number) => new Promise<Buffer | null>((resolve) => {
    const check = () => {
      if (got.length >= n) {
        const out = got.subarray(0, n);
        got = got.subarray(n);
        s.off('data', onData);
        s.off('close', onClose);
        resolve(out);
        return true;
      }
      return false;
    };
    const onData = (b: Buffer) => { got = Buffer.concat([got, b]); check(); };
    const onClose = () => resolve(null);
    if (!check()) { s.on('data', onData); s.on('close', onClose); }
  });
  s.on('error', () => {});
  if (!(await need(18))) return null; // NBDMAGIC, IHAVEOPT, handshake flags
  const hello = Buffer.alloc(4 + 16 + 4);
  hello.writeUInt32BE(3, 0); // FIXED_NEWSTYLE | NO_ZEROES
  hello.write('IHAVEOPT', 4);
  hello.writeUInt32BE(1, 12); // NBD_OPT_EXPORT_NAME
  hello.writeUInt32BE(4, 16);
  hello.write('disk', 20);
  s.write(hello);
  if (!(await need(10))) return null; // size, transmission flags
  return s;
}

/** `n` READ requests of `len` bytes at offsets cycling through `span`. */
function reads(n: number, len: number, span: number): Buffer {
  const b = Buffer.alloc(28 * n);
  for (let i = 0; i < n; i++) {
    const p = 28 * i;
    b.writeUInt32BE(0x25609513, p);
    b.writeUInt16BE(0, p + 6); // NBD_CMD_READ
    b.writeBigUInt64BE(BigInt(i), p + 8);
    b.writeBigUInt64BE(BigInt((i * len) % span), p + 16);
    b.writeUInt32BE(len, p + 24);
  }
  return b;
}

test('clients that never read their replies hold at most the byte budget; others are served; memory comes back', async () => {
  const dir = tempDir('vmshift-mem-');
  const file = join(dir, 'disk.raw');
  const size = 64 * MiB;
  const data = content(size);
  writeFileSync(file, data);
  const sock = join(dir, 'd.sock');
  const hoarders = 32;
  // Room for the hoarders and one more client at a time.
  const shim = startDaemon(vmshift, ['serve', file, '--socket', sock, '--max-connections', String(hoarders + 1)]);
  await waitForSocket(`${sock}.ctl`, shim);
  const pid = shim.proc.pid!;
  // Warm up the read path first, so the baseline includes what any reader costs.
  assert.is((await runStatus('nbdcopy', [`nbd+unix:///disk?socket=${sock}`, 'null:'])).code, 0);
  await sleep(1500);
  const before = rssMiB(pid);

  const clients: Socket[] = [];
  for (let i = 0; i < hoarders; i++) {
    const c = await rawClient(sock);
    assert.ok(c, `hoarder ${i} connected`);
    c!.pause(); // never reads: replies back up into the shim
    c!.write(reads(128, MiB, size)); // 128 MiB of reads each
    clients.push(c!);
  }
  await sleep(3000);
  const during = rssMiB(pid);

  // Another client is served meanwhile, with the right bytes.
  const off = 5 * MiB;
  const io = await run('qemu-io', ['-r', '--image-opts', `driver=nbd,server.type=unix,server.path=${sock},export=disk`, '-c', `read -v ${off} 64`]);
  // qemu-io -v prints "OFFSET:  xx xx ... (16 bytes)  ascii" lines.
  const hex = [...io.stdout.matchAll(/^[0-9a-f]{8}: ((?: [0-9a-f]{2}){1,16})/gm)].map((m) => m[1]!.replace(/ /g, '')).join('');
  assert.ok(Buffer.from(hex, 'hex').equals(data.subarray(off, off + 64)), `qemu-io read the file's bytes at ${off}: ${io.stdout}`);
  const info = await runStatus('nbdinfo', ['--size', `nbd+unix:///disk?socket=${sock}`]);
  assert.is(info.stdout.trim(), String(size), info.stderr);

  // At the limit a new connection is closed before the handshake.
  const idle = await rawClient(sock);
  assert.ok(idle, `connection ${hoarders + 1} of ${hoarders + 1} accepted`);
  assert.is(await rawClient(sock), null, 'one past --max-connections is closed');
  const refused = await runStatus('nbdinfo', ['--size', `nbd+unix:///disk?socket=${sock}`]);
  assert.ok(refused.code !== 0, 'nbdinfo is refused while the shim is full');
  idle!.destroy();

  for (const c of clients) c.destroy();
  let after = rssMiB(pid);
  for (let i = 0; i < 50 && after > before + 24; i++) {
    await sleep(200);
    after = rssMiB(pid);
  }
  // What they held comes back as the shim sees them go (their replies may sit in the socket
  // buffers rather than in the shim's memory: sendfile, so RSS alone does not wait for it).
  const held = async () => JSON.parse((await run(vmshift, ['status', '--socket', sock, '--json'])).stdout);
  let status = await held();
  for (let i = 0; i < 50 && status.nbd.heldBytes !== 0; i++) {
    await sleep(200);
    status = await held();
  }
  if (process.env.VMSHIFT_TEST_VERBOSE) process.stderr.write(`RSS before ${before.toFixed(1)} during ${during.toFixed(1)} after ${after.toFixed(1)} MiB\n`);
  // 64 MiB budget + a 2 MiB reserve per hoarder (server-budget.ts) + what Node keeps around.
  assert.ok(during - before < 64 + hoarders * 2 + 40, `RSS ${before.toFixed(0)} -> ${during.toFixed(0)} MiB with ${hoarders} hoarders (was +2 GiB)`);
  assert.ok(after - before < 24, `RSS back to ${after.toFixed(0)} MiB after they left (from ${during.toFixed(0)}, baseline ${before.toFixed(0)})`);
  assert.is(status.nbd.heldBytes, 0, 'nothing held once they left');
  assert.ok(status.nbd.refused >= 2, `refusals counted: ${status.nbd.refused}`);
  await shim.stop();
});

test.run();
