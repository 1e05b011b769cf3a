// vmshift's NBD server: serves block devices to any NBD client (QEMU, qemu-img, nbdcopy,
// nbdinfo, fio, the Linux kernel) over unix sockets, TCP (with optional TLS), or any duplex
// stream such as an SSH channel. One connection's failure never affects the others.
//
// A connection goes through ServerHandshake (server-handshake.ts, option haggling) and then
// Transmission (server-transmission.ts, pipelined requests); Wire (server-io.ts) carries the
// bytes for both.
import { createServer, type Server, type Socket } from 'node:net';
import { unlinkSync } from 'node:fs';
import type { Duplex } from 'node:stream';
import { silentLogger, type NbdLogger as Logger } from './logger.ts';
import { ServerHandshake, type ExportSpec } from './server-handshake.ts';
import { ConnectionClosed, ProtocolViolation, Wire } from './server-io.ts';
import { DEFAULT_LIMITS, Transmission, type ServerCounters, type TransmissionLimits } from './server-transmission.ts';
import { serverTls, type ServerTls, type TlsServerConfig } from './tls.ts';
import { BufferPool } from './buffer-pool.ts';
import { listenUnixPrivate, removeStaleSocket, startListening } from '../util/unix-listen.ts';
import { ByteBudget } from './server-budget.ts';

export type { ExportSpec } from './server-handshake.ts';
export type { TlsServerConfig } from './tls.ts';

export interface NbdServerOptions {
  exports: ExportSpec[];
  tls?: TlsServerConfig;
  logger?: Logger;
  /** Per-connection bounds on pipelined requests (defaults in server-transmission.ts). */
  limits?: Partial<TransmissionLimits>;
  /** A client that has not picked an export after this long is disconnected. */
  handshakeTimeoutMs?: number;
  /** Payload buffers shared by every connection (default: a BufferPool of its own). */
  bufferPool?: BufferPool;
  /** Payload bytes all connections together may hold (server-budget.ts; default 64 MiB). */
  maxBytes?: number;
  /** Connections served at once; more are closed as they arrive (default 16). */
  maxConnections?: number;
}

export const DEFAULT_MAX_BYTES = 64 * 1024 * 1024;
export const DEFAULT_MAX_CONNECTIONS = 16;

export interface NbdServerStats {
  /** Connections open now. */
  clients: number;
  connectionsTotal: number;
  /** Bytes clients read from the exports. */
  bytesRead: number;
  /** Bytes clients wrote to the exports. */
  bytesWritten: number;
  requests: number;
  /** Requests answered with an error. */
  errors: number;
  /** READ payload bytes sent by sendfile from the page cache (server-sendfile.ts). */
  sendfileBytes: number;
  /** Of those replies, the ones finished through the stream because the socket was full. */
  sendfileRest: number;
  /** Connections closed on arrival because maxConnections were open. */
  refused: number;
  /** Payload bytes held now (see server-budget.ts). */
  heldBytes: number;
}

interface Connection {
  wire: Wire;
  transmission: Transmission | null;
  done: Promise<void>;
}

export class NbdServer {
  private readonly exports = new Map<string, ExportSpec>();
  private readonly tls?: ServerTls;
  private readonly log: Logger;
  private readonly limits: TransmissionLimits;
  private readonly pool: BufferPool;
  private readonly budget: ByteBudget;
  private readonly maxConnections: number;
  private refused = 0;
  private readonly handshakeTimeoutMs: number;
  private readonly listeners: Array<{ server: Server; unixPath?: string }> = [];
  private readonly connections = new Set<Connection>();
  private readonly counters: ServerCounters = { bytesRead: 0, bytesWritten: 0, requests: 0, errors: 0, sendfileBytes: 0, sendfileRest: 0 };
  private connectionsTotal = 0;
  private closing = false;

  constructor(opts: NbdServerOptions) {
    for (const exp of opts.exports) {
      if (this.exports.has(exp.name)) throw new Error(`nbd server: export ${JSON.stringify(exp.name)} is defined twice`);
      if (Buffer.byteLength(exp.name) > 4096) throw new Error(`nbd server: export name longer than 4096 bytes`);
      this.exports.set(exp.name, exp);
    }
    if (opts.tls) this.tls = serverTls(opts.tls);
    this.log = opts.logger ?? silentLogger;
    this.limits = { ...DEFAULT_LIMITS, ...opts.limits };
    this.pool = opts.bufferPool ?? new BufferPool();
    this.budget = new ByteBudget(opts.maxBytes ?? DEFAULT_MAX_BYTES);
    this.maxConnections = opts.maxConnections ?? DEFAULT_MAX_CONNECTIONS;
    if (!Number.isSafeInteger(this.maxConnections) || this.maxConnections < 1) throw new Error(`nbd server: maxConnections ${this.maxConnections} must be a positive integer`);
    this.handshakeTimeoutMs = opts.handshakeTimeoutMs ?? 30_000;
  }

