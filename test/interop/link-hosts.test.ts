// The link between two hosts (network namespaces A and B, sshd in B, a shared directory):
// bytes echoed through `vmshift link-agent` on B arrive identical over SSH and TLS, through a
// connection reset (`ss -K`) and a stretch with B's network down (served by the shared file);
// wrong and unknown host keys and certificates from another CA are refused with clear errors.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { join } from 'node:path';
import { spawn } from 'node:child_process';
import { existsSync, readFileSync, readdirSync, writeFileSync } from 'node:fs';
import { cleanupAll } from '../helpers/proc.ts';
import { daemonInNs, jsonLinesInNs, linkState, makeCerts, nsArgv, resetConnections, startSshd, twoHosts, type Sshd, type TwoHosts } from '../helpers/hosts.ts';

const root = new URL('../..', import.meta.url).pathname;
let hosts: TwoHosts;
let sshd: Sshd;
let certs: string;

test.before(async () => {
  hosts = await twoHosts();
  sshd = await startSshd(hosts.b, hosts.dir);
  certs = await makeCerts(join(hosts.dir, 'certs'), hosts.b.addr);
});
test.after(cleanupAll);

interface Event { event: string; [k: string]: unknown }

/** Run the echo client in A; `during(events)` sees every line as it comes (to cut the network). */
async function client(args: object, during?: (e: Event) => void): Promise<Event[]> {
  const r = await jsonLinesInNs<Event>(hosts.a, process.execPath, ['--import', 'tsx', join(root, 'test/fixtures/link-echo-client.ts'), JSON.stringify(args)], { cwd: root, timeoutMs: 30_000, during });
  if (!r.events.some((e) => e.event === 'done' || e.event === 'failed')) throw new Error(`client died:\n${r.stderr}\n${JSON.stringify(r.events.filter((e) => e.event !== 'progress'))}`);
  return r.events;
}

const sshArgs = (over: Partial<Sshd> = {}) => ({
  host: hosts.b.addr, port: sshd.port, user: 'root', identity: sshd.identity, knownHosts: sshd.knownHosts,
  vmshift: join(root, 'bin/vmshift'), socketDir: join(hosts.dir, 'agent'), agentSharedDir: hosts.shared, ...over,
});

function done(events: Event[]): Event & { sent: string; got: string; stats: Record<string, number | string> } {
  const d = events.find((e) => e.event === 'done');
  if (!d) throw new Error(`no success: ${JSON.stringify(events.filter((e) => e.event !== 'progress'))}`);
  // What happened on the way, in the assertion messages of the caller.
  (d as { log?: string }).log = JSON.stringify(events.filter((e) => e.event !== 'progress' && e.event !== 'done'));
  return d as never;
}

test('ssh: a connection reset mid-stream (ss -K in A) is invisible: same sha256, bytes resent and duplicates counted on both ends', async () => {
  let cut = false;
  // Network only: with a shared dir the file may finish the stream before the redial does.
  // Large enough that the stream is still at full speed (bytes in flight both ways) when the
  // reset lands: the cut is seen through a 100 ms progress tick and a spawned `ss -K`, and a
  // small stream could finish first on a quick machine, leaving nothing to resend. Whether
  // anything is resent depends on where the bytes were when the reset landed: with the send
  // window (src/link/window.ts) they may all have arrived already (waiting in the echoing
  // agent's buffer, held by its own window; seen 1 run in 3, nothing resent either way), so
  // the counts are checked for what they must satisfy: both ends report them, and every byte
  // that arrived twice was sent twice (no shared dir: resending is the only way to get one).
  const link = `reset${Date.now() % 100000}`;
  const events = await client({ link, mib: 64, ssh: sshArgs({ agentSharedDir: undefined } as never) }, (e) => {
    if (!cut && e.event === 'progress' && (e.received as number) > 4 * 1024 * 1024) {
      cut = true;
      void resetConnections(hosts.a, hosts.b);
    }
  });
  const d = done(events);
  assert.ok(cut, 'the connection was reset');
  assert.is(d.got, d.sent);
  assert.ok((d.stats.reconnects as number) >= 1, `reconnected: ${JSON.stringify(d.stats)} ${d.log}`);
  assert.ok(events.some((e) => e.event === 'carrier' && e.state === 'down'), 'the carrier went down');
  // The agent logs its link's stats once it finished (right after the client's finish()).
  const agentLog = join(hosts.dir, 'agent', `link-${link}.sock.log`);
  let agent: { resentBytes: number; duplicateBytes: number } | null = null;
  for (let i = 0; i < 100 && !agent; i++) {
    const m = /finished: (\{.*\})/.exec(existsSync(agentLog) ? readFileSync(agentLog, 'utf8') : '');
    if (m) agent = JSON.parse(m[1]);
    else await new Promise((r) => setTimeout(r, 100));
  }
  assert.ok(agent, `the agent logged its stats: ${existsSync(agentLog) ? readFileSync(agentLog, 'utf8') : 'no log'}`);
  const a = d.stats as unknown as { resentBytes: number; duplicateBytes: number };
  const b = agent as { resentBytes: number; duplicateBytes: number };
  const both = `A ${JSON.stringify(a)}, B ${JSON.stringify(b)}`;
  assert.type(a.resentBytes, 'number', both);
  assert.ok(b.duplicateBytes <= a.resentBytes && a.duplicateBytes <= b.resentBytes, `what arrived twice was sent twice: ${both}`);
});

