// Two "hosts" on this machine for host-to-host tests: network namespaces A and B (unique
// names per run) joined by a veth pair with a /30 and NO default route, sshd in B started by
// hand (generated host key, private AuthorizedKeysFile, stopped by PID), and a directory both
// see (the shared storage). Network clients run only inside a namespace: `inA`/`inB` refuse
// to start anything in the root namespace, whose default route leads off the machine.
import { randomBytes } from 'node:crypto';
import { existsSync, mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { spawn, type SpawnOptions } from 'node:child_process';
import { onCleanup, run, runStatus, startDaemon, tempDir, type Daemon } from './proc.ts';

export interface Host {
  ns: string;
  addr: string;
  /** The veth end inside this namespace (for `ip link set ... down`). */
  dev: string;
}

export interface TwoHosts {
  a: Host;
  b: Host;
  /** A directory both hosts see (they share the mount namespace). */
  shared: string;
  dir: string;
}

function check(host: Host | undefined): Host {
  if (!host || !/^vs[ab][0-9a-f]{6}$/.test(host.ns)) throw new Error('hosts: refusing to start a network client outside a test namespace (the root namespace routes off the machine)');
  return host;
}

/** argv that runs `cmd args` inside the host's namespace. */
export function nsArgv(host: Host, cmd: string, args: string[]): [string, string[]] {
  return ['ip', ['netns', 'exec', check(host).ns, cmd, ...args]];
}

export function inNs(host: Host, cmd: string, args: string[], opts: SpawnOptions & { input?: string } = {}) {
  const [c, a] = nsArgv(host, cmd, args);
  return run(c, a, opts);
}

export function inNsStatus(host: Host, cmd: string, args: string[], opts: SpawnOptions & { input?: string } = {}) {
  const [c, a] = nsArgv(host, cmd, args);
  return runStatus(c, a, opts);
}

export function daemonInNs(host: Host, cmd: string, args: string[], opts: SpawnOptions = {}): Daemon {
  const [c, a] = nsArgv(host, cmd, args);
  return startDaemon(c, a, opts);
}

export async function twoHosts(): Promise<TwoHosts> {
  const tag = randomBytes(3).toString('hex');
  const a: Host = { ns: `vsa${tag}`, addr: '10.213.7.1', dev: `vxa${tag}` };
  const b: Host = { ns: `vsb${tag}`, addr: '10.213.7.2', dev: `vxb${tag}` };
  onCleanup(async () => {
    for (const h of [a, b]) {
      // What still runs inside was started by this run (a link agent started over SSH, an
      // sshd session after a cut): stopped with its namespace.
      const pids = (await runStatus('ip', ['netns', 'pids', h.ns])).stdout.split(/\s+/).filter(Boolean).map(Number);
      for (const pid of pids) try { process.kill(pid, 'SIGKILL'); } catch { /* gone */ }
      await runStatus('ip', ['netns', 'del', h.ns]);
    }
  });
  await run('ip', ['netns', 'add', a.ns]);
  await run('ip', ['netns', 'add', b.ns]);
  await run('ip', ['link', 'add', a.dev, 'netns', a.ns, 'type', 'veth', 'peer', 'name', b.dev, 'netns', b.ns]);
  for (const h of [a, b]) {
    await run('ip', ['-n', h.ns, 'addr', 'add', `${h.addr}/30`, 'dev', h.dev]);
    await run('ip', ['-n', h.ns, 'link', 'set', h.dev, 'up']);
    await run('ip', ['-n', h.ns, 'link', 'set', 'lo', 'up']);
  }
  const dir = tempDir('vmshift-hosts-');
  const shared = join(dir, 'shared');
  mkdirSync(shared, { mode: 0o700 });
  return { a, b, shared, dir };
}

/** Take a host's network down or up (a cut TCP does not see until it times out). */
export async function linkState(host: Host, up: boolean): Promise<void> {
  await run('ip', ['-n', check(host).ns, 'link', 'set', host.dev, up ? 'up' : 'down']);
}

/** Reset every TCP connection of a host to `peer` (as a firewall or conntrack flush does). */
export async function resetConnections(host: Host, peer: Host): Promise<void> {
  await inNsStatus(host, 'ss', ['-K', 'dst', peer.addr]);
}

export interface Sshd {
  port: number;
  daemon: Daemon;
  /** A known_hosts file holding B's real host key. */
  knownHosts: string;
  /** The client's private key, authorized in B. */
  identity: string;
  user: string;
  /** The host key's public line and SHA256 fingerprint. */
  hostKey: string;
  fingerprint: string;
}

/** Runs `cmd args` inside a host: its network namespace (default), or more (test/helpers/libvirt-hosts.ts). */
export type HostArgv = (cmd: string, args: string[]) => [string, string[]];

/**
 * sshd in `host`, listening on its address only, authorizing one generated client key.
 * `argv` places it (and its readiness probe): a libvirt host runs it in its mount namespace too.
 */
export async function startSshd(host: Host, dir: string, argv: HostArgv = (c, a) => nsArgv(host, c, a)): Promise<Sshd> {
  const d = join(dir, `sshd-${host.ns}`);
  mkdirSync(d, { mode: 0o700 });
  await run('ssh-keygen', ['-q', '-t', 'ed25519', '-N', '', '-f', join(d, 'host_key')]);
  await run('ssh-keygen', ['-q', '-t', 'ed25519', '-N', '', '-f', join(d, 'id_ed25519')]);
  writeFileSync(join(d, 'authorized_keys'), readFileSync(join(d, 'id_ed25519.pub')), { mode: 0o600 });
  const port = 20000 + Math.floor(Math.random() * 20000);
  writeFileSync(join(d, 'sshd_config'), [
    `Port ${port}`, `ListenAddress ${host.addr}`, `HostKey ${join(d, 'host_key')}`, 'PidFile none',
    'PermitRootLogin prohibit-password', 'UsePAM no', 'StrictModes no', 'PasswordAuthentication no',
    'KbdInteractiveAuthentication no', 'AllowStreamLocalForwarding yes', `AuthorizedKeysFile ${join(d, 'authorized_keys')}`,
    'LogLevel ERROR', 'MaxStartups 100', '',
  ].join('\n'));
  if (!existsSync('/run/sshd')) mkdirSync('/run/sshd', { mode: 0o755 });
  const daemon = startDaemon(...argv('/usr/sbin/sshd', ['-D', '-e', '-f', join(d, 'sshd_config')]));
  const pub = readFileSync(join(d, 'host_key.pub'), 'utf8').trim().split(/\s+/).slice(0, 2).join(' ');
  const knownHosts = join(d, 'known_hosts');
  writeFileSync(knownHosts, `[${host.addr}]:${port} ${pub}\n`);
  const fp = (await run('ssh-keygen', ['-l', '-f', join(d, 'host_key.pub')])).stdout.split(/\s+/)[1];
  // Ready once the port accepts a TCP connection (tried from inside the host itself).
  for (let i = 0; ; i++) {
    const r = await runStatus(...argv('bash', ['-c', `exec 3<>/dev/tcp/${host.addr}/${port}`]));
    if (r.code === 0) break;
    if (i > 100) throw new Error(`sshd did not start:\n${daemon.output()}`);
    await new Promise((res) => setTimeout(res, 50));
  }
  return { port, daemon, knownHosts, identity: join(d, 'id_ed25519'), user: 'root', hostKey: pub, fingerprint: fp };
}

/**
 * A CA with a server certificate for `serverAddr` and a client certificate, in `dir`:
 * ca-cert.pem, server-{cert,key}.pem, client-{cert,key}.pem.
 */
export async function makeCerts(dir: string, serverAddr: string): Promise<string> {
  mkdirSync(dir, { recursive: true, mode: 0o700 });
  const ssl = (...args: string[]) => run('openssl', args, { cwd: dir });
  const ec = ['-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1', '-nodes'];
  await ssl('req', '-x509', ...ec, '-keyout', 'ca-key.pem', '-out', 'ca-cert.pem', '-days', '2', '-subj', '/CN=vmshift link test CA');
  for (const [who, ext] of [['server', `subjectAltName=IP:${serverAddr}\nextendedKeyUsage=serverAuth\n`], ['client', 'extendedKeyUsage=clientAuth\n']] as const) {
    await ssl('req', ...ec, '-keyout', `${who}-key.pem`, '-out', `${who}.csr`, '-subj', `/CN=vmshift link ${who}`);
    writeFileSync(join(dir, `${who}.cnf`), `${ext}keyUsage=digitalSignature,keyEncipherment\n`);
    await ssl('x509', '-req', '-in', `${who}.csr`, '-CA', 'ca-cert.pem', '-CAkey', 'ca-key.pem', '-CAcreateserial', '-out', `${who}-cert.pem`, '-days', '2', '-extfile', `${who}.cnf`);
  }
  return dir;
}

export interface JsonLinesRun<E> { code: number | null; events: E[]; stderr: string }

/**
 * Run `cmd args` inside `host`'s namespace, parsing its stdout as JSON lines; `during` sees
 * each event as it comes (to cut the network at the right moment). Killed after `timeoutMs`.
 */
export function jsonLinesInNs<E>(host: Host, cmd: string, args: string[], opts: { cwd?: string; timeoutMs?: number; during?: (e: E) => void; argv?: HostArgv; onSpawn?: (pid: number) => void } = {}): Promise<JsonLinesRun<E>> {
  const [c, argv] = opts.argv ? opts.argv(cmd, args) : nsArgv(host, cmd, args);
  return new Promise((resolve) => {
    const p = spawn(c, argv, { cwd: opts.cwd, stdio: ['ignore', 'pipe', 'pipe'] });
    if (p.pid !== undefined) opts.onSpawn?.(p.pid);
    onCleanup(() => { if (p.exitCode === null) p.kill('SIGKILL'); });
    const events: E[] = [];
    let buf = '', stderr = '';
    p.stdout!.on('data', (b) => {
      buf += b;
      let i;
      while ((i = buf.indexOf('\n')) >= 0) {
        const e = JSON.parse(buf.slice(0, i)) as E;
        buf = buf.slice(i + 1);
        events.push(e);
        opts.during?.(e);
      }
    });
    p.stderr!.on('data', (b) => { stderr += b; });
    const t = setTimeout(() => p.kill('SIGKILL'), opts.timeoutMs ?? 60_000);
    p.on('close', (code) => { clearTimeout(t); resolve({ code, events, stderr }); });
  });
}
