// The link's frame reader enforces its state table (errors naming state, frame and peer),
// checks CRCs and sizes, reassembles frames split anywhere; HELLO from another link is
// refused; known_hosts matching (plain, hashed, [host]:port, @revoked) refuses with the
// host and fingerprint.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { createHmac, generateKeyPairSync, randomBytes } from 'node:crypto';
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { Frame, FrameReader, encodeFrame, encodeHello, parseHello, MAX_DATA, type FrameIn } from '../../src/link/frames.ts';
import { fingerprint, verifyHostKey } from '../../src/link/known-hosts.ts';
import { cleanupAll, tempDir } from '../helpers/proc.ts';

test.after(cleanupAll);

const hello = encodeHello({ v: 1, link: 'L', migration: 'M', role: 'a', send: [], recv: [] });

test('frames split at every byte boundary are reassembled; state moves AWAIT_HELLO -> READY -> CLOSED', () => {
  const payload = randomBytes(5000);
  const wire = Buffer.concat([...hello, ...encodeFrame(Frame.DATA, 2, 12345, payload), ...encodeFrame(Frame.BYE, 0, 0)]);
  for (const step of [1, 7, 19, 20, 21, 4096]) {
    const got: FrameIn[] = [];
    const r = new FrameReader('peer-x', (f) => got.push(f));
    for (let i = 0; i < wire.length; i += step) r.push(wire.subarray(i, i + step));
    assert.equal(got.map((f) => f.type), [Frame.HELLO, Frame.DATA, Frame.BYE]);
    assert.is(got[1].offset, 12345);
    assert.is(got[1].stream, 2);
    assert.ok(got[1].payload.equals(payload));
    assert.is(r.state, 'CLOSED');
  }
});

test('a frame the state does not allow, a bad CRC and an oversized frame are refused, naming state, frame and peer', () => {
  const r1 = new FrameReader('root@10.0.0.2:22', () => {});
  assert.throws(() => r1.push(Buffer.concat(encodeFrame(Frame.DATA, 0, 0, Buffer.from('x')))), /DATA is not allowed in state AWAIT_HELLO \(peer root@10\.0\.0\.2:22\)/);
  assert.is(r1.state, 'DEAD');
  const r2 = new FrameReader('p', () => {});
  r2.push(Buffer.concat(hello));
  // DATA: the CRC covers the header (its offset here); the payload is the carrier's AEAD's to guard.
  const bad = Buffer.concat(encodeFrame(Frame.DATA, 0, 0, Buffer.from('hello')));
  bad[15] ^= 1;
  assert.throws(() => r2.push(bad), /DATA frame failed its checksum in state READY \(peer p\)/);
  const r5 = new FrameReader('p', () => {});
  r5.push(Buffer.concat(hello));
  const badOpen = Buffer.concat(encodeFrame(Frame.OPEN, 0, 0, Buffer.from('memory')));
  badOpen[badOpen.length - 1] ^= 1;
  assert.throws(() => r5.push(badOpen), /OPEN frame failed its checksum in state READY/);
  const r3 = new FrameReader('p', () => {});
  r3.push(Buffer.concat(hello));
  const big = Buffer.concat(encodeFrame(Frame.DATA, 0, 0, Buffer.alloc(MAX_DATA + 1)));
  assert.throws(() => r3.push(big.subarray(0, 20)), /exceeds the limit/);
  const r4 = new FrameReader('p', () => {});
  r4.push(Buffer.concat(hello));
  assert.throws(() => r4.push(Buffer.concat(hello)), /HELLO is not allowed in state READY/);
});

test('HELLO from another link, migration or the same role is a MISMATCH', () => {
  const h = (o: object) => Buffer.from(JSON.stringify({ v: 1, link: 'L', migration: 'M', role: 'a', send: [], recv: [], ...o }));
  const expect = { link: 'L', migration: 'M', role: 'b' as const };
  assert.is(parseHello(h({}), expect, 'p').link, 'L');
  assert.throws(() => parseHello(h({ link: 'OTHER' }), expect, 'p'), /peer p is on link OTHER \(migration M\), expected link L/);
  assert.throws(() => parseHello(h({ migration: 'M0' }), expect, 'p'), /migration M0/);
  assert.throws(() => parseHello(h({ role: 'b' }), expect, 'p'), /claims role b, which is ours/);
  assert.throws(() => parseHello(h({ recv: [{ id: 0, offset: -1, fin: false }] }), expect, 'p'), /malformed HELLO/);
});

test('known_hosts: plain, hashed and [host]:port entries match; other keys, unknown hosts and @revoked refuse', () => {
  const dir = tempDir();
  const key = () => generateKeyPairSync('ed25519').publicKey.export({ type: 'spki', format: 'der' });
  // An SSH ed25519 blob: string "ssh-ed25519", string key(32)
  const sshBlob = (der: Buffer) => { const k = der.subarray(der.length - 32); const t = Buffer.from('ssh-ed25519'); const b = Buffer.alloc(4 + t.length + 4 + 32); b.writeUInt32BE(t.length, 0); t.copy(b, 4); b.writeUInt32BE(32, 4 + t.length); k.copy(b, 8 + t.length); return b; };
  const good = sshBlob(key()), other = sshBlob(key());
  const line = (host: string, b: Buffer) => `${host} ssh-ed25519 ${b.toString('base64')}`;
  const salt = randomBytes(20);
  const hashed = `|1|${salt.toString('base64')}|${createHmac('sha1', salt).update('[10.1.1.2]:2222').digest('base64')}`;
  const file = join(dir, 'kh');
  writeFileSync(file, [line('[10.1.1.2]:2222', good), line(hashed, good), line('host.example,10.9.9.9', good), `@revoked ${line('10.7.7.7', good)}`, ''].join('\n'));
  verifyHostKey(file, '10.1.1.2', 2222, good);
  verifyHostKey(file, '10.9.9.9', 22, good);
  assert.throws(() => verifyHostKey(file, '10.1.1.2', 2222, other), new RegExp(`HOST KEY MISMATCH for \\[10\\.1\\.1\\.2\\]:2222: it offers ssh-ed25519 ${fingerprint(other).replace(/[+/]/g, '\\$&')}`));
  assert.throws(() => verifyHostKey(file, '10.1.1.3', 22, good), /host 10\.1\.1\.3 is unknown: it offers ssh-ed25519 SHA256:/);
  assert.throws(() => verifyHostKey(file, '10.7.7.7', 22, good), /@revoked/);
  writeFileSync(file, line(hashed, good));
  verifyHostKey(file, '10.1.1.2', 2222, good); // a file with hashed entries only
});

test.run();
