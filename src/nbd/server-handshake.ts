// The server side of the fixed newstyle handshake: greeting, client flags, then option
// haggling until the client picks an export (NBD_OPT_GO / NBD_OPT_EXPORT_NAME) or leaves.
// States: GREETING -> OPTIONS (-> STARTTLS -> OPTIONS over TLS) -> TRANSMISSION | ENDED.
import type { NbdLogger as Logger } from './logger.ts';
import type { BlockDevice } from '../block/device.ts';
import {
  BASE_ALLOCATION, CLIENT_FIXED_NEWSTYLE, CLIENT_NO_ZEROES, FLAG_FIXED_NEWSTYLE, FLAG_NO_ZEROES, IHAVEOPT,
  Info, MAX_OPTION_LENGTH, MAX_PAYLOAD, NBDMAGIC, OPT_REPLY_MAGIC, Opt, Rep, TF,
} from './constants.ts';
import { ProtocolViolation, type Wire } from './server-io.ts';
import { acceptTls, type ServerTls } from './tls.ts';

export interface ExportSpec {
  name: string;
  description?: string;
  device: BlockDevice;
}

/** What the handshake settled on; the transmission phase runs with exactly this. */
export interface Negotiated {
  export: ExportSpec;
  structured: boolean;
  /** Context id of base:allocation, or 0 when the client did not select it. */
  allocationContext: number;
  flags: number;
}

export interface HandshakeEnv {
  exports: Map<string, ExportSpec>;
  tls?: ServerTls;
  log: Logger;
}

const ALLOCATION_ID = 1;
const MAX_OPTIONS = 1000; // a client still haggling after this many options is not going anywhere
const MAX_STRING = 4096; // the spec's limit for names and queries
const ZEROES = Buffer.alloc(124);
const OPT_NAMES = new Map<number, string>(Object.entries(Opt).map(([k, v]) => [v, k]));

export function optName(opt: number): string {
  return OPT_NAMES.get(opt) ?? `option ${opt}`;
}

/** Transmission flags for a device, from its capabilities. */
export function transmissionFlags(dev: BlockDevice, structured: boolean): number {
  const c = dev.caps;
  let f = TF.HAS_FLAGS;
  if (c.readOnly) f |= TF.READ_ONLY;
  if (c.canFlush) f |= TF.SEND_FLUSH;
  if (c.canFua) f |= TF.SEND_FUA;
  if (c.canTrim && !c.readOnly) f |= TF.SEND_TRIM;
  if (c.canZero && !c.readOnly) f |= TF.SEND_WRITE_ZEROES;
  if (c.canZero && c.canFastZero && !c.readOnly) f |= TF.SEND_FAST_ZERO;
  if (c.canCache) f |= TF.SEND_CACHE;
  if (c.canMultiConn) f |= TF.CAN_MULTI_CONN;
  if (structured) f |= TF.SEND_DF;
  return f;
}

export class ServerHandshake {
  private tlsActive = false;
  private structured = false;
  private noZeroes = false;
  /** SET_META_CONTEXT applies to the export it named; GO for another export drops it. */
  private meta: { exportName: string; allocation: boolean } | null = null;

  constructor(private wire: Wire, private env: HandshakeEnv) {}

