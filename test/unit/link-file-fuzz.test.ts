// Fuzz of the shared-file carrier: records corrupted, truncated, reordered or replayed from
// another link are never delivered. Reader level: many random damages, the reader returns
// exactly the undamaged prefix. Link level: a damaged file planted where the peer's file
// belongs is never delivered, and the stream's bytes come from the network instead.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { randomBytes } from 'node:crypto';
import { readFileSync, writeFileSync, rmSync, chmodSync, statSync } from 'node:fs';
import { join } from 'node:path';
import { IncompleteHeader, RecordReader, RecordWriter, encodeRecord, linkSeed, Rec, REC_HEADER } from '../../src/link/record-file.ts';
import { SharedDir } from '../../src/link/shared-dir.ts';
import type { LinkStream } from '../../src/link/stream.ts';
import { cleanupAll, tempDir } from '../helpers/proc.ts';
import { digest, linkPair, sleep, writeRandom } from '../helpers/link-pair.ts';

test.after.each(cleanupAll);

const id = { link: 'L1', migration: 'M1', from: 'a' as const };

/** A valid data file of `n` records; returns the path, the payloads and each record's file position. */
function makeFile(dir: string, name: string, n: number, seed = linkSeed(id.link, id.migration), migration = id.migration) {
  const path = join(dir, name);
  rmSync(path, { force: true });
  const w = new RecordWriter(path, seed, { link: id.link, migration, from: 'a', kind: 'data', stream: 0, name: 's' });
  const payloads: Buffer[] = [];
  const pos: number[] = [];
  let off = 0;
  for (let i = 0; i < n; i++) {
    const p = randomBytes(1 + Math.floor(Math.random() * 3000));
    pos.push(w.append([encodeRecord(seed, Rec.DATA, 0, off, p)], false)[0]);
    payloads.push(p);
    off += p.length;
  }
  w.close();
  return { path, payloads, pos };
}

function readAll(path: string): Buffer[] {
  const r = new RecordReader(path, linkSeed(id.link, id.migration), id);
  // limit 0: a receiver with nothing from the network, so only contiguous records are taken
  const out = r.readNew(0).map((x) => x.payload);
  r.close();
  return out;
}

test('reader: random corruption, truncation, reordering and foreign records yield only the intact prefix', () => {
  const dir = tempDir();
  const other = linkSeed('L0', 'M0'); // an older link's records, same offsets
  let cases = 0;
  for (let round = 0; round < 60; round++) {
    const n = 8;
    const f = makeFile(dir, 'f.data', n);
    const k = 1 + Math.floor(Math.random() * (n - 2)); // the damaged record
    const bytes = readFileSync(f.path);
    const start = f.pos[k], end = f.pos[k + 1];
    const kind = round % 4;
    let damaged: Buffer;
    if (kind === 0) { // one bit flipped anywhere in the record (header or payload)
      damaged = Buffer.from(bytes);
      const at = start + Math.floor(Math.random() * (end - start));
      damaged[at] ^= 1 << Math.floor(Math.random() * 8);
    } else if (kind === 1) { // cut inside the record (a writer that died, a full disk)
      damaged = bytes.subarray(0, start + 1 + Math.floor(Math.random() * (end - start - 1)));
    } else if (kind === 2) { // records k and k+1 swapped
      const next = f.pos[k + 2] ?? bytes.length;
      damaged = Buffer.concat([bytes.subarray(0, start), bytes.subarray(end, next), bytes.subarray(start, end), bytes.subarray(next)]);
    } else { // record k replaced by the same offsets and bytes from another link
      let off = 0;
      for (let i = 0; i < k; i++) off += f.payloads[i].length;
      damaged = Buffer.concat([bytes.subarray(0, start), ...encodeRecord(other, Rec.DATA, 0, off, f.payloads[k]), bytes.subarray(end)]);
    }
    writeFileSync(f.path, damaged);
    const got = readAll(f.path);
    assert.equal(got, f.payloads.slice(0, k), `damage ${kind} at record ${k}: only the ${k} records before it`);
    cases++;
  }
  assert.is(cases, 60);
});

