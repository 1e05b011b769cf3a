// vmshift's NBD server against the real tools: qemu-io, qemu-img, nbdinfo, nbdcopy and fio,
// serving raw files through FileDevice over unix sockets.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { createHash } from 'node:crypto';
import { closeSync, ftruncateSync, openSync, readFileSync, statSync, writeSync } from 'node:fs';
import { join } from 'node:path';
import { NbdServer } from '../../src/nbd/server.ts';
import { FileDevice } from '../../src/block/file.ts';
import { cleanupAll, onCleanup, run, runStatus, tempDir } from '../helpers/proc.ts';
import { pattern } from '../fixtures/nbd-raw.ts';

const MiB = 1024 * 1024;
const SIZE = 32 * MiB;

test.after(cleanupAll);

/** A sparse raw file of SIZE with data only in the MiB regions given as [offset, seed]. */
function sparseFile(path: string, regions: Array<[number, number]>): void {
  const fd = openSync(path, 'w');
  try {
    ftruncateSync(fd, SIZE);
    for (const [off, seed] of regions) writeSync(fd, pattern(MiB, seed), 0, MiB, off);
  } finally {
    closeSync(fd);
  }
}

async function serveFile(path: string, name = 'disk', readOnly = false): Promise<{ server: NbdServer; sock: string; uri: string; opts: string }> {
  const dev = await FileDevice.open(path, { readOnly });
  const sock = join(tempDir('nbdi-'), 's');
  const server = new NbdServer({ exports: [{ name, description: 'interop disk', device: dev }] });
  await server.listenUnix(sock);
  onCleanup(async () => { await server.close(); await dev.close(); });
  return { server, sock, uri: `nbd+unix:///${name}?socket=${sock}`, opts: `driver=nbd,server.type=unix,server.path=${sock},export=${name}` };
}

const sha = (path: string) => createHash('sha256').update(readFileSync(path)).digest('hex');
const allocated = (path: string) => statSync(path).blocks * 512;

test('qemu-io writes patterns and reads them back; qemu-img compare matches the file', async () => {
  const dir = tempDir('nbdi-');
  const file = join(dir, 'a.raw');
  sparseFile(file, []);
  const s = await serveFile(file);
  const io = (...cmds: string[]) => run('qemu-io', ['--image-opts', s.opts, ...cmds.flatMap((c) => ['-c', c])]);
  const w = await io('write -P 0xab 0 1M', 'write -P 0xcd 5M 512k', 'write -z 8M 1M', 'aio_write -P 0x11 10M 64k', 'aio_write -P 0x22 11M 64k', 'aio_flush');
  assert.not.match(w.stdout + w.stderr, /error|failed/i);
  const r = await io('read -P 0xab 0 1M', 'read -P 0xcd 5M 512k', 'read -P 0 1M 4M', 'read -P 0x11 10M 64k', 'read -P 0x22 11M 64k');
  assert.not.match(r.stdout + r.stderr, /fail/i);
  assert.is(r.stdout.match(/^read /gm)?.length, 5);
  // The check can fail: a wrong pattern is reported.
  const bad = await runStatus('qemu-io', ['--image-opts', s.opts, '-c', 'read -P 0xcd 0 4k']);
  assert.match(bad.stdout + bad.stderr, /Pattern verification failed/);
  await run('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', file, s.uri]);
  const file2 = join(dir, 'b.raw');
  sparseFile(file2, [[0, 1]]);
  const diff = await runStatus('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', file2, s.uri]);
  assert.is(diff.code, 1, 'compare notices a difference');
});

test('qemu-img map shows holes and data from block status', async () => {
  const file = join(tempDir('nbdi-'), 'm.raw');
  sparseFile(file, [[4 * MiB, 1], [20 * MiB, 2]]);
  const s = await serveFile(file);
  const map = JSON.parse((await run('qemu-img', ['map', '--output=json', '--image-opts', s.opts])).stdout) as Array<{ start: number; length: number; data: boolean; zero: boolean }>;
  const data = map.filter((e) => e.data).map((e) => [e.start, e.length]);
  assert.equal(data, [[4 * MiB, MiB], [20 * MiB, MiB]]);
  assert.ok(map.filter((e) => !e.data).every((e) => e.zero));
  assert.is(map.reduce((n, e) => n + e.length, 0), SIZE);
});

test('nbdinfo: plain info, --list and --map', async () => {
  const file = join(tempDir('nbdi-'), 'i.raw');
  sparseFile(file, [[MiB, 3]]);
  const s = await serveFile(file, 'named');
  const info = (await run('nbdinfo', [s.uri])).stdout;
  assert.match(info, /export-size: 33554432/);
  assert.match(info, /description: interop disk/);
  assert.match(info, /base:allocation/);
  assert.match(info, /can_multi_conn: true/);
  assert.match(info, /block_size_maximum: 33554432/);
  const list = (await run('nbdinfo', ['--list', `nbd+unix:///?socket=${s.sock}`])).stdout;
  assert.match(list, /export="named"/);
  const map = (await run('nbdinfo', ['--map', '--json', s.uri])).stdout;
  const extents = JSON.parse(map) as Array<{ offset: number; length: number; type: number }>;
  assert.equal(extents.map((e) => [e.offset, e.length, e.type]), [[0, MiB, 3], [MiB, MiB, 0], [2 * MiB, SIZE - 2 * MiB, 3]]);
});

test('nbdcopy with 4 connections both ways; sparse stays sparse', async () => {
  const dir = tempDir('nbdi-');
  const src = join(dir, 'src.raw');
  sparseFile(src, [[0, 1], [7 * MiB, 2], [30 * MiB, 3]]);
  // file -> our server (backed by an empty file)
  const dst = join(dir, 'dst.raw');
  sparseFile(dst, []);
  const into = await serveFile(dst);
  await run('nbdcopy', ['--connections=4', src, into.uri]);
  await run('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', src, into.uri]);
  assert.is(sha(dst), sha(src));
  // our server (backed by the sparse source) -> a new file
  const from = await serveFile(src, 'src', true);
  const out = join(dir, 'out.raw');
  sparseFile(out, []);
  await run('nbdcopy', ['--connections=4', from.uri, out]);
  assert.is(sha(out), sha(src));
  assert.ok(allocated(src) <= 4 * MiB, `source is sparse (${allocated(src)})`);
  assert.ok(allocated(out) <= allocated(src) + MiB, `copy stayed sparse: ${allocated(out)} bytes allocated vs ${allocated(src)}`);
  assert.ok(from.server.stats().bytesRead < SIZE, 'holes were not read as data');
});

test('fio nbd engine: random 4k writes at QD16 verify with crc32c', async () => {
  const file = join(tempDir('nbdi-'), 'f.raw');
  sparseFile(file, []);
  const s = await serveFile(file, 'fio');
  const r = await run('fio', ['--name=v', '--ioengine=nbd', `--uri=nbd+unix:///fio?socket=${s.sock}`, '--rw=randwrite', '--bs=4k', '--size=16M',
    '--iodepth=16', '--verify=crc32c', '--verify_state_save=0', '--do_verify=1', '--output-format=json']);
  const job = (JSON.parse(r.stdout.slice(r.stdout.indexOf('{'))) as { jobs: Array<{ error: number; write: { io_bytes: number }; read: { io_bytes: number } }> }).jobs[0]!;
  assert.is(job.error, 0);
  assert.is(job.write.io_bytes, 16 * MiB);
  assert.is(job.read.io_bytes, 16 * MiB, 'everything written was read back and verified');
  assert.is(s.server.stats().errors, 0);
});

test.run();
