// FinishAnswerWatch (src/libvirt/finish-answer.ts): it must say "Finish succeeded" for the
// chunk that completes a successful reply to Finish and for nothing else (an error reply, a
// call, another procedure, another program), however the stream is cut into chunks; and
// forwardUnix's tap must report the chunk delivered only once it is in the client's socket.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { connect } from 'node:net';
import { Duplex, PassThrough } from 'node:stream';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { FinishAnswerWatch } from '../../src/libvirt/finish-answer.ts';
import { forwardUnix } from '../../src/relay/unix-splice.ts';

const REMOTE = 0x20008086;
const KEEPALIVE = 0x6b656570;

function msg(prog: number, proc: number, type: number, status: number, body = 0): Buffer {
  const b = Buffer.alloc(28 + body, 0xee);
  b.writeUInt32BE(28 + body, 0);
  for (const [i, v] of [prog, 1, proc, type, 7, status].entries()) b.writeUInt32BE(v, 4 + 4 * i);
  return b;
}

/** Indices (in bytes of the whole stream) of the chunks for which feed() said yes. */
function hits(stream: Buffer, chunk: number): number[] {
  const w = new FinishAnswerWatch();
  const out: number[] = [];
  for (let i = 0; i < stream.length; i += chunk) if (w.feed(stream.subarray(i, i + chunk))) out.push(Math.min(i + chunk, stream.length));
  return out;
}

test('a successful Finish3Params reply is seen at its last byte, among other messages, for every chunking', () => {
  const before = Buffer.concat([msg(REMOTE, 306, 0, 0, 100), msg(KEEPALIVE, 1, 2, 0), msg(REMOTE, 305, 1, 0, 40), msg(REMOTE, 306, 1, 1, 64)]);
  const finish = msg(REMOTE, 306, 1, 0, 90);
  const stream = Buffer.concat([before, finish, msg(REMOTE, 307, 1, 0, 8)]);
  const end = before.length + finish.length;
  for (const chunk of [1, 3, 27, 28, 29, 100, stream.length]) {
    const h = hits(stream, chunk);
    assert.equal(h.length, 1, `chunk ${chunk}: ${h}`);
    assert.ok(h[0]! >= end && h[0]! - chunk < end, `chunk ${chunk}: seen at ${h[0]}, the reply ends at ${end}`);
  }
  // The old (non-params) Finish3, a reply without a body.
  assert.equal(hits(msg(REMOTE, 217, 1, 0), 5), [28]);
});

test('an error reply to Finish, a Finish call, another program, or garbage framing: never a success', () => {
  const stream = Buffer.concat([msg(REMOTE, 306, 1, 1, 50), msg(REMOTE, 306, 0, 0, 50), msg(KEEPALIVE, 306, 1, 0), msg(REMOTE, 217, 2, 0)]);
  for (const chunk of [1, 13, stream.length]) assert.equal(hits(stream, chunk), []);
  const bad = Buffer.alloc(64);
  bad.writeUInt32BE(3, 0); // a length shorter than the header: the watch stops reading
  assert.equal(hits(Buffer.concat([bad, msg(REMOTE, 306, 1, 0)]), 7), []);
});

test('forwardUnix tap: each chunk from the peer is reported delivered once it is in the client\'s socket', async () => {
  const dir = mkdtempSync(join(tmpdir(), 'finish-answer-'));
  try {
    const toClient = new PassThrough();
    const peer = Duplex.from({ readable: toClient, writable: new PassThrough() });
    const seen: Array<Promise<boolean>> = [];
    const fwd = await forwardUnix(join(dir, 's'), () => peer, (n, chunk, delivered) => { assert.equal(n, 0); seen.push(delivered); });
    const client = connect(join(dir, 's'));
    await new Promise((r) => client.once('connect', r));
    const got: Buffer[] = [];
    client.on('data', (d: Buffer) => got.push(d));
    toClient.write(msg(REMOTE, 306, 1, 0, 10));
    for (let i = 0; i < 100 && seen.length === 0; i++) await new Promise((r) => setTimeout(r, 10));
    assert.equal(await seen[0], true);
    for (let i = 0; i < 100 && Buffer.concat(got).length < 38; i++) await new Promise((r) => setTimeout(r, 10));
    assert.equal(Buffer.concat(got), msg(REMOTE, 306, 1, 0, 10));
    client.destroy();
    fwd.close();
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test.run();
