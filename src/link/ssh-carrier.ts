// The SSH network carrier. The first dial logs in with ssh2 (in process): it verifies the
// host key against known_hosts itself (a host key that is not there, or differs, refuses with
// the host and fingerprint; a refused key refuses with the identity file: neither is retried)
// and runs `vmshift link-agent --start ...` on the peer, which starts the link's agent there
// (detached, listening on a unix socket) unless it already runs. The link's bytes then go
// through one of two clients, each dial a new connection to that socket:
// - openssh (the default): a spawned `ssh -N -L` per carrier (openssh-carrier.ts), whose
//   crypto runs beside the link on the other core: it measured faster (docs/performance.md);
// - ssh2: a streamlocal channel of an ssh2 connection, in this process.
import { Client, type ClientChannel } from 'ssh2';
import { readFileSync } from 'node:fs';
import type { Duplex } from 'node:stream';
import { LinkError } from './errors.ts';
import { verifyHostKey } from './known-hosts.ts';
import { opensshChannel, opensshForward, type OpensshTarget } from './openssh-carrier.ts';

export interface SshTarget extends OpensshTarget {
  /** Command that starts the agent on the peer (idempotent); run once, on the first dial. */
  startCommand: string;
  /** Which client carries the link's data (default: $VMSHIFT_SSH_CLIENT, else DEFAULT_SSH_CLIENT). */
  client?: SshClientKind;
}

export type SshClientKind = 'ssh2' | 'openssh';
// OpenSSH: the memory bench moved the dirty guest in ~0.66x the QEMU time with it (median of 14 interleaved rounds) (docs/performance.md).
export const DEFAULT_SSH_CLIENT: SshClientKind = 'openssh';

/** The client a dialer uses when none is given: $VMSHIFT_SSH_CLIENT (benches and tests pick one), else the default. */
export function sshClient(given?: string): SshClientKind {
  const v = given ?? (process.env.VMSHIFT_SSH_CLIENT || DEFAULT_SSH_CLIENT);
  if (v !== 'ssh2' && v !== 'openssh') throw new Error(`ssh client must be ssh2 or openssh (got "${v}")`);
  return v;
}