test('ssh: B\'s network down for 2.5 s: the shared file carries on, the network takes over again', async () => {
  let cut = false;
  const events = await client({ mib: 48, sharedDir: hosts.shared, deadAfterMs: 800, ssh: sshArgs() }, (e) => {
    if (!cut && e.event === 'progress' && (e.received as number) > 4 * 1024 * 1024) {
      cut = true;
      void linkState(hosts.b, false).then(() => new Promise((r) => setTimeout(r, 2500))).then(() => linkState(hosts.b, true));
    }
  });
  const d = done(events);
  assert.is(d.got, d.sent);
  assert.ok((d.stats.fromFileBytes as number) > 0 || (d.stats.spilledBytes as number) > 0, `the file was used: ${JSON.stringify(d.stats)}`);
});

test('ssh: a wrong host key and an unknown host refuse, naming host and fingerprint', async () => {
  const wrong = join(hosts.dir, 'wrong_known_hosts');
  writeFileSync(wrong, `[${hosts.b.addr}]:${sshd.port} ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl\n`);
  const bad = (await client({ mib: 1, ssh: sshArgs({ knownHosts: wrong }) })).find((e) => e.event === 'failed')!;
  assert.is(bad.code, 'HOST_KEY');
  assert.match(bad.message as string, `HOST KEY MISMATCH for [${hosts.b.addr}]:${sshd.port}`);
  assert.match(bad.message as string, sshd.fingerprint);
  const empty = join(hosts.dir, 'empty_known_hosts');
  writeFileSync(empty, '');
  const unknown = (await client({ mib: 1, ssh: sshArgs({ knownHosts: empty }) })).find((e) => e.event === 'failed')!;
  assert.is(unknown.code, 'HOST_KEY');
  assert.match(unknown.message as string, `host [${hosts.b.addr}]:${sshd.port} is unknown`);
  assert.match(unknown.message as string, sshd.fingerprint);
});

test('openssh: a host key that changed after the ssh2 login, or an unknown host, is refused by OpenSSH too, naming the host', async () => {
  const wrong = join(hosts.dir, 'wrong_known_hosts');
  const empty = join(hosts.dir, 'empty_known_hosts');
  const dial = async (knownHosts: string) => {
    const t = { host: hosts.b.addr, port: sshd.port, user: 'root', identity: sshd.identity, knownHosts, remoteSocket: join(hosts.dir, 'agent/none.sock'), connectTimeoutMs: 5000 };
    const r = await jsonLinesInNs<Event>(hosts.a, process.execPath, ['--import', 'tsx', join(root, 'test/fixtures/openssh-dial.ts'), JSON.stringify(t)], { cwd: root, timeoutMs: 20_000 });
    return r.events[0] ?? { event: 'none', stderr: r.stderr };
  };
  for (const file of [wrong, empty]) {
    const r = await dial(file);
    assert.is(r.event, 'failed', JSON.stringify(r));
    assert.is(r.code, 'HOST_KEY', JSON.stringify(r));
    assert.match(r.message as string, `host key of root@${hosts.b.addr}:${sshd.port} refused by OpenSSH against ${file}`);
  }
});

