// Long-lived virsh processes for the few calls where a fresh `virsh` (process start plus a new
// libvirt connection, 25 ms on a quiet host and several times that on a loaded one) would sit
// inside a guest's pause: the commit of `vmshift migrate DOMAIN URI` resumes the destination
// through a session opened before the migration, and learns that the source copy is gone
// from a `virsh event --loop` already running. Arguments are passed to virsh's own command
// parser single-quoted; anything that cannot be quoted that way is refused.
import { spawn, type ChildProcess } from 'node:child_process';
import { VirshError } from './virsh.ts';

function quoteArg(a: string): string {
  if (/['\n\r\\]/.test(a)) throw new Error(`virsh session: cannot pass ${JSON.stringify(a)}`);
  return `'${a}'`;
}

/** `virsh -c URI` reading commands on stdin, one connection for every command. */
export class VirshSession {
  private proc: ChildProcess;
  private buf = '';
  private n = 0;
  private queue: Promise<unknown> = Promise.resolve();
  private waiter: { marker: string; resolve: (out: string) => void; reject: (e: Error) => void } | null = null;
  private exited: Error | null = null;

  constructor(readonly uri: string, bin = 'virsh') {
    // stderr joins stdout (no shell interpolation: "$@" is virsh's argv), so an error line
    // arrives before the end marker of its command.
    this.proc = spawn('sh', ['-c', 'exec "$0" "$@" 2>&1', bin, '-q', '-c', uri], { stdio: ['pipe', 'pipe', 'ignore'] });
    this.proc.stdout!.setEncoding('utf8');
    this.proc.stdout!.on('data', (s: string) => { this.buf += s; this.check(); });
    this.proc.stdin!.on('error', () => {});
    this.proc.on('exit', (code) => {
      this.exited = new Error(`virsh session (${uri}) exited (${code}): ${this.buf.slice(-500).trim()}`);
      this.waiter?.reject(this.exited);
      this.waiter = null;
    });
  }

  private check(): void {
    const w = this.waiter;
    if (!w) return;
    const i = this.buf.indexOf(w.marker);
    if (i < 0) return;
    const out = this.buf.slice(0, i).split('\n').filter((l) => !l.startsWith('virsh # ')).join('\n').trim();
    this.buf = this.buf.slice(i + w.marker.length);
    this.waiter = null;
    w.resolve(out);
  }

  /** One virsh command; resolves with its output, rejects with its `error:` lines. */
  run(args: string[], timeoutMs = 60_000): Promise<string> {
    const p = this.queue.then(() => new Promise<string>((resolve, reject) => {
      if (this.exited) { reject(this.exited); return; }
      const marker = `VMSHIFT-END-${++this.n}-${process.pid}`;
      const t = setTimeout(() => { this.waiter = null; reject(new VirshError('other', args, '', `virsh ${args[0]} (${this.uri}) timed out after ${timeoutMs} ms`)); }, timeoutMs);
      this.waiter = {
        marker,
        resolve: (out) => {
          clearTimeout(t);
          const err = out.split('\n').filter((l) => l.startsWith('error:')).join('\n');
          if (err) reject(new VirshError(/failed to get domain|Domain not found/i.test(err) ? 'no-domain' : 'other', args, err, `virsh ${args[0]} (${this.uri}) failed: ${err}`));
          else resolve(out);
        },
        reject: (e) => { clearTimeout(t); reject(e); },
      };
      this.proc.stdin!.write(`${args.map(quoteArg).join(' ')}\necho ${marker}\n`);
    }));
    this.queue = p.catch(() => {});
    return p;
  }

  close(): void {
    if (!this.exited) { this.proc.stdin!.end('quit\n'); setTimeout(() => this.proc.kill(), 2000).unref(); }
  }
}

/** `virsh event --loop` for one domain's lifecycle events: `on(line)` for each event line. */
export function watchLifecycle(uri: string, domain: string, on: (line: string) => void, bin = 'virsh'): { close(): void } {
  const p = spawn(bin, ['-c', uri, 'event', '--domain', domain, '--event', 'lifecycle', '--loop'], { stdio: ['ignore', 'pipe', 'ignore'] });
  let buf = '';
  p.stdout!.setEncoding('utf8');
  p.stdout!.on('data', (s: string) => {
    buf += s;
    let i;
    while ((i = buf.indexOf('\n')) >= 0) {
      const line = buf.slice(0, i).trim();
      buf = buf.slice(i + 1);
      if (line.startsWith('event ')) on(line);
    }
  });
  p.on('error', () => {});
  return { close: () => { if (p.exitCode === null) p.kill(); } };
}
