// The OpenSSH client as a link carrier: one `ssh -N -L LOCAL.sock:REMOTE_AGENT.sock` process
// per carrier, LOCAL in a fresh 0700 directory, connected to once (then unlinked): that
// connection is the carrier. The crypto and SSH framing then run in a C process of their
// own, on the other core, instead of in the node process that also runs the link
// (docs/performance.md). (`ssh -W /path` would spare the local socket, but OpenSSH 9.2 here
// opened no channel for a unix socket path.)
// Security as with ssh2 (src/link/ssh-carrier.ts, which still makes the first connection and
// its own host key check): the same known_hosts file with StrictHostKeyChecking=yes (a key
// changed since is refused too), only our identity, no agent, no X11, no shell, no user
// ssh_config (no ControlMaster, ProxyCommand or other forwards), and nothing written back to
// known_hosts. The process dies with its carrier: the link's drop kills it by PID, and it
// runs under `setpriv --pdeathsig KILL`, so the kernel kills it when this process dies,
// SIGKILL included (`ssh -N` reads no stdin and would otherwise outlive us). ServerAlive
// ends one left behind a dead network.
import { spawn } from 'node:child_process';
import { existsSync, mkdtempSync, rmSync } from 'node:fs';
import { connect, type Socket } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { LinkError } from './errors.ts';

/** Where an SSH carrier goes (also src/link/ssh-carrier.ts's target). */
export interface OpensshTarget {
  host: string;
  port: number;
  user: string;
  /** Private key file (OpenSSH format). */
  identity: string;
  knownHosts: string;
  /** The agent's socket on the peer. */
  remoteSocket: string;
  connectTimeoutMs?: number;
  /** The client binary (default `ssh` on PATH). */
  ssh?: string;
}

/** ssh's argv for forwarding `local` to the peer's unix socket. */
export function opensshArgs(t: OpensshTarget, local: string): string[] {
  const o = (kv: string) => ['-o', kv];
  return ['-F', '/dev/null', '-N', '-T', '-x', '-a', '-e', 'none',
    ...o('BatchMode=yes'), ...o('StrictHostKeyChecking=yes'), ...o(`UserKnownHostsFile=${t.knownHosts}`), ...o('GlobalKnownHostsFile=/dev/null'),
    ...o('UpdateHostKeys=no'), ...o('CheckHostIP=no'), ...o('VerifyHostKeyDNS=no'), ...o('HashKnownHosts=no'),
    '-i', t.identity, ...o('IdentitiesOnly=yes'), ...o('IdentityAgent=none'), ...o('PasswordAuthentication=no'), ...o('KbdInteractiveAuthentication=no'),
    ...o('ForwardAgent=no'), ...o('ForwardX11=no'), ...o('ControlMaster=no'), ...o('ControlPath=none'),
    ...o('ExitOnForwardFailure=yes'), ...o('StreamLocalBindMask=0177'), '-L', `${local}:${t.remoteSocket}`,
    ...o(`ConnectTimeout=${Math.ceil((t.connectTimeoutMs ?? 10_000) / 1000)}`), ...o('ServerAliveInterval=5'), ...o('ServerAliveCountMax=3'),
    // AES-GCM first: with AES-NI the fastest cipher both ends have (bench/link-carriers.ts).
    ...o('Ciphers=aes128-gcm@openssh.com,aes256-gcm@openssh.com,chacha20-poly1305@openssh.com'), ...o('Compression=no'),
    '-p', String(t.port), '-l', t.user, t.host];
}

