// vmshift's own QMP client over a unix socket. Written because the npm `qemu-qmp` matches
// replies first-in-first-out, loses event data and desyncs on `""` replies. Here every
// command carries a unique id and its reply is matched by that id; any JSON value is a
// valid `return`; events keep their `data` and `timestamp`.
//
// Wire format: QEMU sends one JSON object per line (`\r\n`). The first is the greeting
// `{"QMP": {...}}`; commands are refused until `qmp_capabilities` has been sent.
import { connect, type Socket } from 'node:net';
import { QmpConnectionError, replyValue, type ExecuteOpts, type QmpTransport } from './transport.ts';

export interface QmpEvent {
  event: string;
  data: Record<string, unknown>;
  timestamp: { seconds: number; microseconds: number };
}

export interface QmpGreeting {
  version: { qemu: { major: number; minor: number; micro: number }; package: string };
  capabilities: string[];
}

export interface QmpClientOpts {
  /** Time allowed for connecting, the greeting and `qmp_capabilities` together. */
  connectTimeoutMs?: number;
  /** Default per-command timeout. */
  timeoutMs?: number;
}

type Listener = (ev: QmpEvent) => void;

interface Pending {
  command: string;
  resolve: (reply: Record<string, unknown>) => void;
  reject: (err: Error) => void;
  timer: NodeJS.Timeout;
}

/** A line longer than this without a newline is not QMP: fail instead of buffering forever. */
const MAX_LINE = 64 * 1024 * 1024;

export class QmpClient implements QmpTransport {
  private socket: Socket | null = null;
  private buf = '';
  private nextId = 1;
  private readonly pending = new Map<string, Pending>();
  /** Ids whose command timed out: their late replies are dropped, not a protocol error. */
  private readonly abandoned = new Set<string>();
  private readonly listeners = new Set<Listener>();
  private greetingWaiter: { resolve: (g: QmpGreeting) => void; reject: (e: Error) => void } | null = null;
  private closeError: Error | null = null;
  greeting: QmpGreeting | null = null;
  readonly peer: string;

  private constructor(readonly path: string, private readonly opts: QmpClientOpts) {
    this.peer = `qmp:${path}`;
  }

  /** Connect, read the greeting and leave negotiation mode; ready for commands. */
  static async connect(path: string, opts: QmpClientOpts = {}): Promise<QmpClient> {
    const c = new QmpClient(path, opts);
    await c.open();
    return c;
  }

  get connected(): boolean {
    return this.socket !== null && this.closeError === null;
  }

  /** Drop the current connection (if any) and open a new one to the same socket. */
  async reconnect(): Promise<void> {
    await this.close();
    await this.open();
  }

  private async open(): Promise<void> {
    const timeoutMs = this.opts.connectTimeoutMs ?? 10_000;
    this.buf = '';
    this.closeError = null;
    this.abandoned.clear();
    const sock = connect(this.path);
    this.socket = sock;
    sock.setEncoding('utf8');
    const greeting = new Promise<QmpGreeting>((resolve, reject) => { this.greetingWaiter = { resolve, reject }; });
    sock.on('data', (chunk: string) => this.onData(sock, chunk));
    let reached = false;
    sock.once('connect', () => { reached = true; });
    sock.on('error', (err) => this.fail(sock, new QmpConnectionError(
      reached ? 'closed' : 'connect', this.peer, `${reached ? 'socket error' : 'cannot connect'}: ${err.message}`, { cause: err })));
    sock.on('close', () => this.fail(sock, new QmpConnectionError('closed', this.peer, 'monitor closed the connection')));
    let timer: NodeJS.Timeout | undefined;
    const deadline = new Promise<never>((_, reject) => {
      timer = setTimeout(() => reject(new QmpConnectionError('timeout', this.peer, `no QMP greeting within ${timeoutMs} ms`)), timeoutMs);
    });
    try {
      this.greeting = await Promise.race([greeting, deadline]);
      await this.execute('qmp_capabilities', undefined, { timeoutMs });
    } catch (err) {
      const e = err instanceof QmpConnectionError
        ? err
        : new QmpConnectionError('protocol', this.peer, `handshake failed: ${(err as Error).message}`, { cause: err });
      this.fail(sock, e);
      sock.destroy();
      throw e;
    } finally {
      clearTimeout(timer);
    }
  }