  /** Resolves with the negotiated export, or null when the client aborted or was refused. */
  async run(): Promise<Negotiated | null> {
    const greeting = Buffer.alloc(18);
    greeting.writeBigUInt64BE(NBDMAGIC, 0);
    greeting.writeBigUInt64BE(IHAVEOPT, 8);
    greeting.writeUInt16BE(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES, 16);
    this.wire.write(greeting);

    const clientFlags = (await this.wire.readExact(4)).readUInt32BE(0);
    if (clientFlags & ~(CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES)) throw new ProtocolViolation(`unknown client flags 0x${clientFlags.toString(16)}`);
    if (!(clientFlags & CLIENT_FIXED_NEWSTYLE)) throw new ProtocolViolation('client does not speak fixed newstyle');
    this.noZeroes = (clientFlags & CLIENT_NO_ZEROES) !== 0;

    for (let n = 0; n < MAX_OPTIONS; n++) {
      const header = await this.wire.readExact(16);
      if (header.readBigUInt64BE(0) !== IHAVEOPT) throw new ProtocolViolation(`bad option magic 0x${header.readBigUInt64BE(0).toString(16)}`);
      const opt = header.readUInt32BE(8);
      const length = header.readUInt32BE(12);
      if (length > MAX_OPTION_LENGTH) {
        // We will not read that much, so the stream cannot be resynchronised: reply, then end.
        await this.reply(opt, Rep.ERR_TOO_BIG, `${optName(opt)}: option length ${length} exceeds ${MAX_OPTION_LENGTH}`);
        throw new ProtocolViolation(`${optName(opt)} with length ${length}`);
      }
      const data = length ? await this.wire.readExact(length) : Buffer.alloc(0);
      this.env.log.debug({ option: optName(opt), length }, 'nbd option');
      const done = await this.option(opt, data);
      if (done !== undefined) return done;
    }
    throw new ProtocolViolation(`more than ${MAX_OPTIONS} options`);
  }

  /** Handle one option; returns the result when haggling is over, undefined to go on. */
  private async option(opt: number, data: Buffer): Promise<Negotiated | null | undefined> {
    if (this.env.tls?.config.required && !this.tlsActive && opt !== Opt.STARTTLS && opt !== Opt.ABORT) {
      if (opt === Opt.EXPORT_NAME) throw new ProtocolViolation('NBD_OPT_EXPORT_NAME before STARTTLS on a TLS-only server');
      return this.reply(opt, Rep.ERR_TLS_REQD, `${optName(opt)}: TLS is required, send NBD_OPT_STARTTLS first`);
    }
    switch (opt) {
      case Opt.EXPORT_NAME: return this.exportName(data);
      case Opt.ABORT:
        await this.reply(opt, Rep.ACK);
        return null;
      case Opt.LIST: return this.list(data);
      case Opt.STARTTLS: return this.startTls(data);
      case Opt.INFO:
      case Opt.GO: return this.infoOrGo(opt, data);
      case Opt.STRUCTURED_REPLY:
        if (data.length) return this.reply(opt, Rep.ERR_INVALID, 'NBD_OPT_STRUCTURED_REPLY takes no data');
        if (this.structured) return this.reply(opt, Rep.ERR_INVALID, 'structured replies already negotiated');
        this.structured = true;
        return this.reply(opt, Rep.ACK);
      case Opt.LIST_META_CONTEXT:
      case Opt.SET_META_CONTEXT: return this.metaContext(opt, data);
      default:
        return this.reply(opt, Rep.ERR_UNSUP, `${optName(opt)} is not supported`);
    }
  }

  private async exportName(data: Buffer): Promise<Negotiated> {
    const name = data.toString('utf8');
    const exp = this.lookup(name);
    // This option cannot fail politely: an unknown export ends the session.
    if (!exp) throw new ProtocolViolation(`NBD_OPT_EXPORT_NAME: unknown export ${JSON.stringify(name)}`);
    const neg = this.negotiated(exp);
    const reply = Buffer.alloc(10);
    reply.writeBigUInt64BE(BigInt(exp.device.size), 0);
    reply.writeUInt16BE(neg.flags, 8);
    this.wire.write(reply);
    if (!this.noZeroes) this.wire.write(ZEROES);
    return neg;
  }

  private async list(data: Buffer): Promise<undefined> {
    if (data.length) return this.reply(Opt.LIST, Rep.ERR_INVALID, 'NBD_OPT_LIST takes no data');
    for (const exp of this.env.exports.values()) {
      const name = Buffer.from(exp.name);
      const desc = Buffer.from(exp.description ?? '');
      const payload = Buffer.alloc(4 + name.length + desc.length);
      payload.writeUInt32BE(name.length, 0);
      name.copy(payload, 4);
      desc.copy(payload, 4 + name.length);
      await this.reply(Opt.LIST, Rep.SERVER, payload);
    }
    return this.reply(Opt.LIST, Rep.ACK);
  }