  /** Listen on a unix socket born with `mode` (no window for others); a stale socket file is removed first. */
  async listenUnix(path: string, mode = 0o600): Promise<void> {
    await removeStaleSocket(path, 'nbd server');
    const server = this.newListener();
    await listenUnixPrivate(server, path, mode);
    this.listeners.push({ server, unixPath: path });
    this.log.info({ path }, 'nbd server listening on unix socket');
  }

  /** Listen on TCP; returns the bound port (pass 0 for an ephemeral one). */
  async listenTcp(host: string, port: number): Promise<number> {
    const server = this.newListener();
    await startListening(server, () => server.listen(port, host));
    this.listeners.push({ server });
    const bound = (server.address() as { port: number }).port;
    this.log.info({ host, port: bound }, 'nbd server listening on tcp');
    return bound;
  }

  /** Serve one client on any duplex stream; resolves when the session is over. */
  handleConnection(stream: Duplex, peer = 'stream'): Promise<void> {
    return this.serveWire(stream, () => new Wire(stream), peer);
  }

  private serveWire(stream: Duplex, wire: () => Wire, peer: string): Promise<void> {
    if (this.closing) {
      stream.destroy();
      return Promise.resolve();
    }
    if (this.connections.size >= this.maxConnections) {
      this.refused++;
      this.log.warn({ peer, open: this.connections.size }, `nbd server: refusing a connection: ${this.maxConnections} are open (maxConnections)`);
      stream.destroy();
      return Promise.resolve();
    }
    const id = ++this.connectionsTotal;
    const log = this.log.child({ conn: id, peer });
    const conn: Connection = { wire: wire(), transmission: null, done: Promise.resolve() };
    this.connections.add(conn);
    conn.done = this.serve(conn, log).finally(() => {
      this.connections.delete(conn);
      log.debug('nbd connection closed');
    });
    return conn.done;
  }

  stats(): NbdServerStats {
    return { clients: this.connections.size, connectionsTotal: this.connectionsTotal, ...this.counters, refused: this.refused, heldBytes: this.budget.held };
  }

  /** Stop listening, let requests in flight finish, then end every session. */
  async close(): Promise<void> {
    this.closing = true;
    const stopped = this.listeners.map(({ server }) => new Promise<void>((resolve) => server.close(() => resolve())));
    for (const conn of this.connections) {
      if (conn.transmission) conn.transmission.shutdown();
      else conn.wire.end();
    }
    await Promise.all([...this.connections].map((c) => c.done));
    await Promise.all(stopped);
    for (const { unixPath } of this.listeners) {
      if (unixPath) try { unlinkSync(unixPath); } catch { /* already gone */ }
    }
    this.listeners.length = 0;
  }

  private async serve(conn: Connection, log: Logger): Promise<void> {
    const { wire } = conn;
    const timer = setTimeout(() => {
      log.warn('nbd: handshake timed out');
      wire.destroy();
    }, this.handshakeTimeoutMs);
    timer.unref();
    try {
      const neg = await new ServerHandshake(wire, { exports: this.exports, tls: this.tls, log }).run();
      clearTimeout(timer);
      if (!neg || this.closing) {
        wire.end();
        await wire.whenClosed;
        return;
      }
      log.debug({ export: neg.export.name, structured: neg.structured, flags: neg.flags }, 'nbd: transmission');
      conn.transmission = new Transmission(wire, neg, this.counters, log, this.limits, this.pool, this.budget);
      await conn.transmission.start();
    } catch (err) {
      clearTimeout(timer);
      if (err instanceof ConnectionClosed) {
        log.debug('nbd: client went away during the handshake');
      } else if (err instanceof ProtocolViolation) {
        log.warn({ reason: err.message }, 'nbd: refusing client');
        wire.end(); // lets an error reply already written reach the client
      } else {
        // Resets and broken pipes are clients leaving: ordinary, not worth a warning.
        const code = (err as { code?: string }).code;
        if (code === 'ECONNRESET' || code === 'EPIPE') log.debug({ err }, 'nbd: client went away during the handshake');
        else log.warn({ err }, 'nbd: connection failed');
        wire.destroy();
      }
      await wire.whenClosed;
    }
  }

  private newListener(): Server {
    // Without TLS, sockets are read in the Wire's direct mode (Wire.adopt; paused until adopted).
    // TLS wraps the socket's handle itself after STARTTLS, so those keep Node's own reads.
    const direct = !this.tls;
    const server = createServer({ pauseOnConnect: direct }, (socket: Socket) => {
      socket.setNoDelay(true);
      const peer = socket.remoteAddress ? `${socket.remoteAddress}:${socket.remotePort}` : 'unix';
      const adopted = direct ? Wire.adopt(socket) : null;
      if (adopted) void this.serveWire(adopted.stream, () => adopted, peer);
      else {
        if (direct) socket.resume();
        void this.handleConnection(socket, peer);
      }
    });
    server.on('error', (err) => this.log.error({ err }, 'nbd server: listener error'));
    return server;
  }
}