function quote(s: string): string {
  return /^[A-Za-z0-9_@%+=:,./-]+$/.test(s) ? s : `'${s.replace(/'/g, `'\\''`)}'`;
}

/** A shell command line from argv (the peer's sshd runs it through the user's shell). */
export function shellLine(argv: string[]): string {
  return argv.map(quote).join(' ');
}

function connectClient(t: SshTarget): Promise<Client> {
  return new Promise((resolve, reject) => {
    const c = new Client();
    let hostKeyError: LinkError | null = null;
    const where = `${t.user}@${t.host}:${t.port}`;
    let ready = false;
    c.once('ready', () => { ready = true; resolve(c); });
    // A refused host key may end the connection without an 'error': settle on 'close' too.
    c.once('close', () => { if (!ready) reject(hostKeyError ?? new Error(`ssh: ${where}: connection closed during the handshake`)); });
    c.once('error', (e: Error & { level?: string }) => {
      c.end();
      if (hostKeyError) reject(hostKeyError);
      else if (e.level === 'client-authentication') reject(new LinkError('AUTH', `ssh: ${where} refused the key ${t.identity} (${e.message})`));
      else reject(new Error(`ssh: ${where}: ${e.message}`));
    });
    let key: Buffer;
    try {
      key = readFileSync(t.identity);
    } catch (e) {
      reject(new LinkError('AUTH', `ssh: cannot read identity ${t.identity}: ${(e as Error).message}`));
      return;
    }
    c.connect({
      host: t.host, port: t.port, username: t.user, privateKey: key,
      readyTimeout: t.connectTimeoutMs ?? 10_000,
      // AES-GCM first: with AES-NI it is the fastest cipher both ends have (measured).
      algorithms: { cipher: ['aes128-gcm@openssh.com', 'aes256-gcm@openssh.com', 'chacha20-poly1305@openssh.com', 'aes128-ctr', 'aes256-ctr'] },
      hostVerifier: (blob: Buffer) => {
        try {
          verifyHostKey(t.knownHosts, t.host, t.port, blob);
          return true;
        } catch (e) {
          hostKeyError = e as LinkError;
          return false;
        }
      },
    });
  });
}

function exec(c: Client, cmd: string): Promise<{ code: number; out: string }> {
  return new Promise((resolve, reject) => {
    c.exec(cmd, (err, ch) => {
      if (err) { reject(err); return; }
      let out = '';
      ch.on('data', (b: Buffer) => { out += b; });
      ch.stderr.on('data', (b: Buffer) => { out += b; });
      ch.on('exit', (code: number | null) => resolve({ code: code ?? -1, out }));
      ch.on('error', reject);
    });
  });
}

async function startAgentOver(c: Client, t: SshTarget): Promise<void> {
  const r = await exec(c, t.startCommand);
  if (r.code !== 0) throw new LinkError('ABORTED', `ssh: starting the link agent on ${t.host} failed (exit ${r.code}): ${r.out.trim().slice(-2000)}`);
}

/**
 * A dial function for `Link`: each call is one SSH connection carrying one channel. With the
 * OpenSSH client the first call still logs in with ssh2 (our host key check and its clear
 * refusal, and the agent's start), then every call is an `ssh -N -L` process (openssh-carrier.ts).
 */
export function sshDialer(t: SshTarget): () => Promise<Duplex> {
  let started = false;
  if (sshClient(t.client) === 'openssh') {
    return async () => {
      if (started) return opensshChannel(t);
      // Both logins at once: ssh's is ready by the time the agent answers. Nothing goes
      // through ssh before ssh2 has checked the host key and started the agent.
      const fwd = opensshForward(t);
      try {
        const c = await connectClient(t);
        try {
          await startAgentOver(c, t);
        } finally {
          c.end();
        }
      } catch (e) {
        fwd.kill();
        throw e;
      }
      started = true;
      return fwd.channel();
    };
  }
  return async () => {
    const c = await connectClient(t);
    try {
      if (!started) {
        await startAgentOver(c, t);
        started = true;
      }
      const ch = await new Promise<ClientChannel>((resolve, reject) => {
        c.openssh_forwardOutStreamLocal(t.remoteSocket, (err, stream) => (err ? reject(new Error(`ssh: ${t.host}: cannot reach the link agent at ${t.remoteSocket}: ${err.message}`)) : resolve(stream)));
      });
      // ssh2's channel.destroy() only asks the server to close the channel, and end() says
      // goodbye over TCP: over a network that is gone neither completes, and the socket held
      // `vmshift migrate` for the kernel's retransmission timeout after a cut (the demo's
      // second act). A carrier the link drops takes its connection with it, shortly after.
      const hangUp = () => { c.end(); setTimeout(() => c.destroy(), 1000).unref(); };
      const destroyChannel = ch.destroy.bind(ch);
      ch.destroy = () => { destroyChannel(); hangUp(); return ch; };
      ch.on('close', hangUp);
      // The link corks its carrier while it writes a batch of frames. A channel makes an SSH
      // packet (32 KiB at most) of each write and hands each to the TCP socket at once: a
      // syscall per packet was the largest item in the sending end's profile (~1 s per
      // 100 MiB at load 15). Corked through to the socket, a batch goes in one writev.
      const sock = (c as unknown as { _sock?: Duplex })._sock;
      if (sock) {
        const cork = ch.cork.bind(ch), uncork = ch.uncork.bind(ch);
        ch.cork = () => { sock.cork(); cork(); };
        ch.uncork = () => { uncork(); sock.uncork(); };
      }
      c.on('error', () => ch.destroy());
      c.on('close', () => ch.destroy());
      return ch;
    } catch (e) {
      c.end();
      throw e;
    }
  };
}