  async execute<T = unknown>(command: string, args?: Record<string, unknown>, opts: ExecuteOpts = {}): Promise<T> {
    const sock = this.socket;
    if (!sock || this.closeError) {
      throw this.closeError ?? new QmpConnectionError('closed', this.peer, `cannot run ${command}: not connected`);
    }
    const id = `vmshift-${this.nextId++}`;
    const timeoutMs = opts.timeoutMs ?? this.opts.timeoutMs ?? 30_000;
    const reply = await new Promise<Record<string, unknown>>((resolve, reject) => {
      const timer = setTimeout(() => {
        this.pending.delete(id);
        this.abandoned.add(id);
        reject(new QmpConnectionError('timeout', this.peer, `${command} got no reply within ${timeoutMs} ms`));
      }, timeoutMs);
      this.pending.set(id, { command, resolve, reject, timer });
      const msg: Record<string, unknown> = { execute: command, id };
      if (args !== undefined) msg.arguments = args;
      sock.write(JSON.stringify(msg) + '\n');
    });
    return replyValue<T>(reply, command, this.peer);
  }

  /** Run a human monitor (HMP) command; resolves with its text output (`""` when silent). */
  hmp(commandLine: string, opts?: ExecuteOpts): Promise<string> {
    return this.execute<string>('human-monitor-command', { 'command-line': commandLine }, opts);
  }

  /** Call `listener` for every event; returns the function that unsubscribes it. */
  onEvent(listener: Listener): () => void {
    this.listeners.add(listener);
    return () => this.listeners.delete(listener);
  }

  /**
   * Resolve with the next event named `name` that satisfies `predicate`. Start waiting BEFORE
   * running the command that causes the event, or it may be missed.
   */
  waitForEvent(name: string, predicate: (ev: QmpEvent) => boolean = () => true, timeoutMs = 30_000): Promise<QmpEvent> {
    return new Promise<QmpEvent>((resolve, reject) => {
      const done = (fn: () => void) => { clearTimeout(timer); this.listeners.delete(listener); this.closeWaiters.delete(onClose); fn(); };
      const listener: Listener = (ev) => {
        if (ev.event !== name) return;
        let ok: boolean;
        try { ok = predicate(ev); } catch (err) { done(() => reject(err)); return; }
        if (ok) done(() => resolve(ev));
      };
      const onClose = (err: Error) => done(() => reject(err));
      const timer = setTimeout(() => done(() => reject(new QmpConnectionError('timeout', this.peer, `no ${name} event within ${timeoutMs} ms`))), timeoutMs);
      this.listeners.add(listener);
      this.closeWaiters.add(onClose);
    });
  }

  private readonly closeWaiters = new Set<(err: Error) => void>();

  /** Close the connection; every command still waiting rejects with kind 'closed'. */
  async close(): Promise<void> {
    const sock = this.socket;
    if (!sock) return;
    this.fail(sock, new QmpConnectionError('closed', this.peer, 'connection closed by vmshift'));
    if (!sock.destroyed) {
      await new Promise<void>((resolve) => { sock.once('close', () => resolve()); sock.destroy(); });
    }
  }

