// The migration-stream reader and the memory cache on REAL QEMU streams (recorded from the
// tiny guest: idle, mode=dirty, and mode=dirty again with QEMU's own XBZRLE on): through the encoder
// and the decoder every stream comes back with the same sha256; the reader follows each to its
// device state without falling back; cut, truncated or garbage streams never give a wrong
// byte. Two guest boots in parallel serve every check.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { createHash } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { bootGuest, ensureGuest, type Guest } from '../helpers/guest.ts';
import { cleanupAll, tempDir, waitForSocket } from '../helpers/proc.ts';
import { recordStream } from '../helpers/mig-streams.ts';
import { StreamReader } from '../../src/memstream/reader.ts';
import { CacheEncoder, type EncoderMode } from '../../src/relay/cache/encoder.ts';
import { CacheDecoder } from '../../src/relay/cache/decoder.ts';
import { decoderStream, encoderStream } from '../../src/relay/cache/streams.ts';

const streams: Record<'idle' | 'dirty' | 'xbzrle', Buffer> = {} as never;

test.before(async () => { try { await before(); } catch (e) { process.stderr.write(`before: ${(e as Error).stack}\n`); throw e; } });
async function before() {
  await ensureGuest();
  const tb = Date.now();
  const dir = tempDir('vmshift-cache-');
  // 96 MiB guests: streams of ~80-100 MiB keep each pass through the codec near a second.
  const boot = (mode: 'idle' | 'dirty') => {
    const qmp = join(dir, `${mode}.qmp`);
    return { qmp, g: bootGuest({ mode, params: mode === 'idle' ? {} : { mib: 12 }, qmpSocket: qmp, memoryMiB: 96 }) };
  };
  const idle = boot('idle'), dirty = boot('dirty');
  await Promise.all([idle.g.waitFor(/^VMSHIFT-READY$/, 240_000), dirty.g.waitFor(/^VMSHIFT-DIRTY 2$/, 240_000)]);
  await Promise.all([idle, dirty].map((x) => waitForSocket(x.qmp, x.g.daemon)));
  process.stderr.write(`booted in ${Date.now() - tb} ms\n`);
  // Slow enough (32 MiB/s), and a downtime limit too small to converge on its own: QEMU keeps
  // making passes and re-sending pages until the guest rewrote its set (`until`).
  const slow = { 'max-bandwidth': 32 << 20, 'downtime-limit': 1 };
  const t0 = Date.now();
  const passes = (g: Guest) => g.lines().filter((l) => l.startsWith('VMSHIFT-DIRTY')).length;
  let start = passes(dirty.g);
  const [a, b] = await Promise.all([
    recordStream(idle.qmp, join(dir, 'idle.mig')),
    recordStream(dirty.qmp, join(dir, 'dirty.mig'), { parameters: slow, passes: 4, until: () => passes(dirty.g) >= start + 1 }),
  ]);
  // XBZRLE keeps pages from the second pass on and sends deltas (of the pages that changed) from the third.
  start = passes(dirty.g);
  const c = await recordStream(dirty.qmp, join(dir, 'xbzrle.mig'), { capabilities: { xbzrle: true }, parameters: { ...slow, 'xbzrle-cache-size': 16 << 20 }, passes: 5, until: () => passes(dirty.g) >= start + 1 });
  process.stderr.write(`recorded in ${Date.now() - t0} ms: ${JSON.stringify([a, b, c].map((r) => r.info.ram?.['dirty-sync-count']))}\n`);
  streams.idle = readFileSync(a.file);
  streams.dirty = readFileSync(b.file);
  streams.xbzrle = readFileSync(c.file);
  await Promise.all([idle.g.stop(), dirty.g.stop()]);
}
test.after(cleanupAll);

const sha = (b: Buffer | Buffer[]) => { const h = createHash('sha256'); for (const x of Array.isArray(b) ? b : [b]) h.update(x); return h.digest('hex'); };

/** Deterministic chunk sizes 1..max (the relay sees whatever the socket gives). */
function* chunks(b: Buffer, max: number, seed = 1): Generator<Buffer> {
  let s = seed;
  for (let at = 0; at < b.length;) {
    s = (s * 1103515245 + 12345) >>> 0;
    const n = 1 + (s % max);
    yield b.subarray(at, at + n);
    at += n;
  }
}

function encode(input: Buffer, max = 65536, seed = 1): { frames: Buffer; enc: CacheEncoder } {
  const enc = new CacheEncoder({ budget: 64 << 20 });
  const out: Buffer[] = [];
  for (const c of chunks(input, max, seed)) out.push(...enc.encode(c));
  out.push(...enc.finish());
  return { frames: Buffer.concat(out), enc };
}

function decode(frames: Buffer, max = 65536, seed = 2): { out: Buffer; error: Error | null } {
  const dec = new CacheDecoder();
  const out: Buffer[] = [];
  for (const c of chunks(frames, max, seed)) out.push(...dec.push(c));
  return { out: Buffer.concat(out), error: dec.end() };
}

