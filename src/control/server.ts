// A control-socket server: JSON lines over a unix socket created with mode 0600 (root only,
// or the shim's owner). Methods are registered by name; a handler may also stream events to
// its caller through `ctx.emit` until the caller disconnects.
import { createServer, type Server, type Socket } from 'node:net';
import { chmod, unlink } from 'node:fs/promises';
import { ControlError, LineSplitter, type ControlReply, type ControlRequest } from './protocol.ts';

export interface CallContext {
  /** Send an event line to this caller (no-op once it has gone). */
  emit(event: string, data: unknown): void;
  /** Resolves when the caller disconnects. */
  closed: Promise<void>;
}

export type Handler = (params: Record<string, unknown>, ctx: CallContext) => Promise<unknown> | unknown;

export class ControlServer {
  private readonly handlers = new Map<string, Handler>();
  private server?: Server;
  private readonly sockets = new Set<Socket>();

  on(method: string, handler: Handler): this {
    this.handlers.set(method, handler);
    return this;
  }

  async listen(path: string, mode = 0o600): Promise<void> {
    await unlink(path).catch(() => {});
    const server = createServer((s) => this.accept(s));
    this.server = server;
    await new Promise<void>((resolve, reject) => {
      server.once('error', reject);
      server.listen(path, () => resolve());
    });
    await chmod(path, mode);
  }

  async close(): Promise<void> {
    for (const s of this.sockets) s.destroy();
    await new Promise<void>((resolve) => (this.server ? this.server.close(() => resolve()) : resolve()));
  }

  private accept(sock: Socket): void {
    this.sockets.add(sock);
    let resolveClosed!: () => void;
    const closed = new Promise<void>((r) => (resolveClosed = r));
    const send = (msg: ControlReply) => {
      if (!sock.destroyed) sock.write(JSON.stringify(msg) + '\n');
    };
    const ctx: CallContext = { emit: (event, data) => send({ event, data }), closed };
    const splitter = new LineSplitter((line) => void this.dispatch(line, ctx, send));
    sock.on('data', (chunk) => {
      try {
        splitter.push(chunk);
      } catch (e) {
        send({ id: 0, error: { code: 'protocol', message: (e as Error).message } });
        sock.end();
      }
    });
    sock.on('error', () => {});
    sock.on('close', () => {
      this.sockets.delete(sock);
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
