// The client side of the NBD handshake (fixed newstyle), as an explicit state machine in the
// manner of libnbd: each state sends one option, reads its replies and names the next state.
// Every error names the peer, the state and the reply, e.g.
//   nbd+unix:///disk?socket=/x: GO: export "disk" not found (NBD_REP_ERR_UNKNOWN)
import { connect as tlsConnect, type ConnectionOptions } from 'node:tls';
import { isIP } from 'node:net';
import type { Duplex } from 'node:stream';
import { ByteReader, StreamClosedError } from './client-reader.ts';
import { TLS_POLICY } from './tls.ts';
import {
  BASE_ALLOCATION, CLIENT_FIXED_NEWSTYLE, CLIENT_NO_ZEROES, FLAG_FIXED_NEWSTYLE, FLAG_NO_ZEROES,
  IHAVEOPT, Info, MAX_PAYLOAD, NBDMAGIC, OPT_REPLY_MAGIC, Opt, Rep,
} from './constants.ts';

/** TLS settings for nbds:// targets; the server certificate is always verified. */
export interface NbdTlsOptions {
  /** The CA certificate(s), PEM, that must have signed the server's certificate (required: Node's public CAs are never trusted for NBD). */
  ca?: string | Buffer | Array<string | Buffer>;
  /** Client certificate and key, PEM, for servers that want one. */
  cert?: string | Buffer;
  key?: string | Buffer;
  /** The name the server certificate must carry (default: the TCP host, or "localhost"). */
  servername?: string;
}

export class NbdError extends Error {
  constructor(
    readonly peer: string,
    readonly state: string,
    message: string,
    /** The NBD_REP_ERR_* code when the server refused an option. */
    readonly reply?: number,
    options?: { cause?: unknown },
  ) {
    super(`${peer}: ${state}: ${message}`, options);
    this.name = 'NbdError';
  }
}

export interface BlockSizes {
  minimum: number;
  preferred: number;
  maximum: number;
}

/** What a finished GO/EXPORT_NAME handshake leaves for the transmission phase. */
export interface Negotiated {
  stream: Duplex;
  reader: ByteReader;
  exportName: string;
  size: number;
  flags: number;
  structured: boolean;
  /** The context id the server gave base:allocation, when negotiated. */
  baseAllocationId: number | null;
  blockSizes: BlockSizes;
}

export interface ExportInfo {
  name: string;
  size: number;
  flags: number;
  blockSizes: BlockSizes;
  baseAllocation: boolean;
}

export interface ExportListing {
  name: string;
  description: string;
}

export type HandshakeGoal =
  | { kind: 'go'; exportName: string; blockStatus: boolean }
  | { kind: 'info'; exportName: string }
  | { kind: 'list' };

type State =
  | 'GREETING' | 'STARTTLS' | 'STRUCTURED_REPLY' | 'SET_META_CONTEXT'
  | 'GO' | 'INFO' | 'EXPORT_NAME' | 'LIST' | 'ABORT' | 'DONE';

export interface HandshakeParams {
  stream: Duplex;
  peer: string;
  goal: HandshakeGoal;
  /** Upgrade with STARTTLS before any other option; refuse to go on without it. */
  tls?: NbdTlsOptions & { host?: string };
}

const REP_NAMES = new Map<number, string>(Object.entries(Rep).map(([k, v]) => [v, `NBD_REP_${k}`]));
const OPT_NAMES = new Map<number, string>(Object.entries(Opt).map(([k, v]) => [v, k]));
const MAX_OPTION_REPLY = 1024 * 1024;
/** The spec's default when the server states no maximum block size. */
const DEFAULT_MAX_BLOCK = MAX_PAYLOAD;

interface OptionReply {
  type: number;
  data: Buffer;
}

export class ClientHandshake {
  private state: State = 'GREETING';
  private stream: Duplex;
  private reader: ByteReader;
  private fixedNewstyle = false;
  private noZeroes = false;
  private structured = false;
  private baseAllocationId: number | null = null;
  private size = -1;
  private flags = 0;
  private blockSizes: BlockSizes = { minimum: 1, preferred: 4096, maximum: DEFAULT_MAX_BLOCK };
  private listing: ExportListing[] = [];

  constructor(private readonly p: HandshakeParams) {
    this.stream = p.stream;
    this.reader = new ByteReader(p.stream);
  }