for (const name of ['idle', 'dirty', 'xbzrle'] as const) {
  test(`${name} stream: the reader follows it to the device state; encoder + decoder give the same sha256`, () => {
    const input = streams[name];
    const r = new StreamReader();
    let pages = 0;
    const parts: Buffer[] = [];
    for (const c of chunks(input, 9000, 5)) for (const t of r.push(c)) { if (t.kind === 'page') { pages++; parts.push(t.header, t.data); } else if (t.kind === 'raw') parts.push(t.data); }
    for (const t of r.end()) if (t.kind === 'raw') parts.push(t.data);
    assert.is(r.passThroughReason, null, `no fallback: ${r.passThroughReason}`);
    assert.ok(r.seen.ramSections >= 3 && pages > 100, JSON.stringify(r.seen));
    if (name === 'xbzrle') assert.ok(r.seen.xbzrle > 0, `XBZRLE records seen: ${JSON.stringify(r.seen)}`);
    assert.is(sha(parts), sha(input), 'the reader\'s tokens are the stream');
    const { frames, enc } = encode(input);
    const { out, error } = decode(frames);
    assert.is(error, null);
    assert.is(out.length, input.length);
    assert.is(sha(out), sha(input));
    const st = enc.stats();
    assert.ok(frames.length < input.length * 0.7, `${name}: ${input.length} -> ${frames.length} bytes on the link (${JSON.stringify({ ...st, history: undefined })})`);
    if (name === 'dirty') assert.ok(st.hits > 500, `re-sent pages were cache hits: ${st.hits}`);
  });
}

test('compression turned off and on every 1, 3 and 17 chunks (the governor\'s switch): the same sha256', () => {
  for (const name of ['dirty', 'xbzrle'] as const) {
    const input = streams[name];
    for (const every of [1, 3, 17]) {
      const enc = new CacheEncoder({ budget: 64 << 20 });
      const out: Buffer[] = [];
      let n = 0;
      for (const c of chunks(input, 65536, every)) {
        if (++n % every === 0) enc.setCompressing(n % (2 * every) !== 0);
        out.push(...enc.encode(c));
      }
      out.push(...enc.finish());
      const { out: back, error } = decode(Buffer.concat(out), 50_000, every);
      assert.is(error, null);
      assert.ok(back.equals(input), `${name}, switched every ${every} chunks`);
      const st = enc.stats();
      assert.ok(st.bypassedPages > 100 && st.pages - st.bypassedPages > 100 && st.modeChanges > 4, `both modes ran: ${JSON.stringify({ ...st, history: undefined, windows: undefined })}`);
      if (name === 'dirty') assert.ok(st.hits > 20, `hits across switches: ${st.hits}`);
    }
  }
});

test('turned down for good and back (whole chunks as THRU frames, the reader skimming) every 1, 5 and 17 chunks, chunks of any size: the same sha256', () => {
  const modes: EncoderMode[] = ['compress', 'through', 'raw', 'through', 'compress', 'raw'];
  for (const name of ['dirty', 'xbzrle'] as const) {
    const input = streams[name];
    for (const [every, max] of [[1, 65536], [5, 300], [17, 9000]] as const) {
      const enc = new CacheEncoder({ budget: 64 << 20 });
      const out: Buffer[] = [];
      let n = 0, k = 0;
      for (const c of chunks(input, max, every)) {
        if (++n % every === 0) enc.setMode(modes[k++ % modes.length]!);
        out.push(...enc.encode(c));
      }
      out.push(...enc.finish());
      const { out: back, error } = decode(Buffer.concat(out), 50_000, every);
      assert.is(error, null);
      assert.ok(back.equals(input), `${name}, switched every ${every} chunks of 1..${max} bytes: ${back.length} of ${input.length} bytes`);
      const st = enc.stats();
      // (Chunks of 300 bytes at most, switched every 5: no page record is ever followed whole.)
      assert.ok(st.throughBytes > input.length / 5 && (max < 4096 || (st.bypassedPages > 10 && st.pages - st.bypassedPages > 10)), JSON.stringify({ ...st, history: undefined, windows: undefined }));
    }
  }
});

test('THRU frames: a cut, a flipped bit in a head, or garbage from a frame\'s start never give a wrong byte', () => {
  const input = streams.dirty;
  const enc = new CacheEncoder({ budget: 64 << 20 });
  enc.setMode('through');
  const frames = Buffer.concat([...enc.encode(input.subarray(0, 65536)), ...[...chunks(input.subarray(65536), 65536, 3)].flatMap((c) => enc.encode(c)), ...enc.finish()]);
  assert.is(frames[12], 0x04, 'a THRU frame after the hello');
  const ok = decode(frames);
  assert.is(ok.error, null);
  assert.ok(ok.out.equals(input));
  const second = 12 + 9 + 65536; // the second frame's head
  const check = (bad: Buffer, what: string) => {
    const r = decode(bad);
    assert.ok(r.out.equals(input.subarray(0, r.out.length)), `${what}: what came out is a prefix`);
    assert.ok(r.error, `${what}: reported (${r.out.length} good bytes)`);
  };
  check(frames.subarray(0, second + 100), 'cut inside a THRU frame');
  check(frames.subarray(0, second + 4), 'cut inside a THRU head');
  for (const bit of [0, 10, 40, 70]) {
    const flip = Buffer.from(frames);
    flip[second + (bit >> 3)] ^= 1 << (bit & 7);
    check(flip, `bit ${bit} of a THRU head flipped`);
  }
  let s = 5;
  const junk = Buffer.alloc(100_000);
  for (let i = 0; i < junk.length; i++) { s = (s * 1103515245 + 12345) >>> 0; junk[i] = s >>> 24; }
  check(Buffer.concat([frames.subarray(0, second), junk]), 'garbage from a frame\'s start');
});

