// The control sockets (vmshiftd's API, a shim's `<socket>.ctl`) against hostile local callers:
// an unprivileged user racing vmshiftd's start under `umask 000` (it used to get in between
// bind and chmod and could make root serve /etc/shadow), a root caller flooding pipelined
// requests without reading the answers (it took the daemon from 67 to 720 MiB), idle
// connections, too many connections and overlong lines.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { chmodSync, chownSync, readFileSync, statSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { connect, type Socket } from 'node:net';
import { cleanupAll, onCleanup, run, startDaemon, tempDir, waitForSocket, type Daemon } from '../helpers/proc.ts';
import { controlCall } from '../../src/control/client.ts';
import { ControlServer } from '../../src/control/server.ts';
import { MAX_LINE } from '../../src/control/protocol.ts';

const vmshiftd = new URL('../../bin/vmshiftd', import.meta.url).pathname;
const vmshift = new URL('../../bin/vmshift', import.meta.url).pathname;
test.after(cleanupAll);

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));
/** `p`, or a rejection naming `what` after `ms` (a missing limit must fail the test, not hang it). */
const within = <T>(ms: number, what: string, p: Promise<T>) => Promise.race([p, sleep(ms).then(() => { throw new Error(`${what}: not within ${ms} ms`); })]);
const vmRssKiB = (pid: number) => Number(/VmRSS:\s+(\d+) kB/.exec(readFileSync(`/proc/${pid}/status`, 'utf8'))![1]);

/** A host's directories, traversable by everyone (as /run/vmshift is) so `nobody` can try. */
function host() {
  const dir = tempDir('vsd-ctl-');
  chmodSync(dir, 0o755);
  return { dir, api: join(dir, 'api.sock'), stateDir: join(dir, 'state'), runDir: join(dir, 'run') };
}

async function startVmshiftd(h: ReturnType<typeof host>, umask = '022'): Promise<Daemon> {
  const d = startDaemon('/bin/sh', ['-c', `umask ${umask}; exec "$@"`, 'sh', vmshiftd, '--socket', h.api, '--state-dir', h.stateDir, '--run-dir', h.runDir, '--config', join(h.dir, 'no-vmshiftd.json'), '--datastore', h.dir]);
  await waitForSocket(h.api, d, 60_000);
  return d;
}

// The attacker, as `nobody`: inotify on the directory (connect the moment the socket is
// created) plus a tight polling loop, several attempts in flight; on any connection it asks
// for `ping` and reports the answer. Stops when STOP appears, or after 60 s.
const ATTACKER = `
const net = require('net'), fs = require('fs'), path = require('path');
const [sock, stop] = process.argv.slice(1);
let attempts = 0, inside = 0, done = false;
const finish = () => { if (done) return; done = true; console.log(JSON.stringify({ attempts, inside })); process.exit(0); };
const tryOnce = () => {
  attempts++;
  const s = net.connect(sock);
  s.on('connect', () => { inside++; s.write('{"id":1,"method":"ping"}\\n'); });
  s.on('data', (b) => { console.log('GOT IN: ' + b.toString().trim()); });
  s.on('error', () => {});
  s.on('close', () => s.destroy());
};
try { fs.watch(path.dirname(sock), () => { for (let i = 0; i < 16; i++) tryOnce(); }); } catch {}
const loop = () => { if (done) return; if (fs.existsSync(stop)) return setTimeout(finish, 200); for (let i = 0; i < 2; i++) tryOnce(); setTimeout(loop, 1); };
setTimeout(finish, 60000);
loop();
`;

test('an unprivileged client racing vmshiftd\'s start under umask 000 never gets in; sockets are 0600 from birth', async () => {
  const h = host();
  const stop = join(h.dir, 'STOP');
  const attacker = run('setpriv', ['--reuid=nobody', '--regid=nogroup', '--clear-groups', process.execPath, '-e', ATTACKER, h.api, stop]);
  await sleep(300); // the attacker is polling before the daemon starts
  // Three starts: three chances for the attacker to hit a window, were there one.
  for (let i = 0; i < 2; i++) await (await startVmshiftd(h, '000')).stop();
  const d = await startVmshiftd(h, '000');
  // A shim started through the daemon: its NBD and control sockets come up under the same umask.
  const file = join(h.dir, 'd.raw');
  writeFileSync(file, Buffer.alloc(1024 * 1024));
  chmodSync(file, 0o600);
  // The shim outlives vmshiftd by design: stop it by the PID the registry names, read at
  // cleanup time, so that a failure anywhere after the start still leaves no shim behind.
  const registry = () => JSON.parse(readFileSync(join(h.stateDir, 'vmshiftd.json'), 'utf8')).shims as Array<{ pid: number; socket: string }>;
  onCleanup(() => { try { for (const r of registry()) process.kill(r.pid, 'SIGKILL'); } catch { /* none started, or gone */ } });
  await run(vmshift, ['shim-start', 'race', file], { env: { ...process.env, VMSHIFT_SOCKET: h.api } });
  const rec = registry()[0];
  writeFileSync(stop, '');
  const { stdout } = await attacker;
  assert.not.match(stdout, /GOT IN/, stdout);
  const { attempts, inside } = JSON.parse(stdout.trim().split('\n').at(-1)!);
  assert.ok(attempts > 100, `the attacker tried ${attempts} times`);
  assert.is(inside, 0);
  assert.is(statSync(h.api).mode & 0o777, 0o600);
  assert.is(statSync(`${rec.socket}.ctl`).mode & 0o777, 0o600);
  assert.is(statSync(rec.socket).mode & 0o077 & ~0o060, 0, 'the NBD socket is open to no one but its owner (and group)');
  assert.is((await controlCall<{ pid: number }>(h.api, 'ping')).pid, d.pid);
});