test('openssh: the ssh processes die with the client, also when it is SIGKILLed mid-stream', async () => {
  const link = `kill${Date.now() % 100000}`;
  const [cmd, argv] = nsArgv(hosts.a, process.execPath, ['--import', 'tsx', join(root, 'test/fixtures/link-echo-client.ts'), JSON.stringify({ link, mib: 1024, holdMs: 5000, ssh: sshArgs({ agentSharedDir: undefined } as never) })]);
  const p = spawn(cmd, argv, { cwd: root, stdio: ['ignore', 'pipe', 'inherit'], env: { ...process.env, VMSHIFT_SSH_CLIENT: 'openssh' } });
  try {
    let out = '';
    p.stdout!.on('data', (b) => { out += b; });
    // Our ssh clients: their argv names the agent's socket of this link.
    const sshPids = () => readdirSync('/proc').filter((d) => /^\d+$/.test(d)).filter((d) => {
      try { const c = readFileSync(`/proc/${d}/cmdline`, 'utf8'); return c.startsWith('ssh\0') && c.includes(`link-${link}.sock`); } catch { return false; }
    });
    for (let i = 0; i < 400 && !/"received":[1-9]\d{6,}/.test(out); i++) await new Promise((r) => setTimeout(r, 50));
    assert.match(out, /"received":[1-9]\d{6,}/, 'the stream got going');
    const before = sshPids();
    assert.is(before.length, 1, 'one ssh process carries the link');
    p.kill('SIGKILL');
    let left = before;
    for (let i = 0; i < 60 && left.length; i++) { await new Promise((r) => setTimeout(r, 50)); left = sshPids(); }
    assert.equal(left, [], 'no ssh process outlived the client');
  } finally {
    p.kill('SIGKILL');
  }
});

test('tls: echo through a reset; a client or server certificate from another CA is refused', async () => {
  const other = await makeCerts(join(hosts.dir, 'other-ca'), hosts.b.addr);
  const port = 30000 + Math.floor(Math.random() * 20000);
  const tlsOf = (dir: string) => ({ host: hosts.b.addr, port, ca: join(dir, 'ca-cert.pem'), cert: join(dir, 'client-cert.pem'), key: join(dir, 'client-key.pem') });
  const agent = (link: string) => daemonInNs(hosts.b, join(root, 'bin/vmshift'), ['link-agent', '--echo', '--link', link, '--migration', 'm1',
    '--socket', join(hosts.dir, `agent/tls-${link}.sock`), '--hold-ms', '20000', '--tls-listen', `${hosts.b.addr}:${port}`,
    '--tls-ca', join(certs, 'ca-cert.pem'), '--tls-cert', join(certs, 'server-cert.pem'), '--tls-key', join(certs, 'server-key.pem')]);
  const waitFor = async (d: ReturnType<typeof agent>) => {
    for (let i = 0; !d.output().includes('waiting on'); i++) {
      if (i > 600 || d.proc.exitCode !== null) throw new Error(`agent did not start:\n${d.output()}`);
      await new Promise((r) => setTimeout(r, 50));
    }
  };

  const good = agent('tls1');
  await waitFor(good);
  let cut = false;
  // Large enough to still be running when the spawned `ss -K` lands (12 MiB finished first once
  // the link's echo ran at ~35 MiB/s).
  const events = await client({ link: 'tls1', mib: 48, tls: tlsOf(certs) }, (e) => {
    if (!cut && e.event === 'progress' && (e.received as number) > 2 * 1024 * 1024) { cut = true; void resetConnections(hosts.a, hosts.b); }
  });
  const d = done(events);
  assert.is(d.got, d.sent);
  assert.ok((d.stats.reconnects as number) >= 1);
  assert.is(await good.exited, 0, 'the agent finished with the link');

  const strict = agent('tls2');
  await waitFor(strict);
  const wrongClient = (await client({ link: 'tls2', mib: 1, tls: { ...tlsOf(other), ca: join(certs, 'ca-cert.pem') } })).find((e) => e.event === 'failed')!;
  assert.is(wrongClient.code, 'AUTH', JSON.stringify(wrongClient));
  assert.match(wrongClient.message as string, /certificate/);
  const wrongServer = (await client({ link: 'tls2', mib: 1, tls: { ...tlsOf(certs), ca: join(other, 'ca-cert.pem') } })).find((e) => e.event === 'failed')!;
  assert.is(wrongServer.code, 'AUTH', JSON.stringify(wrongServer));
  assert.match(wrongServer.message as string, /certificate refused/);
  assert.match(strict.output(), /refused: tls: .*certificate/);
  await strict.stop();
});

test.run();