test('through the relays\' streams (QEMU\'s bytes passed on as views, small frames joined): the same sha256', async () => {
  const input = streams.dirty;
  const e = encoderStream({ budget: 64 << 20 });
  const d = decoderStream();
  const got: Buffer[] = [];
  d.stream.on('data', (b: Buffer) => got.push(b));
  const ended = new Promise<void>((resolve, reject) => { d.stream.on('end', resolve); d.stream.on('error', reject); e.stream.on('error', reject); });
  e.stream.pipe(d.stream);
  let n = 0;
  for (const c of chunks(input, 65536, 9)) {
    // Raw for a while, then compressing: both kinds of frames go through the streams.
    if (++n % 40 === 0) e.encoder.setCompressing(n % 80 !== 0);
    if (!e.stream.write(Buffer.from(c))) await new Promise((r) => e.stream.once('drain', r));
  }
  e.stream.end();
  await ended;
  const back = Buffer.concat(got);
  assert.ok(back.equals(input), `${back.length} of ${input.length} bytes, the same`);
  assert.ok(e.encoder.stats().bypassedPages > 100 && e.encoder.stats().hits > 20, JSON.stringify({ ...e.encoder.stats(), history: undefined }));
});

test('any chunking of the input and of the link gives the same bytes', () => {
  const input = streams.dirty;
  for (const [a, b] of [[3000, 70000], [100_000, 1000]] as const) {
    const { frames } = encode(input, a, a);
    const { out, error } = decode(frames, b, b);
    assert.is(error, null);
    assert.ok(out.equals(input), `chunks ${a}/${b}`);
  }
});

test('a cut or truncated link stream: the output is an exact prefix, and the end is reported', () => {
  const input = streams.dirty;
  const { frames } = encode(input);
  for (const frac of [0, 0.0000001, 0.013, 0.31, 0.5, 0.77, 0.999999]) {
    const cut = Math.floor(frames.length * frac) + 1;
    const { out, error } = decode(frames.subarray(0, cut));
    assert.ok(out.equals(input.subarray(0, out.length)), `cut at ${cut}: a prefix`);
    assert.ok(out.length < input.length);
    assert.ok(error, `cut at ${cut}: reported`);
  }
});

test('garbage on the link: never a wrong byte', () => {
  const input = streams.dirty;
  const { frames } = encode(input);
  let s = 99;
  for (const frac of [0.0001, 0.45, 0.9]) {
    const at = Math.floor(frames.length * frac);
    const bad = Buffer.from(frames);
    for (let i = at; i < Math.min(bad.length, at + 200_000); i++) { s = (s * 1103515245 + 12345) >>> 0; bad[i] = s >>> 24; }
    const { out, error } = decode(bad);
    assert.ok(out.equals(input.subarray(0, out.length)), `garbage from ${at}: what came out is a prefix`);
    assert.ok(error, `garbage from ${at}: reported (${out.length} good bytes)`);
    // One flipped bit inside a page frame: caught by its CRC.
    const flip = Buffer.from(frames);
    flip[at + 40] ^= 0x10;
    const f = decode(flip);
    assert.ok(f.out.equals(input.subarray(0, f.out.length)), `bit flip at ${at + 40}: a prefix`);
    assert.ok(f.error, `bit flip at ${at + 40}: reported`);
  }
});

test('a QEMU stream cut short or ending in garbage passes through exactly', () => {
  const input = streams.xbzrle;
  let s = 7;
  for (const frac of [0.02, 0.6]) {
    const cut = Math.floor(input.length * frac);
    const truncated = input.subarray(0, cut);
    const t = decode(encode(truncated).frames);
    assert.is(t.error, null);
    assert.ok(t.out.equals(truncated), `cut at ${cut}`);
    const junk = Buffer.alloc(100_000);
    for (let i = 0; i < junk.length; i++) { s = (s * 1103515245 + 12345) >>> 0; junk[i] = s >>> 24; }
    const withJunk = Buffer.concat([truncated, junk]);
    const e = encode(withJunk);
    const g = decode(e.frames);
    assert.is(g.error, null);
    assert.ok(g.out.equals(withJunk), `garbage after ${cut}: passed through as it is`);
  }
});

test.run();