/**
 * Write `n` pipelined pings without reading an answer; resolves once the daemon has stopped
 * taking them (our write buffer unchanged for 1.5 s) or has taken them all.
 */
async function flood(path: string, n: number): Promise<Socket> {
  const s = connect(path);
  onCleanup(() => { s.destroy(); });
  await new Promise((r) => s.once('connect', r));
  s.pause();
  const batch = 1000;
  for (let i = 0; i < n; i += batch) {
    let chunk = '';
    for (let j = i; j < Math.min(n, i + batch); j++) chunk += `{"id":${j},"method":"ping"}\n`;
    s.write(chunk);
  }
  let last = -1, stable = 0;
  for (let i = 0; i < 200 && stable < 8 && s.writableLength > 0; i++) {
    stable = s.writableLength === last ? stable + 1 : 0;
    last = s.writableLength;
    await sleep(200);
  }
  return s;
}

/** Read `n` answers from a flooded connection; returns how many were `ping` results. */
function drain(s: Socket, n: number): Promise<number> {
  return new Promise((resolve, reject) => {
    let got = 0, buf = '';
    const t = setTimeout(() => reject(new Error(`only ${got} of ${n} answers`)), 60_000);
    s.on('data', (b) => {
      buf += b;
      let nl;
      while ((nl = buf.indexOf('\n')) >= 0) {
        if (JSON.parse(buf.slice(0, nl)).result?.pid) got++;
        buf = buf.slice(nl + 1);
      }
      if (got >= n) { clearTimeout(t); resolve(got); }
    });
    s.resume();
  });
}

test('400k pipelined requests that are never read keep vmshiftd\'s memory bounded; others are served; every answer arrives', async () => {
  const h = host();
  const d = await startVmshiftd(h);
  for (let i = 0; i < 20; i++) await controlCall(h.api, 'ping'); // warm up
  const before = vmRssKiB(d.pid);
  const N = 400_000;
  const s = await flood(h.api, N);
  let peak = 0;
  for (let i = 0; i < 5; i++, await sleep(200)) peak = Math.max(peak, vmRssKiB(d.pid));
  assert.ok(peak - before < 40 * 1024, `VmRSS went from ${before} to ${peak} KiB`);
  assert.ok(s.writableLength > 5e6, `the daemon stopped reading (${s.writableLength} bytes still queued at the client)`);
  const t0 = Date.now();
  assert.is((await controlCall<{ pid: number }>(h.api, 'ping', {}, { timeoutMs: 5000 })).pid, d.pid);
  assert.ok(Date.now() - t0 < 2000, 'another client is answered at once');
  assert.is(await drain(s, N), N);
  console.log(`vmshiftd VmRSS ${before} KiB before, ${peak} KiB with ${N} unread requests`);
});

test('limits: idle connections closed (not one with a watch in flight), connection cap, overlong line', async () => {
  const dir = tempDir('ctl-lim-');
  const path = join(dir, 'c.sock');
  const server = new ControlServer({ idleTimeoutMs: 300, maxConnections: 3 });
  let release!: () => void;
  const held = new Promise<void>((r) => (release = r));
  server.on('ping', () => ({ ok: true }));
  server.on('watch', async (_p, ctx) => { ctx.emit('started', {}); await Promise.race([held, ctx.closed]); return 'done'; });
  await server.listen(path);
  onCleanup(() => server.close());

  const open = (): Promise<{ s: Socket; lines: string[]; closed: Promise<number> }> => new Promise((resolve) => {
    const s = connect(path);
    const lines: string[] = [];
    const t0 = Date.now();
    const closed = new Promise<number>((r) => s.on('close', () => r(Date.now() - t0)));
    s.on('data', (b) => lines.push(...b.toString().split('\n').filter(Boolean)));
    s.on('error', () => {});
    s.on('connect', () => resolve({ s, lines, closed }));
    onCleanup(() => { s.destroy(); });
  });
  const idle = await open();
  const watcher = await open();
  watcher.s.write('{"id":7,"method":"watch"}\n');
  const third = await open();
  const fourth = await open();
  await within(3000, 'the connection over the cap closed', fourth.closed);
  assert.match(fourth.lines.join(), /"code":"busy"/);
  await within(2000, 'the idle connection closed', idle.closed);
  third.s.destroy();
  await sleep(900);
  assert.not.ok(watcher.s.destroyed, 'a connection with a watch in flight stays open');
  release();
  await sleep(50);
  assert.match(watcher.lines.join('\n'), /"id":7,"result":"done"/);

  // A directory someone else may write to: the socket could be swapped under its callers.
  for (const [mode, uid] of [[0o777, 0], [0o755, 65534]]) {
    const d = tempDir('ctl-dir-');
    chmodSync(d, mode);
    chownSync(d, uid, uid);
    const err = await new ControlServer().listen(join(d, 'c.sock')).then(() => null, (e: Error) => e.message);
    assert.match(err ?? 'listened', uid ? /belongs to uid 65534/ : /is writable by group or others \(mode 777\)/);
  }
  const sticky = tempDir('ctl-dir-');
  chmodSync(sticky, 0o1777);
  const inSticky = new ControlServer();
  await inSticky.listen(join(sticky, 'c.sock'));
  await inSticky.close();

  const big = await open();
  big.s.write('x'.repeat(MAX_LINE + 10));
  await within(3000, 'the overlong line cut the connection', big.closed);
  assert.match(big.lines.join(), /"code":"protocol".*longer than/);
});

test.run();
