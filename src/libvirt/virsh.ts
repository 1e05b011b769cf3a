// libvirt through `virsh`: execFile with an argument vector (never a shell), a timeout per
// call, and errors that carry virsh's own stderr. The npm libvirt bindings do not build on
// Node 20 or lack monitor commands; virsh covers everything at ~25 ms a call.
import { execFile } from 'node:child_process';
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

export interface ExecResult { stdout: string; stderr: string }
/** Runs `file args` with `input` on stdin; rejects with `{ code, stdout, stderr, killed }` on failure. */
export type ExecFn = (file: string, args: string[], opts: { timeoutMs: number; input?: string }) => Promise<ExecResult>;

export type VirshErrorKind = 'no-domain' | 'other';

export class VirshError extends Error {
  constructor(
    readonly kind: VirshErrorKind,
    readonly args: string[],
    readonly stderr: string,
    message: string,
  ) {
    super(message);
    this.name = 'VirshError';
  }
}

/** The default ExecFn: child_process.execFile, no shell, stdin fed from `input`. */
export const execFileFn: ExecFn = (file, args, { timeoutMs, input }) =>
  new Promise((resolve, reject) => {
    const child = execFile(file, args, { timeout: timeoutMs, maxBuffer: 64 * 1024 * 1024, encoding: 'utf8' }, (err, stdout, stderr) => {
      if (err) reject(Object.assign(err, { stdout, stderr }));
      else resolve({ stdout, stderr });
    });
    child.stdin?.on('error', () => { /* virsh may exit before reading stdin; the exit code tells */ });
    child.stdin?.end(input ?? '');
  });

export interface VirshOpts {
  /** libvirt connection URI, e.g. qemu:///system or test:///default. */
  uri?: string;
  timeoutMs?: number;
  exec?: ExecFn;
  /** The virsh binary (tests may point elsewhere). */
  bin?: string;
}

export class Virsh {
  readonly uri: string;
  private readonly timeoutMs: number;
  private readonly exec: ExecFn;
  private readonly bin: string;

  constructor(opts: VirshOpts = {}) {
    this.uri = opts.uri ?? 'qemu:///system';
    this.timeoutMs = opts.timeoutMs ?? 60_000;
    this.exec = opts.exec ?? execFileFn;
    this.bin = opts.bin ?? 'virsh';
  }

  /** Run `virsh -c URI ...args` and return its stdout. */
  async run(args: string[], opts: { input?: string; timeoutMs?: number } = {}): Promise<string> {
    const argv = ['-c', this.uri, ...args];
    try {
      const { stdout } = await this.exec(this.bin, argv, { timeoutMs: opts.timeoutMs ?? this.timeoutMs, input: opts.input });
      return stdout;
    } catch (e) {
      const err = e as { stderr?: string; code?: unknown; killed?: boolean; signal?: unknown; message?: string };
      const stderr = (err.stderr ?? '').trim();
      const what = `virsh ${args[0] ?? ''} (${this.uri})`;
      if (err.killed) throw new VirshError('other', argv, stderr, `${what} timed out after ${opts.timeoutMs ?? this.timeoutMs} ms`);
      const kind: VirshErrorKind = /failed to get domain|Domain not found/i.test(stderr) ? 'no-domain' : 'other';
      throw new VirshError(kind, argv, stderr, `${what} failed (exit ${String(err.code)}): ${stderr || err.message}`);
    }
  }

  dumpxml(domain: string, opts: { inactive?: boolean } = {}): Promise<string> {
    return this.run(['dumpxml', ...(opts.inactive ? ['--inactive'] : []), '--domain', domain]);
  }

  /**
   * Define (or redefine) a persistent domain from XML. virsh reads a file: Node gives a child
   * a socketpair, not a pipe, as stdin, and /dev/stdin cannot be opened on a socket (ENXIO),
   * so the XML goes through a private temp file.
   */
  async define(xml: string): Promise<void> {
    const dir = await mkdtemp(join(tmpdir(), 'vmshift-define-'));
    try {
      const file = join(dir, 'domain.xml');
      await writeFile(file, xml, { mode: 0o600 });
      await this.run(['define', '--file', file]);
    } finally {
      await rm(dir, { recursive: true, force: true });
    }
  }

  /** `running`, `shut off`, `paused`, ... as virsh prints it. */
  async domstate(domain: string): Promise<string> {
    return (await this.run(['domstate', '--domain', domain])).trim();
  }

  async start(domain: string): Promise<void> {
    await this.run(['start', '--domain', domain]);
  }

  async destroy(domain: string): Promise<void> {
    await this.run(['destroy', '--domain', domain]);
  }

  /** Domain names; all defined ones with `all`, else only running ones. */
  async list(opts: { all?: boolean } = {}): Promise<string[]> {
    const out = await this.run(['list', '--name', ...(opts.all ? ['--all'] : [])]);
    return out.split('\n').map((l) => l.trim()).filter((l) => l !== '');
  }

  /** Send one QMP command (JSON text) through libvirt's monitor; returns virsh's stdout. */
  qemuMonitorCommand(domain: string, json: string, opts: { timeoutMs?: number } = {}): Promise<string> {
    return this.run(['qemu-monitor-command', '--domain', domain, '--pretty', '--cmd', json], opts);
  }
}