  /** Run the state machine to its end. The stream is destroyed on failure. */
  async run(): Promise<{ negotiated?: Negotiated; info?: ExportInfo; list?: ExportListing[] }> {
    try {
      let steps = 0;
      while (this.state !== 'DONE') {
        if (++steps > 20) throw this.error('handshake did not finish (state machine loop)');
        this.state = await this.step(this.state);
      }
    } catch (e) {
      // After an error reply the option stream is still in step: say goodbye properly.
      if (e instanceof NbdError && e.reply !== undefined) {
        this.sendOption(Opt.ABORT, Buffer.alloc(0));
        const s = this.stream.end();
        setTimeout(() => s.destroy(), 1000).unref();
      } else {
        this.stream.destroy();
      }
      if (e instanceof NbdError) throw e;
      if (e instanceof StreamClosedError) {
        throw new NbdError(this.p.peer, this.state, `connection lost during the handshake: ${e.message}`, undefined, { cause: e });
      }
      throw new NbdError(this.p.peer, this.state, (e as Error).message ?? String(e), undefined, { cause: e });
    }
    const g = this.p.goal;
    if (g.kind === 'list') return { list: this.listing };
    if (g.kind === 'info') {
      return { info: { name: g.exportName, size: this.size, flags: this.flags, blockSizes: this.blockSizes, baseAllocation: this.baseAllocationId !== null } };
    }
    return {
      negotiated: {
        stream: this.stream, reader: this.reader, exportName: g.exportName, size: this.size, flags: this.flags,
        structured: this.structured, baseAllocationId: this.baseAllocationId, blockSizes: this.blockSizes,
      },
    };
  }

  private step(s: State): Promise<State> {
    switch (s) {
      case 'GREETING': return this.greeting();
      case 'STARTTLS': return this.startTls();
      case 'STRUCTURED_REPLY': return this.structuredReply();
      case 'SET_META_CONTEXT': return this.setMetaContext();
      case 'GO': return this.go(Opt.GO);
      case 'INFO': return this.go(Opt.INFO);
      case 'EXPORT_NAME': return this.exportName();
      case 'LIST': return this.list();
      case 'ABORT': return this.abort();
      case 'DONE': return Promise.resolve('DONE');
    }
  }

  // ---- states ----

  private async greeting(): Promise<State> {
    const hello = await this.reader.read(18);
    if (hello.readBigUInt64BE(0) !== NBDMAGIC) throw this.error('not an NBD server (bad greeting magic)');
    if (hello.readBigUInt64BE(8) !== IHAVEOPT) throw this.error('server speaks the oldstyle protocol, which is not supported');
    const serverFlags = hello.readUInt16BE(16);
    this.fixedNewstyle = (serverFlags & FLAG_FIXED_NEWSTYLE) !== 0;
    this.noZeroes = (serverFlags & FLAG_NO_ZEROES) !== 0;
    const clientFlags = (this.fixedNewstyle ? CLIENT_FIXED_NEWSTYLE : 0) | (this.noZeroes ? CLIENT_NO_ZEROES : 0);
    const reply = Buffer.alloc(4);
    reply.writeUInt32BE(clientFlags);
    this.stream.write(reply);
    if (this.p.tls) {
      if (!this.fixedNewstyle) throw this.error('TLS wanted, but the server does not speak fixed newstyle (no STARTTLS)');
      return 'STARTTLS';
    }
    return this.afterTls();
  }

  private afterTls(): State {
    const g = this.p.goal;
    if (g.kind === 'list') {
      if (!this.fixedNewstyle) throw this.error('server does not speak fixed newstyle: cannot list exports');
      return 'LIST';
    }
    // Without fixed newstyle, errors to unknown options are not defined: go straight in.
    if (!this.fixedNewstyle) {
      if (g.kind === 'info') throw this.error('server does not speak fixed newstyle: cannot query export info');
      return 'EXPORT_NAME';
    }
    return 'STRUCTURED_REPLY';
  }

  private async startTls(): Promise<State> {
    const r = await this.option(Opt.STARTTLS, Buffer.alloc(0));
    if (r.type !== Rep.ACK) throw this.refused(r, 'server refused TLS');
    const rest = this.reader.detach();
    if (rest.length) throw this.error('server sent data before the TLS handshake');
    const raw = this.stream;
    const tls = this.p.tls!;
    if (!tls.ca || (Array.isArray(tls.ca) && tls.ca.length === 0)) throw this.error('TLS needs the CA that signed the server certificate (tls.ca)');
    const servername = tls.servername ?? (tls.host && !isIP(tls.host) ? tls.host : 'localhost');
    const opts: ConnectionOptions = {
      socket: raw, ca: tls.ca, cert: tls.cert, key: tls.key, servername,
      rejectUnauthorized: true, ...TLS_POLICY,
    };
    if (tls.host && isIP(tls.host) && !tls.servername) {
      // An IP is checked against the certificate's IP SANs; SNI may not carry an IP.
      delete opts.servername;
      opts.host = tls.host;
    }
    const secure = tlsConnect(opts);
    raw.on('error', () => { /* reported through the TLS socket */ });
    this.stream = secure;
    this.reader = new ByteReader(secure);
    await new Promise<void>((resolve, reject) => {
      const fail = (e: Error) => reject(this.error(`TLS handshake failed: ${e.message}`, undefined, e));
      secure.once('secureConnect', () => { secure.off('error', fail); resolve(); });
      secure.once('error', fail);
    });
    return this.afterTls();
  }

