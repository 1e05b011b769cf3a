// `vmshift migrate` (memory) between two hosts (network namespaces A and B, sshd in B, the
// link agent started on B over SSH): the tiny guest in mode=dirty moves to a destination
// QEMU started with `-incoming defer -S`, its VMSHIFT-DIRTY counter continues there, the
// source ends in postmigrate. One guest boot serves every check: it moves on from QEMU to
// QEMU (the QEMUs themselves need no namespace: QMP and migration sockets are unix sockets).
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { join } from 'node:path';
import { readdirSync, readFileSync } from 'node:fs';
import { cleanupAll, waitForSocket } from '../helpers/proc.ts';
import { bootGuest, ensureGuest, type Guest } from '../helpers/guest.ts';
import { jsonLinesInNs, resetConnections, startSshd, twoHosts, type Sshd, type TwoHosts } from '../helpers/hosts.ts';
import { QmpClient } from '../../src/qemu/qmp.ts';

const root = new URL('../..', import.meta.url).pathname;
const PARAMS = { mib: 16, delay: 200 };
let hosts: TwoHosts;
let sshd: Sshd;
let current: { guest: Guest; qmp: string };
let n = 0;

test.before(async () => {
  await ensureGuest();
  hosts = await twoHosts();
  sshd = await startSshd(hosts.b, hosts.dir);
  const qmp = join(hosts.dir, 'q0.qmp');
  current = { guest: bootGuest({ mode: 'dirty', params: PARAMS, qmpSocket: qmp }), qmp };
  await current.guest.waitFor(/^VMSHIFT-DIRTY 2$/, 120_000);
});
test.after(cleanupAll);

/** A destination QEMU for the same guest, waiting for a migration. */
function destination(): { guest: Guest; qmp: string } {
  const qmp = join(hosts.dir, `q${++n}.qmp`);
  return { guest: bootGuest({ mode: 'dirty', params: PARAMS, qmpSocket: qmp, extraArgs: ['-incoming', 'defer', '-S'] }), qmp };
}

async function waitDestination(d: { guest: Guest; qmp: string }) {
  await waitForSocket(d.qmp, d.guest.daemon);
  return d;
}

interface Event { event: string; [k: string]: unknown }

/** `vmshift migrate --json` run inside A; `during` sees each event as it comes. */
function migrate(srcQmp: string, destQmp: string, extra: string[] = [], during?: (e: Event) => void) {
  return jsonLinesInNs<Event>(hosts.a, join(root, 'bin/vmshift'), ['migrate', '--json', '--qmp', srcQmp, '--peer', `ssh://root@${hosts.b.addr}:${sshd.port}`,
    '--dest-qmp', destQmp, '--identity', sshd.identity, '--known-hosts', sshd.knownHosts, '--peer-vmshift', join(root, 'bin/vmshift'),
    '--peer-socket-dir', join(hosts.dir, 'agent'), '--hold-time', '20s', ...extra], { cwd: root, during });
}

async function qmpStatus(path: string): Promise<string> {
  const q = await QmpClient.connect(path);
  try { return (await q.execute<{ status: string }>('query-status')).status; } finally { await q.close(); }
}

const lastDirty = (g: Guest) => Math.max(0, ...g.lines().map((l) => /^VMSHIFT-DIRTY (\d+)$/.exec(l)).filter(Boolean).map((m) => Number(m![1])));
const agentLogs = () => readdirSync(join(hosts.dir, 'agent')).filter((f) => f.endsWith('.log')).map((f) => `${f}:\n${readFileSync(join(hosts.dir, 'agent', f), 'utf8')}`).join('\n');
const summary = (r: { events: Event[]; stderr: string }) => `${JSON.stringify(r.events.filter((e) => e.event !== 'progress').concat(r.events.filter((e) => e.event === 'progress').slice(-3)))}\n${r.stderr}\n${agentLogs()}`;

/** The guest moved from `from` to `to`: the counter goes on there, the source stays in postmigrate. */
async function checkMoved(from: { guest: Guest; qmp: string }, to: { guest: Guest; qmp: string }) {
  assert.is(await qmpStatus(from.qmp), 'postmigrate');
  assert.is(await qmpStatus(to.qmp), 'running');
  const atSwitch = lastDirty(from.guest);
  await to.guest.waitFor(new RegExp(`^VMSHIFT-DIRTY ${atSwitch + 2}$`), 60_000);
  // The counter continued, it did not restart: no line on B before the one after the switch.
  const onB = to.guest.lines().map((l) => /^VMSHIFT-DIRTY (\d+)$/.exec(l)).filter(Boolean).map((m) => Number(m![1]));
  assert.ok(onB[0] >= atSwitch && onB[0] <= atSwitch + 1, `counter on B starts at ${onB[0]}, the source printed up to ${atSwitch}`);
  assert.not.ok(to.guest.lines().includes('VMSHIFT-READY'), 'the destination did not boot a guest of its own');
  await new Promise((r) => setTimeout(r, 300));
  assert.is(lastDirty(from.guest), atSwitch, 'the source never ran again');
  assert.equal(readdirSync(hosts.shared), [], 'nothing left in the shared directory');
  assert.equal(readdirSync(join(hosts.dir, 'agent')).filter((f) => !f.endsWith('.log')), [], 'no agent socket left');
}