  private async startTls(data: Buffer): Promise<undefined> {
    const tls = this.env.tls;
    if (data.length) return this.reply(Opt.STARTTLS, Rep.ERR_INVALID, 'NBD_OPT_STARTTLS takes no data');
    if (!tls) return this.reply(Opt.STARTTLS, Rep.ERR_POLICY, 'TLS is not configured on this server');
    if (this.tlsActive) return this.reply(Opt.STARTTLS, Rep.ERR_INVALID, 'TLS is already active');
    // The client must wait for our ACK before its ClientHello; anything queued now is plaintext
    // it should not have sent.
    if (this.wire.available) throw new ProtocolViolation('data sent after NBD_OPT_STARTTLS before its reply');
    await this.reply(Opt.STARTTLS, Rep.ACK);
    await new Promise<void>((resolve) => this.wire.stream.write(Buffer.alloc(0), () => resolve()));
    let secured!: Promise<void>;
    this.wire.swap((raw) => {
      const t = acceptTls(raw, tls);
      secured = t.secured;
      return t.socket;
    });
    await secured;
    this.tlsActive = true;
    // Nothing negotiated in plaintext survives the upgrade.
    this.structured = false;
    this.meta = null;
    this.env.log.debug('nbd: TLS established');
    return undefined;
  }

  private async infoOrGo(opt: number, data: Buffer): Promise<Negotiated | undefined> {
    // Data: u32 name length, name, u16 number of info requests, u16 each.
    if (data.length < 6) return this.reply(opt, Rep.ERR_INVALID, `${optName(opt)}: option too short`);
    const nameLen = data.readUInt32BE(0);
    if (nameLen > MAX_STRING || 4 + nameLen + 2 > data.length) return this.reply(opt, Rep.ERR_INVALID, `${optName(opt)}: bad name length ${nameLen}`);
    const name = data.toString('utf8', 4, 4 + nameLen);
    const count = data.readUInt16BE(4 + nameLen);
    if (data.length !== 4 + nameLen + 2 + 2 * count) return this.reply(opt, Rep.ERR_INVALID, `${optName(opt)}: ${count} info requests do not match the option length`);
    const wanted = new Set<number>();
    for (let i = 0; i < count; i++) wanted.add(data.readUInt16BE(4 + nameLen + 2 + 2 * i));

    const exp = this.lookup(name);
    if (!exp) return this.reply(opt, Rep.ERR_UNKNOWN, `${optName(opt)}: unknown export ${JSON.stringify(name)}`);
    const neg = this.negotiated(exp);

    const info = Buffer.alloc(12);
    info.writeUInt16BE(Info.EXPORT, 0);
    info.writeBigUInt64BE(BigInt(exp.device.size), 2);
    info.writeUInt16BE(neg.flags, 10);
    await this.reply(opt, Rep.INFO, info);
    if (wanted.has(Info.NAME)) await this.reply(opt, Rep.INFO, infoString(Info.NAME, exp.name));
    if (wanted.has(Info.DESCRIPTION) && exp.description) await this.reply(opt, Rep.INFO, infoString(Info.DESCRIPTION, exp.description));
    // Always sent: min 1 means any alignment works, so clients that did not ask lose nothing.
    const bs = Buffer.alloc(14);
    bs.writeUInt16BE(Info.BLOCK_SIZE, 0);
    bs.writeUInt32BE(1, 2);
    bs.writeUInt32BE(4096, 6);
    bs.writeUInt32BE(MAX_PAYLOAD, 10);
    await this.reply(opt, Rep.INFO, bs);
    await this.reply(opt, Rep.ACK);
    return opt === Opt.GO ? neg : undefined;
  }

