// The resume state of a host move's disk job: what a restarted shim may trust, and what makes
// it copy everything again (resume-state.ts, resume-keeper.ts).
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { loadResumeState, noteRestart, RESTART_TOKEN, ResumeRefused, type ResumeIdentity, type ResumeState } from '../../src/migrate/resume-state.ts';
import { ResumeKeeper, TOUCH_AHEAD } from '../../src/migrate/resume-keeper.ts';

const MiB = 1024 * 1024;
const id: ResumeIdentity = { jobId: 'disk0-1', peer: 'root@b', destination: 'root@b:/b/vm.sock:/b/vm.raw', backing: '/a/vm.raw', size: 64 * MiB };
const dir = mkdtempSync(join(tmpdir(), 'vmshift-resume-'));
test.after(() => rmSync(dir, { recursive: true, force: true }));
let n = 0;
const path = () => join(dir, `s${n++}.resume.json`);
const read = (p: string) => JSON.parse(readFileSync(p, 'utf8')) as ResumeState;
const state = (over: Partial<ResumeState> = {}): ResumeState => ({ version: 1, ...id, copiedBelow: 16 * MiB, touchedBelow: 24 * MiB, degraded: false, restartedBy: null, dataBytes: 8 * MiB, updatedAt: 'now', ...over });

async function refusal(p: Promise<unknown>): Promise<ResumeRefused> {
  const e = await p.then(() => null, (e: unknown) => e);
  assert.instance(e, ResumeRefused);
  return e as ResumeRefused;
}

test('missing, unreadable, or another job\'s state: refused with a code that says which', async () => {
  assert.is((await refusal(loadResumeState(path(), id))).code, 'no-resume-state');
  const bad = path();
  writeFileSync(bad, '{"version":1,', { mode: 0o600 });
  assert.is((await refusal(loadResumeState(bad, id))).code, 'resume-unreadable');
  for (const k of ['jobId', 'destination', 'backing', 'size'] as const) {
    const p = path();
    writeFileSync(p, JSON.stringify(state({ [k]: k === 'size' ? 1 : 'other' })), { mode: 0o600 });
    const e = await refusal(loadResumeState(p, id));
    assert.is(e.code, 'resume-mismatch');
    assert.match(e.message, k);
  }
});

test('a restart marks the state as its own before serving; a second restart before any resume makes it degraded', async () => {
  const p = path();
  writeFileSync(p, JSON.stringify(state()), { mode: 0o600 });
  assert.match((await noteRestart(p))!, /in step below 16777216/);
  assert.equal({ by: read(p).restartedBy, degraded: read(p).degraded }, { by: RESTART_TOKEN, degraded: false });
  assert.is((await loadResumeState(p, id)).copiedBelow, 16 * MiB);
  // Another process had served it since (its writes are in no one's tracker now).
  writeFileSync(p, JSON.stringify(state({ restartedBy: '1@2' })), { mode: 0o600 });
  await noteRestart(p);
  assert.ok(read(p).degraded);
  assert.is(await noteRestart(path()), null, 'nothing to mark');
});

test('keeper: resumes from the cursor only when this process marked it and it is not degraded', () => {
  const mine = new ResumeKeeper(path(), id, () => 0, () => 0, { state: state({ restartedBy: RESTART_TOKEN }), note: null });
  assert.equal([mine.resumedFrom, mine.copiesEverything, mine.zeroFrom], [16 * MiB, false, 24 * MiB]);
  for (const s of [state({ restartedBy: null }), state({ restartedBy: RESTART_TOKEN, degraded: true }), null]) {
    const k = new ResumeKeeper(path(), id, () => 0, () => 0, { state: s, note: null });
    assert.equal([k.resumedFrom, k.copiesEverything], [0, true]);
  }
  assert.is(new ResumeKeeper(path(), id, () => 0, () => 0, { state: null, note: null }).zeroFrom, id.size, 'no state: nothing on the peer is known to be zero');
});

test('keeper: a copy of everything after a degraded state is as good as a fresh one: its own cursor counts, the old touched range stays', async () => {
  const p = path();
  let cursor = 0;
  const k = new ResumeKeeper(p, id, () => cursor, () => cursor, { state: state({ degraded: true, restartedBy: RESTART_TOKEN }), note: null });
  await k.start(() => {});
  assert.equal([read(p).degraded, read(p).copiedBelow, read(p).touchedBelow, read(p).restartedBy], [false, 0, 24 * MiB, null]);
  k.fullPass(true);
  cursor = 8 * MiB;
  await k.writer.persist();
  assert.is(read(p).copiedBelow, 8 * MiB);
  await k.end();
});

test('keeper: the peer\'s touched range moves ahead durably; degraded is durable before onDegrade resolves and cleared only after a catch-up past the first copy', async () => {
  const p = path();
  let cursor = 0;
  const k = new ResumeKeeper(p, id, () => cursor, () => cursor, null);
  await k.start(() => {});
  assert.equal([read(p).copiedBelow, read(p).touchedBelow, read(p).degraded], [0, 0, false]);
  k.fullPass(true);
  await k.willWrite(MiB);
  assert.is(read(p).touchedBelow, MiB + TOUCH_AHEAD);
  assert.is(k.willWrite(2 * MiB), undefined, 'inside the touched range: no write');
  cursor = 4 * MiB;
  await k.onDegrade();
  assert.equal([read(p).degraded, read(p).copiedBelow], [true, 4 * MiB]);
  k.caughtUp(false);
  await k.writer.persist();
  assert.ok(read(p).degraded, 'the first copy is not done: still degraded');
  k.initialCopyDone();
  k.caughtUp(true);
  await k.writer.persist();
  assert.ok(read(p).degraded, 'something still lagging');
  k.caughtUp(false);
  await k.writer.persist();
  assert.equal([read(p).degraded, read(p).copiedBelow], [false, id.size]);
  await k.end();
  assert.is(await noteRestart(p), null, 'gone at the end');
});

test.run();