  private onData(sock: Socket, chunk: string): void {
    if (sock !== this.socket || this.closeError) return;
    this.buf += chunk;
    // Every QMP message is a JSON object: anything else at the start of a line means the
    // peer is not a QMP monitor (an NBD server, a shell...). Fail now, not at a timeout.
    const start = this.buf.trimStart();
    if (start.length > 0 && start[0] !== '{') {
      this.protocolError(sock, `not a QMP monitor: received ${JSON.stringify(start.slice(0, 40))}`);
      return;
    }
    let nl: number;
    while ((nl = this.buf.indexOf('\n')) >= 0) {
      const line = this.buf.slice(0, nl).trim();
      this.buf = this.buf.slice(nl + 1);
      if (line === '') continue;
      let msg: unknown;
      try {
        msg = JSON.parse(line);
      } catch {
        this.protocolError(sock, `unparseable message: ${JSON.stringify(line.slice(0, 80))}`);
        return;
      }
      if (!this.dispatch(sock, msg)) return;
      const rest = this.buf.trimStart();
      if (rest.length > 0 && rest[0] !== '{') {
        this.protocolError(sock, `not a QMP message: ${JSON.stringify(rest.slice(0, 40))}`);
        return;
      }
    }
    if (this.buf.length > MAX_LINE) this.protocolError(sock, `message longer than ${MAX_LINE} bytes without a newline`);
  }

  /** Route one message; false when it was a protocol error (the connection is gone). */
  private dispatch(sock: Socket, msg: unknown): boolean {
    if (msg === null || typeof msg !== 'object' || Array.isArray(msg)) {
      this.protocolError(sock, `message is not a JSON object: ${JSON.stringify(msg).slice(0, 80)}`);
      return false;
    }
    const m = msg as Record<string, unknown>;
    if (this.greetingWaiter) {
      if (!('QMP' in m)) {
        this.protocolError(sock, `expected the QMP greeting, got ${JSON.stringify(m).slice(0, 80)}`);
        return false;
      }
      const w = this.greetingWaiter;
      this.greetingWaiter = null;
      w.resolve(m.QMP as QmpGreeting);
      return true;
    }
    if (typeof m.event === 'string') {
      const ev: QmpEvent = {
        event: m.event,
        data: (m.data && typeof m.data === 'object' ? m.data : {}) as Record<string, unknown>,
        timestamp: (m.timestamp ?? { seconds: 0, microseconds: 0 }) as QmpEvent['timestamp'],
      };
      for (const l of [...this.listeners]) {
        try { l(ev); } catch (err) { console.error(`${this.peer}: event listener for ${ev.event} threw:`, err); }
      }
      return true;
    }
    if ('return' in m || 'error' in m) {
      const id = typeof m.id === 'string' ? m.id : undefined;
      const p = id !== undefined ? this.pending.get(id) : undefined;
      if (p && id !== undefined) {
        this.pending.delete(id);
        clearTimeout(p.timer);
        p.resolve(m);
        return true;
      }
      if (id !== undefined && this.abandoned.delete(id)) return true;
      // A reply we cannot place: without ids matching, every later reply would be suspect.
      this.protocolError(sock, `reply with unknown id ${JSON.stringify(m.id)}: ${JSON.stringify(m).slice(0, 120)}`);
      return false;
    }
    this.protocolError(sock, `unknown message: ${JSON.stringify(m).slice(0, 80)}`);
    return false;
  }

  private protocolError(sock: Socket, message: string): void {
    this.fail(sock, new QmpConnectionError('protocol', this.peer, message));
    sock.destroy();
  }

  /** Mark the connection dead once and reject everything that waits on it. */
  private fail(sock: Socket, err: QmpConnectionError): void {
    if (sock !== this.socket || this.closeError) return;
    this.closeError = err;
    if (this.greetingWaiter) {
      this.greetingWaiter.reject(err);
      this.greetingWaiter = null;
    }
    for (const [id, p] of this.pending) {
      clearTimeout(p.timer);
      this.pending.delete(id);
      p.reject(new QmpConnectionError(err.kind, this.peer, `${p.command} aborted: ${err.detail}`, { cause: err }));
    }
    for (const w of [...this.closeWaiters]) w(err);
  }
}