  private async metaContext(opt: number, data: Buffer): Promise<undefined> {
    const list = opt === Opt.LIST_META_CONTEXT;
    if (!this.structured) return this.reply(opt, Rep.ERR_INVALID, `${optName(opt)}: negotiate structured replies first`);
    const req = parseMetaRequest(data);
    if (!req) return this.reply(opt, Rep.ERR_INVALID, `${optName(opt)}: malformed request`);
    const exp = this.lookup(req.exportName);
    if (!exp) return this.reply(opt, Rep.ERR_UNKNOWN, `${optName(opt)}: unknown export ${JSON.stringify(req.exportName)}`);
    // LIST: no query or the bare namespace lists everything we have; SET needs the full name.
    const matches = req.queries.length === 0
      ? list
      : req.queries.some((q) => q === BASE_ALLOCATION || (list && q === 'base:'));
    if (!list) this.meta = { exportName: exp.name, allocation: matches };
    if (matches) {
      const name = Buffer.from(BASE_ALLOCATION);
      const payload = Buffer.alloc(4 + name.length);
      payload.writeUInt32BE(list ? 0 : ALLOCATION_ID, 0);
      name.copy(payload, 4);
      await this.reply(opt, Rep.META_CONTEXT, payload);
    }
    return this.reply(opt, Rep.ACK);
  }

  private negotiated(exp: ExportSpec): Negotiated {
    const allocation = this.structured && this.meta?.allocation === true && this.meta.exportName === exp.name;
    return {
      export: exp,
      structured: this.structured,
      allocationContext: allocation ? ALLOCATION_ID : 0,
      flags: transmissionFlags(exp.device, this.structured),
    };
  }

  /** The empty name is the default export: the one named "" or else the first. */
  private lookup(name: string): ExportSpec | undefined {
    const exp = this.env.exports.get(name);
    if (exp || name !== '') return exp;
    return this.env.exports.values().next().value;
  }

  private async reply(opt: number, type: number, payload?: Buffer | string): Promise<undefined> {
    const data = typeof payload === 'string' ? Buffer.from(payload.slice(0, MAX_STRING)) : payload ?? Buffer.alloc(0);
    const header = Buffer.alloc(20);
    header.writeBigUInt64BE(OPT_REPLY_MAGIC, 0);
    header.writeUInt32BE(opt, 8);
    header.writeUInt32BE(type, 12);
    header.writeUInt32BE(data.length, 16);
    // Option replies are small; waiting for the socket keeps a client that never reads from
    // making us buffer without bound.
    const ok = this.wire.write(data.length ? Buffer.concat([header, data]) : header);
    if (!ok && !this.wire.closed) await new Promise<void>((resolve) => {
      const done = () => { this.wire.stream.off('drain', done); this.wire.stream.off('close', done); resolve(); };
      this.wire.stream.on('drain', done);
      this.wire.stream.on('close', done);
    });
    return undefined;
  }
}

function infoString(type: number, s: string): Buffer {
  const str = Buffer.from(s.slice(0, MAX_STRING));
  const b = Buffer.alloc(2 + str.length);
  b.writeUInt16BE(type, 0);
  str.copy(b, 2);
  return b;
}

/** LIST/SET_META_CONTEXT data: u32 name length, name, u32 query count, (u32 length, query)*. */
function parseMetaRequest(data: Buffer): { exportName: string; queries: string[] } | null {
  if (data.length < 8) return null;
  const nameLen = data.readUInt32BE(0);
  if (nameLen > MAX_STRING || 4 + nameLen + 4 > data.length) return null;
  const exportName = data.toString('utf8', 4, 4 + nameLen);
  const count = data.readUInt32BE(4 + nameLen);
  let pos = 8 + nameLen;
  if (count > (data.length - pos) / 4) return null;
  const queries: string[] = [];
  for (let i = 0; i < count; i++) {
    if (pos + 4 > data.length) return null;
    const len = data.readUInt32BE(pos);
    pos += 4;
    if (len > MAX_STRING || pos + len > data.length) return null;
    queries.push(data.toString('utf8', pos, pos + len));
    pos += len;
  }
  return pos === data.length ? { exportName, queries } : null;
}