  private async structuredReply(): Promise<State> {
    const r = await this.option(Opt.STRUCTURED_REPLY, Buffer.alloc(0));
    if (r.type === Rep.ACK) this.structured = true;
    else if (r.type === Rep.ERR_TLS_REQD) throw this.refused(r, 'server requires TLS (use nbds://)');
    else if (!(r.type & 0x80000000)) throw this.error(`unexpected reply ${repName(r.type)}`);
    const g = this.p.goal;
    if (this.structured && (g.kind === 'info' || (g.kind === 'go' && g.blockStatus))) return 'SET_META_CONTEXT';
    return g.kind === 'info' ? 'INFO' : 'GO';
  }

  private async setMetaContext(): Promise<State> {
    const g = this.p.goal as { exportName: string };
    const name = Buffer.from(g.exportName, 'utf8');
    const query = Buffer.from(BASE_ALLOCATION, 'utf8');
    const data = Buffer.alloc(4 + name.length + 4 + 4 + query.length);
    let o = data.writeUInt32BE(name.length, 0);
    o += name.copy(data, o);
    o = data.writeUInt32BE(1, o);
    o = data.writeUInt32BE(query.length, o);
    query.copy(data, o);
    this.sendOption(Opt.SET_META_CONTEXT, data);
    for (let i = 0; i < 1000; i++) {
      const r = await this.optionReply(Opt.SET_META_CONTEXT);
      if (r.type === Rep.ACK) return this.p.goal.kind === 'info' ? 'INFO' : 'GO';
      if (r.type === Rep.META_CONTEXT) {
        if (r.data.length < 4) throw this.error('short NBD_REP_META_CONTEXT reply');
        if (r.data.subarray(4).toString('utf8') === BASE_ALLOCATION) this.baseAllocationId = r.data.readUInt32BE(0);
        continue;
      }
      if (r.type === Rep.ERR_TLS_REQD) throw this.refused(r, 'server requires TLS (use nbds://)');
      // No block status for us; not fatal. An unknown export is reported by GO/INFO itself.
      if (r.type & 0x80000000) return this.p.goal.kind === 'info' ? 'INFO' : 'GO';
      throw this.error(`unexpected reply ${repName(r.type)}`);
    }
    throw this.error('too many replies');
  }

  /** GO (enter transmission) or INFO (just ask); both carry INFO requests for block sizes. */
  private async go(opt: number): Promise<State> {
    const g = this.p.goal as { exportName: string };
    const name = Buffer.from(g.exportName, 'utf8');
    const data = Buffer.alloc(4 + name.length + 2 + 2);
    let o = data.writeUInt32BE(name.length, 0);
    o += name.copy(data, o);
    o = data.writeUInt16BE(1, o);
    data.writeUInt16BE(Info.BLOCK_SIZE, o);
    this.sendOption(opt, data);
    for (let i = 0; i < 1000; i++) {
      const r = await this.optionReply(opt);
      if (r.type === Rep.INFO) {
        this.readInfo(r.data);
        continue;
      }
      if (r.type === Rep.ACK) {
        if (this.size < 0) throw this.error('server acknowledged without NBD_INFO_EXPORT');
        return opt === Opt.GO ? 'DONE' : 'ABORT';
      }
      if (r.type === Rep.ERR_UNSUP && opt === Opt.GO) return 'EXPORT_NAME';
      if (r.type === Rep.ERR_UNKNOWN) throw this.refused(r, `export "${g.exportName}" not found`);
      if (r.type === Rep.ERR_TLS_REQD) throw this.refused(r, 'server requires TLS (use nbds://)');
      if (r.type === Rep.ERR_UNSUP) throw this.refused(r, 'server does not support NBD_OPT_INFO');
      if (r.type & 0x80000000) throw this.refused(r, `export "${g.exportName}" refused`);
      throw this.error(`unexpected reply ${repName(r.type)}`);
    }
    throw this.error('too many replies');
  }

  private readInfo(d: Buffer): void {
    if (d.length < 2) throw this.error('short NBD_REP_INFO reply');
    const type = d.readUInt16BE(0);
    if (type === Info.EXPORT) {
      if (d.length < 12) throw this.error('short NBD_INFO_EXPORT');
      this.size = this.safeSize(d.readBigUInt64BE(2));
      this.flags = d.readUInt16BE(10);
    } else if (type === Info.BLOCK_SIZE) {
      if (d.length < 14) throw this.error('short NBD_INFO_BLOCK_SIZE');
      const minimum = d.readUInt32BE(2), preferred = d.readUInt32BE(6), maximum = d.readUInt32BE(10);
      if (minimum < 1 || maximum < minimum) throw this.error(`nonsense block sizes ${minimum}/${preferred}/${maximum}`);
      // We never send more than the spec's 32 MiB in one request, whatever the server allows.
      this.blockSizes = { minimum, preferred, maximum: Math.min(maximum, MAX_PAYLOAD) };
    }
    // NAME, DESCRIPTION and unknown types are informational.
  }