test('reader: a file from another migration, or another link, is refused at its header', () => {
  const dir = tempDir();
  const f = makeFile(dir, 'm.data', 3, linkSeed(id.link, 'M0'), 'M0');
  assert.throws(() => readAll(f.path), /belongs to another link or migration|was written by link L1 \(migration M0/);
  const g = makeFile(dir, 'g.data', 3, linkSeed('L0', id.migration));
  assert.throws(() => readAll(g.path), /belongs to another link or migration/);
  writeFileSync(join(dir, 'junk.data'), randomBytes(500));
  assert.throws(() => readAll(join(dir, 'junk.data')), /not a vmshift link file/);
});

test('reader: a file whose header is still being written is waited for, not refused; the peer\'s file is read once it is complete', () => {
  const dir = tempDir();
  const f = makeFile(dir, 'full.data', 2);
  const whole = readFileSync(f.path);
  for (const cut of [0, 5, 8, 12, 16, 30]) {
    const p = join(dir, `partial${cut}.data`);
    writeFileSync(p, whole.subarray(0, cut));
    assert.throws(() => new RecordReader(p, linkSeed(id.link, id.migration), id), (e: Error) => e instanceof IncompleteHeader, `header cut at ${cut}`);
  }
  // The race the migration benchmark hit: side b has created its ack file but not yet written
  // its header when side a first looks. Side a must read it later, with no warning.
  const warnings: string[] = [];
  const a = new SharedDir({ dir, link: 'LR', migration: 'MR', role: 'a' }, (m) => warnings.push(m));
  a.open();
  writeFileSync(a.ackPath('b'), '', { mode: 0o600 });
  assert.equal(a.readPeer(() => 0).acks, []);
  rmSync(a.ackPath('b'));
  const b = new SharedDir({ dir, link: 'LR', migration: 'MR', role: 'b' }, (m) => warnings.push(m));
  b.open();
  b.appendAcks([encodeRecord(b.seed, Rec.BEAT, 0, 0, Buffer.alloc(0))]);
  assert.is(a.readPeer(() => 0).acks.length, 1, "b's heartbeat is read");
  assert.equal(warnings, []);
});

test('shared dir: a peer file whose header is still being written is read once it is complete, not refused', () => {
  const dir = tempDir();
  const shared = new SharedDir({ dir, link: id.link, migration: id.migration, role: 'b' }, (m) => { throw new Error(`warned: ${m}`); });
  const f = makeFile(dir, 'tmp.data', 2);
  const whole = readFileSync(f.path);
  const path = join(dir, `vmshift-link-${id.link}.a.s0.data`);
  writeFileSync(path, whole.subarray(0, 5)); // created, header not all there yet
  assert.equal(shared.readPeer(() => 0).data, []);
  writeFileSync(path, whole);
  const got = shared.readPeer(() => 0).data;
  assert.equal(got.flatMap((d) => d.records.map((r) => r.payload)), f.payloads);
});

test('writer: files are 0600, never follow a symlink, never reuse an existing file', () => {
  const dir = tempDir();
  const f = makeFile(dir, 'w.data', 1);
  assert.is(statSync(f.path).mode & 0o777, 0o600);
  const seed = linkSeed(id.link, id.migration);
  const hdr = { link: id.link, migration: id.migration, from: 'a' as const, kind: 'data' as const, stream: 0 };
  assert.throws(() => new RecordWriter(f.path, seed, hdr), /EEXIST/);
  chmodSync(f.path, 0o600);
});

test('link: a planted damaged file is never delivered; the bytes come from the network', async () => {
  for (const damage of ['corrupt', 'reordered', 'other-link', 'other-migration'] as const) {
    const link = `fz${randomBytes(3).toString('hex')}`;
    const dir = tempDir();
    // What the file says side a wrote: other bytes than a sends, so any byte delivered from
    // the file would change the sha256 side b sees.
    const migration = damage === 'other-migration' ? 'M0' : 'M1';
    const seed = linkSeed(damage === 'other-link' ? 'old' : link, migration);
    const path = join(dir, `vmshift-link-${link}.a.s0.data`);
    const w = new RecordWriter(path, seed, { link, migration, from: 'a', kind: 'data', stream: 0, name: 'bulk' });
    const recs = [encodeRecord(seed, Rec.DATA, 0, 0, randomBytes(4096)), encodeRecord(seed, Rec.DATA, 0, 4096, randomBytes(4096))];
    w.append(damage === 'reordered' ? [recs[1], recs[0]] : recs, false);
    w.close();
    if (damage === 'corrupt') {
      const b = readFileSync(path);
      b[b.length - 4096 - REC_HEADER - 100] ^= 0xff; // inside the first record's payload
      writeFileSync(path, b);
    }
    // Side b reads the shared dir; side a is network-only (its own file would collide with the planted one).
    const p = linkPair({ link, migration: 'M1', dir, sharedSide: 'b', filePollMs: 5 });
    const warnings: string[] = [];
    p.b.on('warning', (m) => warnings.push(m));
    const rx = new Promise<LinkStream>((r) => p.b.once('stream', (s: LinkStream) => { s.end(); r(s); }));
    p.network(false);
    await sleep(100); // b polls the planted file twenty times with nothing else to go on
    for (const s of p.b.allStreams) assert.is(s.recvNext, 0, `${damage}: nothing delivered from the planted file`);
    if (damage !== 'reordered') assert.ok(warnings.some((m) => m.includes(path)), `${damage}: warned about ${path} (${warnings.join('; ')})`);
    p.network(true);
    const s = p.a.stream('bulk');
    const [sent, got] = await Promise.all([writeRandom(s, 64 * 1024, 3), rx.then(digest)]);
    assert.is(got.sha, sent, `${damage}: side b has exactly what side a sent`);
    await Promise.all([p.a.finish(), p.b.finish()]);
  }
});

test.run();