/** What ssh's stderr says, as a link error: host key and authentication refusals are final. */
function refusal(t: OpensshTarget, code: number | null, stderr: string): Error {
  const where = `${t.user}@${t.host}:${t.port}`;
  const said = stderr.trim().split('\n').filter((l) => l && !l.startsWith('@')).slice(-6).join(' / ').slice(-1500);
  if (/Host key verification failed|REMOTE HOST IDENTIFICATION HAS CHANGED|host key is known for|No .* host key is known/i.test(stderr)) {
    const fp = /(SHA256:[A-Za-z0-9+/]+)/.exec(stderr)?.[1];
    return new LinkError('HOST_KEY', `ssh: host key of ${where} refused by OpenSSH against ${t.knownHosts}${fp ? ` (it offers ${fp})` : ''}: ${said}`);
  }
  if (code === 127 || /ENOENT|failed to execute/.test(stderr)) {
    return new LinkError('ABORTED', `ssh: cannot run the OpenSSH client (ssh, under setpriv): ${said}; install openssh-client, or use VMSHIFT_SSH_CLIENT=ssh2`);
  }
  if (/Permission denied/i.test(stderr)) return new LinkError('AUTH', `ssh: ${where} refused the key ${t.identity} (${said})`);
  return new Error(`ssh: ${where}: the OpenSSH client${code === null ? '' : ` exited (${code})`} before the link agent answered: ${said || 'no message'}`);
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/** A started OpenSSH client: `channel()` is its carrier, `kill()` gives it up. */
export interface OpensshForward {
  /**
   * Resolves once the first byte came from the peer (the agent speaks first: its HELLO), so
   * that a refused login or key, or an agent that does not answer, rejects here.
   */
  channel(): Promise<Socket>;
  kill(): void;
}

/**
 * Start a new OpenSSH client now (its login then runs while the caller does other things:
 * the first dial starts the peer's agent meanwhile); connect with `channel()`.
 */
export function opensshForward(t: OpensshTarget): OpensshForward {
  const timeoutMs = t.connectTimeoutMs ?? 10_000;
  const where = `${t.user}@${t.host}:${t.port}`;
  const dir = mkdtempSync(join(tmpdir(), 'vmshift-ssh-'));
  const local = join(dir, 'link.sock');
  // Removed once connected, or given up; and if this process exits with a dial pending (a
  // migration failing or aborted meanwhile), on its way out.
  const removeDir = () => { rmSync(dir, { recursive: true, force: true }); process.off('exit', removeDir); };
  process.on('exit', removeDir);
  const child = spawn('setpriv', ['--pdeathsig', 'KILL', '--', t.ssh ?? 'ssh', ...opensshArgs(t, local)], { stdio: ['ignore', 'ignore', 'pipe'] });
  let stderr = '';
  child.stderr!.on('data', (b: Buffer) => { if (stderr.length < 16_384) stderr += b; });
  let exited: number | null | undefined;
  child.once('close', (code) => { exited = code; }); // after stderr was read to its end
  child.once('error', (e) => { stderr += `spawn: ${e.message}\n`; exited ??= null; });
  const running = () => exited === undefined;
  // The link drops a carrier by destroying it (a cut, a silent peer, the end): the process goes with it.
  const kill = () => {
    removeDir();
    if (!running()) return;
    child.kill('SIGTERM');
    setTimeout(() => { if (running()) child.kill('SIGKILL'); }, 2000).unref();
  };
  const channel = async (): Promise<Socket> => {
    try {
      // ssh makes the local socket once it logged in; bounded by its own ConnectTimeout and ours.
      const deadline = performance.now() + timeoutMs + 2000;
      while (!existsSync(local)) {
        if (!running()) throw refusal(t, exited ?? null, stderr);
        if (performance.now() > deadline) throw new Error(`ssh: ${where}: no forward within ${timeoutMs} ms`);
        await sleep(10);
      }
      const sock = connect(local);
      await new Promise<void>((resolve, reject) => { sock.once('connect', resolve); sock.once('error', reject); });
      removeDir(); // connected: nobody else may
      sock.once('close', kill); // when ssh exits, the socket reads what it delivered, then EOF
      return await new Promise<Socket>((resolve, reject) => {
        const timer = setTimeout(() => { sock.destroy(); reject(new Error(`ssh: ${where}: no answer from the link agent within ${timeoutMs} ms`)); }, timeoutMs);
        const early = () => { clearTimeout(timer); sock.destroy(); setTimeout(() => reject(stderr.trim() ? refusal(t, exited ?? null, stderr) : new Error(`ssh: ${where}: cannot reach the link agent at ${t.remoteSocket}`)), 50); };
        sock.once('close', early);
        sock.once('data', (first: Buffer) => {
          clearTimeout(timer);
          sock.off('close', early);
          sock.pause();
          sock.unshift(first);
          // The link attaches its 'data' listener when this resolves; a paused socket would not start by itself.
          setImmediate(() => sock.resume());
          resolve(sock);
        });
      });
    } catch (e) {
      kill();
      throw e;
    } finally {
      removeDir();
    }
  };
  return { channel, kill };
}

/** Open a carrier through a new OpenSSH client (see OpensshForward.channel). */
export function opensshChannel(t: OpensshTarget): Promise<Socket> {
  return opensshForward(t).channel();
}