test('a destination that is not waiting for a migration: refused, the source runs on, the destination untouched', async () => {
  const other = join(hosts.dir, 'not-incoming.qmp');
  const g = bootGuest({ mode: 'idle', qmpSocket: other, extraArgs: ['-S'] });
  await waitForSocket(other, g.daemon);
  const before = lastDirty(current.guest);
  const r = await migrate(current.qmp, other);
  assert.is(r.code, 1, summary(r));
  const err = r.events.find((e) => 'error' in e) as { error: { code: string; message: string } } | undefined;
  assert.ok(err, summary(r));
  assert.match(err!.error.message, /is "prelaunch", not waiting for a migration/);
  assert.is(await qmpStatus(current.qmp), 'running');
  assert.is(await qmpStatus(other), 'prelaunch', 'a QEMU that was not ours to take is not quit');
  await current.guest.waitFor(new RegExp(`^VMSHIFT-DIRTY ${before + 1}$`), 30_000);
});

test('healthy: the guest moves to B, its counter continues there, the source is in postmigrate', async () => {
  const dest = await waitDestination(destination());
  const r = await migrate(current.qmp, dest.qmp, ['--shared-dir', hosts.shared]);
  assert.is(r.code, 0, summary(r));
  const done = r.events.find((e) => e.event === 'done') as Event & { relayed: { forward: number; back: number }; link: Record<string, number> };
  assert.ok(done, summary(r));
  assert.ok(r.events.some((e) => e.event === 'progress' && (e.transferred as number) > 0), 'progress was reported');
  assert.ok(done.relayed.forward > 16 * 1024 * 1024, `the stream went through the relay: ${JSON.stringify(done.relayed)}`);
  assert.ok(done.relayed.back > 0, 'the return path was relayed back');
  const i = r.events.findIndex((e) => e.event === 'committed');
  assert.ok(i > 0 && r.events.slice(0, i).some((e) => e.event === 'progress' && e.status === 'completed'), 'the commit came after the source completed');
  await checkMoved(current, dest);
  await current.guest.stop();
  current = dest;
});

test('the carrying connection reset mid-stream (ss -K in A): completes, the resent bytes are reported', async () => {
  const dest = await waitDestination(destination());
  let cut = false;
  const r = await migrate(current.qmp, dest.qmp, ['--bandwidth', '64M'], (e) => {
    if (!cut && e.event === 'progress' && (e.transferred as number) > 4 * 1024 * 1024) {
      cut = true;
      void resetConnections(hosts.a, hosts.b);
    }
  });
  assert.ok(cut, `the connection was reset: ${summary(r)}`);
  assert.is(r.code, 0, summary(r));
  const done = r.events.find((e) => e.event === 'done') as Event & { link: Record<string, number> };
  assert.ok(done.link.reconnects >= 1, `reconnected: ${JSON.stringify(done.link)}`);
  assert.ok(done.link.resentBytes > 0, `resent bytes reported: ${JSON.stringify(done.link)}`);
  await checkMoved(current, dest);
  await current.guest.stop();
  current = dest;
});

test('--compress cache: the stream goes through the cache both ways and the guest moves; stats and parameters reported', async () => {
  const dest = await waitDestination(destination());
  const r = await migrate(current.qmp, dest.qmp, ['--compress', 'cache', '--cache-size', '64M']);
  assert.is(r.code, 0, summary(r));
  const params = r.events.find((e) => e.event === 'parameters') as Event & { parameters: Record<string, unknown>; reasons: string[] };
  assert.ok(params && params.parameters['max-bandwidth'] === 4 * 1024 ** 3, `QEMU's limit raised for the cache: ${JSON.stringify(params)}`);
  assert.ok(params.reasons.some((x) => x.startsWith('downtime-limit 300 ms')), JSON.stringify(params.reasons));
  const done = r.events.find((e) => e.event === 'done') as Event & { relayed: { forward: number; link: number }; cache: { bytesIn: number; bytesOut: number; pages: number; bypassedPages: number; hits: number; budgetEntries: number; passThrough: string | null } };
  assert.ok(done?.cache, summary(r));
  assert.is(done.cache.bytesIn, done.relayed.forward, 'every byte from QEMU went through the encoder');
  assert.is(done.cache.bytesOut, done.relayed.link, 'and its frames went on the link');
  assert.is(done.cache.budgetEntries, 64 * 256);
  assert.is(done.cache.passThrough, null, 'the reader followed the stream to the device state');
  assert.ok(done.cache.pages > 1000, JSON.stringify(done.cache));
  assert.ok(r.events.some((e) => e.event === 'cache'), 'cache stats during the run');
  await checkMoved(current, dest);
  await current.guest.stop();
  current = dest;
});

test.run();
