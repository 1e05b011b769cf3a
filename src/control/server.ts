// A control-socket server: JSON lines over a unix socket that is private from creation (mode
// 0600 by default: root only, or the shim's owner; see src/util/unix-listen.ts). Methods are
// registered by name; a handler may also stream events to its caller through `ctx.emit`
// until the caller disconnects.
//
// Only the socket's owner can connect (the kernel checks the socket file's mode on connect;
// Node exposes no SO_PEERCRED), but even that caller must not be able to grow the daemon
// without bound, so every connection is held to limits:
//   - a line is at most MAX_LINE bytes (protocol.ts);
//   - at most `maxInFlight` requests run at once per connection, and while they do, or while
//     the socket's write buffer is full (a client that sends but does not read), nothing more
//     is read from it: requests wait in the kernel's buffer and then in the client's;
//   - events beyond `maxQueuedEventBytes` of unsent output are dropped (progress is superseded
//     by the next one; the final answer is a reply, never dropped);
//   - a connection with nothing in flight and no traffic for `idleTimeoutMs` is closed (a
//     watch is a request in flight: it stays open however long the job runs);
//   - at most `maxConnections` at once; one more gets a `busy` error and is closed.
import { createServer, type Server, type Socket } from 'node:net';
import { ControlError, LineSplitter, type ControlReply, type ControlRequest } from './protocol.ts';
import { checkSocketDir, listenUnixPrivate, removeStaleSocket } from '../util/unix-listen.ts';

export interface CallContext {
  /** Send an event line to this caller (no-op once it has gone). */
  emit(event: string, data: unknown): void;
  /** Resolves when the caller disconnects. */
  closed: Promise<void>;
}

export type Handler = (params: Record<string, unknown>, ctx: CallContext) => Promise<unknown> | unknown;

export interface ControlLimits {
  maxConnections: number;
  maxInFlight: number;
  idleTimeoutMs: number;
  maxQueuedEventBytes: number;
}

export const DEFAULT_CONTROL_LIMITS: ControlLimits = {
  maxConnections: 128,
  maxInFlight: 16,
  idleTimeoutMs: 60_000,
  maxQueuedEventBytes: 256 * 1024,
};

export class ControlServer {
  private readonly handlers = new Map<string, Handler>();
  private server?: Server;
  private readonly sockets = new Set<Socket>();
  readonly limits: ControlLimits;

  constructor(limits: Partial<ControlLimits> = {}) {
    this.limits = { ...DEFAULT_CONTROL_LIMITS, ...limits };
  }

  on(method: string, handler: Handler): this {
    this.handlers.set(method, handler);
    return this;
  }

  /** Listen on `path`, born with `mode`, in a directory only root or we control; a stale socket is replaced, a live one refused. */
  async listen(path: string, mode = 0o600): Promise<void> {
    checkSocketDir(path, 'control server');
    await removeStaleSocket(path, 'control server');
    const server = createServer((s) => this.accept(s));
    this.server = server;
    await listenUnixPrivate(server, path, mode);
  }

  /** Connections open now. */
  get connections(): number {
    return this.sockets.size;
  }

  async close(): Promise<void> {
    for (const s of this.sockets) s.destroy();
    await new Promise<void>((resolve) => (this.server ? this.server.close(() => resolve()) : resolve()));
  }

  private accept(sock: Socket): void {
    sock.on('error', () => {});
    if (this.sockets.size >= this.limits.maxConnections) {
      sock.end(JSON.stringify({ id: 0, error: { code: 'busy', message: `too many connections (${this.limits.maxConnections}); try again` } }) + '\n');
      sock.setTimeout(1000, () => sock.destroy());
      return;
    }
    this.sockets.add(sock);
    let resolveClosed!: () => void;
    const closed = new Promise<void>((r) => (resolveClosed = r));
    const send = (msg: ControlReply) => {
      if (!sock.destroyed && sock.writable) sock.write(JSON.stringify(msg) + '\n');
    };
    const ctx: CallContext = {
      emit: (event, data) => {
        if (sock.writableLength <= this.limits.maxQueuedEventBytes) send({ event, data });
      },
      closed,
    };

    const queue: string[] = []; // lines read but not yet dispatched: at most one chunk's worth
    let inFlight = 0;
    const pump = () => {
      while (queue.length && inFlight < this.limits.maxInFlight && !sock.writableNeedDrain) {
        inFlight++;
        void this.dispatch(queue.shift()!, ctx, send).finally(() => {
          inFlight--;
          pump();
        });
      }
      if (queue.length || inFlight >= this.limits.maxInFlight || sock.writableNeedDrain) sock.pause();
      else if (!sock.destroyed) sock.resume();
    };
    const splitter = new LineSplitter((line) => queue.push(line));
    sock.on('data', (chunk) => {
      try {
        splitter.push(chunk);
      } catch (e) {
        queue.length = 0;
        send({ id: 0, error: { code: 'protocol', message: (e as Error).message } });
        sock.end();
        sock.pause();
        return;
      }
      pump();
    });
    sock.on('drain', pump);
    // Queued lines do not keep a connection open: they wait only for a client that stopped reading.
    sock.setTimeout(this.limits.idleTimeoutMs, () => {
      if (inFlight === 0) sock.destroy();
    });
    sock.on('close', () => {
      this.sockets.delete(sock);
      queue.length = 0;
      resolveClosed();
    });
  }

  private async dispatch(line: string, ctx: CallContext, send: (m: ControlReply) => void): Promise<void> {
    let req: ControlRequest;
    try {
      req = JSON.parse(line);
      if (typeof req !== 'object' || req === null || typeof req.method !== 'string') throw new Error('not a request');
    } catch {
      send({ id: 0, error: { code: 'protocol', message: 'each line must be a JSON object {id, method, params}' } });
      return;
    }
    const id = req.id ?? 0;
    const handler = this.handlers.get(req.method);
    if (!handler) {
      send({ id, error: { code: 'unknown-method', message: `unknown method "${req.method}"` } });
      return;
    }
    try {
      const params = req.params && typeof req.params === 'object' ? req.params : {};
      const result = await handler(params, ctx);
      send({ id, result: result ?? null });
    } catch (e) {
      const code = e instanceof ControlError ? e.code : 'failed';
      send({ id, error: { code, message: (e as Error).message ?? String(e) } });
    }
  }
}
