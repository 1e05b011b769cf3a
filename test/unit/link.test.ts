// The resumable link between two ends in one process: streams arrive exactly once, in order,
// byte for byte, through carrier cuts, network-off stretches served by the shared file, and
// the shared file alone; backpressure holds memory to the bound; the hold time fails cleanly.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { readdirSync } from 'node:fs';
import type { LinkStream } from '../../src/link/stream.ts';
import { LinkError } from '../../src/link/errors.ts';
import { cleanupAll, onCleanup, tempDir } from '../helpers/proc.ts';
import { spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { createServer, type Socket } from 'node:net';
import { join } from 'node:path';
import { Link } from '../../src/link/link.ts';
import { digest, linkPair, sleep, within, writeRandom, type Pair } from '../helpers/link-pair.ts';

const MiB = 1024 * 1024;
const root = new URL('../..', import.meta.url).pathname;

/** The next stream the peer opens on side b, which only reads it (so it ends its own direction). */
function nextStream(p: Pair): Promise<LinkStream> {
  return new Promise((r) => p.b.once('stream', (s: LinkStream) => { s.end(); r(s); }));
}

/** An echo on side b: what a sends on stream "echo" comes back. */
function echo(p: Pair): void {
  p.b.on('stream', (s: LinkStream) => s.pipe(s));
}

test.after.each(cleanupAll);

test('an option given as undefined keeps its default (holdMs: undefined is not a link that never gives up)', () => {
  const l = new Link({ link: 'defaults', migration: 'm1', role: 'b', peer: 'nobody', holdMs: undefined, windowFloor: undefined });
  assert.is(l.opts.holdMs, 60_000);
  assert.is(l.opts.windowFloor, 2 * 1024 * 1024);
  assert.is(new Link({ link: 'given', migration: 'm1', role: 'b', peer: 'nobody', holdMs: 5000 }).opts.holdMs, 5000);
});

test('streams in both directions arrive byte for byte, and finish() removes every file', async () => {
  const p = linkPair({ shared: true });
  echo(p);
  const s = p.a.stream('echo');
  const back = digest(s);
  const sent = await writeRandom(s, 8 * MiB, 7);
  const got = await within(20_000, back);
  assert.is(got.bytes, 8 * MiB);
  assert.is(got.sha, sent);
  await Promise.all([p.a.finish(), p.b.finish()]);
  assert.equal(readdirSync(p.dir).filter((n) => n.startsWith('vmshift-link-')), [], 'no link file left after success');
});

test('random carrier cuts: every byte exactly once, in order; resent bytes are counted', async () => {
  const p = linkPair({ backoffMs: { first: 5, max: 20 } });
  echo(p);
  const s = p.a.stream('echo');
  const back = digest(s);
  let cuts = 0;
  const cutter = setInterval(() => { p.cut(); cuts++; }, 37);
  const sent = await writeRandom(s, 24 * MiB, 3);
  const got = await within(20_000, back);
  clearInterval(cutter);
  assert.is(got.sha, sent);
  assert.ok(cuts >= 3, `cut ${cuts} times`);
  const st = p.a.stats();
  assert.ok(st.reconnects >= 3, `reconnected ${st.reconnects} times`);
  assert.ok(st.resentBytes + p.b.stats().resentBytes > 0, 'bytes were sent twice');
  await Promise.all([p.a.finish(), p.b.finish()]);
});

test('network off for a stretch: the shared file carries the stream, and the network takes over again', async () => {
  const p = linkPair({ shared: true, backoffMs: { first: 5, max: 20 }, deadAfterMs: 300 });
  const rx = nextStream(p);
  const s = p.a.stream('bulk');
  const got = rx.then(digest);
  const writing = writeRandom(s, 16 * MiB, 5);
  await sleep(20);
  p.network(false);
  await sleep(400);
  p.network(true);
  const sent = await within(20_000, writing);
  assert.is((await within(20_000, got)).sha, sent);
  assert.ok(p.b.stats().fromFileBytes > 0, 'some bytes came from the file');
  await Promise.all([p.a.finish(), p.b.finish()]);
  assert.equal(readdirSync(p.dir).filter((n) => n.startsWith('vmshift-link-')), []);
});

test('network gone until the end: the whole stream, both ways, completes through the shared file', async () => {
  const p = linkPair({ shared: true, backoffMs: { first: 5, max: 20 } });
  p.network(false);
  echo(p);
  const s = p.a.stream('echo');
  const back = digest(s);
  const sent = await writeRandom(s, 4 * MiB, 9);
  const got = await within(20_000, back);
  assert.is(got.sha, sent);
  assert.is(p.a.stats().carrier, 'down');
  assert.is(p.b.stats().fromFileBytes, 4 * MiB);
  await Promise.all([p.a.finish(), p.b.finish()]);
  assert.equal(readdirSync(p.dir).filter((n) => n.startsWith('vmshift-link-')), []);
});

test('a slow reader holds the sender to its memory bound (backpressure)', async () => {
  const p = linkPair({ maxResident: 2 * MiB });
  const rx = nextStream(p);
  const s = p.a.stream('slow');
  const writing = writeRandom(s, 16 * MiB, 11);
  const r = await rx;
  r.pause();
  await sleep(300);
  const inFlight = s.sendNext - s.acked;
  assert.ok(inFlight < 2 * MiB + 4 * MiB, `unacknowledged ${inFlight} stays near the bound`);
  const got = digest(r);
  r.resume();
  assert.is((await got).sha, await writing);
  await Promise.all([p.a.finish(), p.b.finish()]);
});

test('no carrier for the hold time: both ends fail with UNREACHABLE and keep their files renamed', async () => {
  const p = linkPair({ holdMs: 400, deadAfterMs: 100, backoffMs: { first: 5, max: 20 } });
  const bFailed = new Promise<LinkError>((r) => p.b.on('stream', (t: LinkStream) => t.once('error', r)));
  const s = p.a.stream('x');
  s.write('hello');
  await sleep(50);
  p.network(false);
  const err = await new Promise<LinkError>((r) => s.once('error', r));
  assert.instance(err, LinkError);
  assert.is(err.code, 'UNREACHABLE');
  assert.match(err.message, /nothing heard from b for 0.4 s/);
  assert.is(p.a.state, 'failed');
  assert.is((await bFailed).code, 'UNREACHABLE', 'side b fails on its own too');
});

test('after a failure the files stay renamed .failed until the user, knowing the outcome, discards them', async () => {
  const p = linkPair({ shared: true, holdMs: 400, deadAfterMs: 100, backoffMs: { first: 5, max: 20 } });
  const bFailed = new Promise<void>((r) => p.b.once('failed', () => r()));
  p.b.on('stream', (t: LinkStream) => t.on('error', () => {}));
  const s = p.a.stream('x');
  s.on('error', () => {});
  s.write('hello');
  await sleep(50);
  p.network(false);
  p.a.abort('rolled back');
  await within(10_000, bFailed, 'side b failing');
  const files = () => readdirSync(p.dir).filter((n) => n.startsWith('vmshift-link-'));
  assert.ok(files().length > 0 && files().every((n) => n.endsWith('.failed')), `kept, renamed: ${files().join(', ')}`);
  p.a.discardFiles();
  p.b.discardFiles();
  assert.equal(files(), [], 'nothing left once both sides discarded');
});

test('abort on one side fails the other with the reason', async () => {
  const p = linkPair();
  const rx = nextStream(p);
  const s = p.a.stream('x');
  s.on('error', () => {});
  s.write('hi');
  const r = await rx;
  const failed = new Promise<LinkError>((res) => r.once('error', res));
  p.a.abort('operator cancelled');
  const err = await failed;
  assert.is(err.code, 'ABORTED');
  assert.match(err.message, /operator cancelled/);
});


test('abort() then exit at once (a refused migrate): the peer still gets the ABORT, behind the bytes queued before it', async () => {
  // The peer reads nothing at first, so the ABORT waits in the exiting side's socket queue
  // behind a blocked write; before abort() waited for the carrier to close, process.exit
  // dropped it and the peer waited out its hold time.
  const dir = tempDir('vmshift-link-abort-');
  const sock = join(dir, 'b.sock');
  const link = `l${randomBytes(4).toString('hex')}`;
  const b = new Link({ link, migration: 'm1', role: 'b', peer: 'the exiting side', holdMs: 60_000 });
  b.on('stream', (s: LinkStream) => s.on('error', () => {}));
  let carrier: Socket | null = null;
  let down = false;
  b.on('carrier', (state: string) => { if (state === 'down') down = true; });
  const server = createServer((c) => { carrier = c; b.attach(c); c.pause(); });
  await new Promise<void>((r) => server.listen(sock, r));
  onCleanup(() => { server.close(); if (b.state === 'running') b.abort('test over'); });
  const child = spawn(process.execPath, ['--import', 'tsx', join(root, 'test/fixtures/link-abort-exit.ts'), sock, link], { stdio: ['ignore', 'pipe', 'inherit'] });
  onCleanup(() => { if (child.exitCode === null) child.kill(); });
  const said = await new Promise<string>((r) => child.stdout.once('data', (d: Buffer) => r(d.toString().trim())));
  assert.is(said, 'aborting', 'the exiting side had a blocked carrier when it aborted');
  await sleep(300);
  carrier!.resume();
  await within(20_000, (async () => { while (b.state === 'running' && !down) await sleep(20); })(), 'the peer hearing the end of the carrier');
  assert.is(b.failure?.code, 'ABORTED', `the peer heard the ABORT (state ${b.state}, carrier down ${down}, ${b.failure?.message})`);
  assert.match(b.failure!.message, /refused by the test/);
});

test.run();