  /** The old way in: no error reply exists; a refusing server just closes the connection. */
  private async exportName(): Promise<State> {
    const g = this.p.goal as { exportName: string };
    this.sendOption(Opt.EXPORT_NAME, Buffer.from(g.exportName, 'utf8'));
    let d: Buffer;
    try {
      d = await this.reader.read(this.noZeroes ? 10 : 134);
    } catch (e) {
      if (e instanceof StreamClosedError) {
        throw this.error(`server closed the connection: export "${g.exportName}" not found or refused`, undefined, e);
      }
      throw e;
    }
    this.size = this.safeSize(d.readBigUInt64BE(0));
    this.flags = d.readUInt16BE(8);
    // Structured replies and meta contexts were negotiated per option; they survive EXPORT_NAME.
    return 'DONE';
  }

  private async list(): Promise<State> {
    this.sendOption(Opt.LIST, Buffer.alloc(0));
    for (let i = 0; i < 100000; i++) {
      const r = await this.optionReply(Opt.LIST);
      if (r.type === Rep.ACK) return 'ABORT';
      if (r.type === Rep.SERVER) {
        if (r.data.length < 4) throw this.error('short NBD_REP_SERVER reply');
        const n = r.data.readUInt32BE(0);
        if (4 + n > r.data.length) throw this.error('bad name length in NBD_REP_SERVER');
        this.listing.push({ name: r.data.toString('utf8', 4, 4 + n), description: r.data.toString('utf8', 4 + n) });
        continue;
      }
      if (r.type === Rep.ERR_TLS_REQD) throw this.refused(r, 'server requires TLS (use nbds://)');
      if (r.type & 0x80000000) throw this.refused(r, 'server refused to list exports');
      throw this.error(`unexpected reply ${repName(r.type)}`);
    }
    throw this.error('too many replies');
  }

  /** Polite end of a LIST/INFO session: ABORT, wait briefly for the ACK, close. */
  private async abort(): Promise<State> {
    this.sendOption(Opt.ABORT, Buffer.alloc(0));
    // The server may answer with an ACK or just close; either is fine, so don't wait for long.
    await Promise.race([
      this.optionReply(Opt.ABORT).catch(() => undefined),
      new Promise((r) => setTimeout(r, 1000).unref()),
    ]);
    this.stream.destroy();
    return 'DONE';
  }

  // ---- option framing ----

  private sendOption(opt: number, data: Buffer): void {
    const h = Buffer.alloc(16);
    h.writeBigUInt64BE(IHAVEOPT, 0);
    h.writeUInt32BE(opt, 8);
    h.writeUInt32BE(data.length, 12);
    this.stream.write(data.length ? Buffer.concat([h, data]) : h);
  }

  private async optionReply(opt: number): Promise<OptionReply> {
    const h = await this.reader.read(20);
    if (h.readBigUInt64BE(0) !== OPT_REPLY_MAGIC) throw this.error('bad option reply magic');
    const got = h.readUInt32BE(8);
    if (got !== opt) throw this.error(`reply is for option ${OPT_NAMES.get(got) ?? got}, not ${OPT_NAMES.get(opt) ?? opt}`);
    const type = h.readUInt32BE(12);
    const len = h.readUInt32BE(16);
    if (len > MAX_OPTION_REPLY) throw this.error(`option reply of ${len} bytes is too large`);
    return { type, data: await this.reader.read(len) };
  }

  private async option(opt: number, data: Buffer): Promise<OptionReply> {
    this.sendOption(opt, data);
    return this.optionReply(opt);
  }

  private safeSize(v: bigint): number {
    if (v > BigInt(Number.MAX_SAFE_INTEGER)) throw this.error(`export size ${v} is too large`);
    return Number(v);
  }

  private error(message: string, reply?: number, cause?: unknown): NbdError {
    return new NbdError(this.p.peer, this.state, message, reply, cause ? { cause } : undefined);
  }

  /** An error reply: our words, the reply's name, and the server's own message if it sent one. */
  private refused(r: OptionReply, message: string): NbdError {
    const said = r.data.length && r.type & 0x80000000 ? `; server said: "${r.data.toString('utf8')}"` : '';
    return this.error(`${message} (${repName(r.type)})${said}`, r.type);
  }
}

function repName(type: number): string {
  return REP_NAMES.get(type) ?? `reply 0x${type.toString(16)}`;
}

