// The resumable link between two vmshift hosts: named byte streams, both directions,
// multiplexed over one network carrier at a time (redialled after a cut) and the shared-file
// carrier beside it. Every byte has an offset; the receiver acknowledges what its user read;
// the sender keeps the rest (in memory up to `maxResident`, beyond that in the shared file)
// and sends it again after a reconnect, from the offsets the peer's HELLO names. The receiver
// takes each offset from whichever carrier has it first, so each stream arrives exactly once,
// in order. Side 'a' dials (`dial`), side 'b' is handed connections (`attach`).
//
// Failure: if nothing at all is heard from the peer (frames, pings, file records) for
// `holdMs`, the link fails: every stream is destroyed with an UNREACHABLE LinkError. A cut
// shorter than that is invisible to the streams.
import { EventEmitter } from 'node:events';
import { rmSync } from 'node:fs';
import type { Duplex } from 'node:stream';
import { LinkError, isFatal, meaning } from './errors.ts';
import { FLAG_FIN, Frame, FrameReader, MAX_DATA, encodeData, encodeFrame, encodeHello, parseHello, type FrameIn, type Hello } from './frames.ts';
import { SharedDir } from './shared-dir.ts';
import { Rec, encodeRecord } from './record-file.ts';
import { LinkStream, type StreamHost } from './stream.ts';

export interface LinkOptions {
  /** Names this link on the wire and in files: [A-Za-z0-9_-], both sides the same. */
  link: string;
  migration: string;
  role: 'a' | 'b';
  /** Who the peer is, for messages ("root@10.1.1.2:22"). */
  peer: string;
  /** Side 'a': open a new network carrier (SSH channel, TLS socket). */
  dial?: () => Promise<Duplex>;
  /** The shared-file carrier's directory; none = network only. */
  sharedDir?: string;
  holdMs?: number;
  /**
   * Before the first carrier was ever up, the link waits this long (or holdMs, if longer):
   * the first dial starts the peer's agent (a process start-up, seconds on a loaded host),
   * which a short hold time meant for cuts must not cut off.
   */
  firstContactMs?: number;
  pingMs?: number;
  /** A carrier with nothing heard for this long is dropped (and, on side 'a', redialled). */
  deadAfterMs?: number;
  /** Unacknowledged bytes per stream kept in memory; writes wait beyond it unless the file holds them. */
  maxResident?: number;
  /**
   * The smallest send window per stream: bytes sent on the network and not yet acknowledged.
   * Above it the window follows what the link measures (bandwidth x round trip, window.ts),
   * up to `maxResident`: a writer is held to what the network carries, not to memory speed.
   */
  windowFloor?: number;
  /** Once the peer has been silent this long with bytes unacknowledged, they go to the shared file too. */
  spillAfterMs?: number;
  filePollMs?: number;
  /** After the link ends: how long the last carrier may take to close (the peer reading our ABORT or BYE). */
  closeWaitMs?: number;
  backoffMs?: { first: number; max: number };
}

export interface LinkStats {
  carrier: 'up' | 'down';
  reconnects: number;
  /** Bytes sent again over the network after a reconnect. */
  resentBytes: number;
  /** Bytes that arrived twice (over both carriers, or resent) and were dropped. */
  duplicateBytes: number;
  /** Bytes delivered from the shared file. */
  fromFileBytes: number;
  /** Bytes written to the shared file. */
  spilledBytes: number;
  sharedDir: 'off' | 'ok' | 'write-off';
  /** The send window of the stream that sent the most (window.ts): its bound and what it was made of. */
  window: ReturnType<LinkStream['window']['stats']> | null;
}

interface Conn {
  sock: Duplex;
  reader: FrameReader;
  ready: boolean;
  blocked: boolean;
  lastHeard: number;
  closed: boolean;
  /** The carrier has a writev (net and TLS sockets; ssh2's channels do not). */
  gathers: boolean;
}

const ID_RE = /^[A-Za-z0-9_-]{1,64}$/;

export class Link extends EventEmitter implements StreamHost {
  readonly opts: Required<Omit<LinkOptions, 'dial' | 'sharedDir'>> & Pick<LinkOptions, 'dial' | 'sharedDir'>;
  readonly maxResident: number;
  readonly windowFloor: number;
  private streams = new Map<number, LinkStream>();
  private nextId: number;
  private conn: Conn | null = null;
  private file: SharedDir | null = null;
  private readonly createdAt = performance.now();
  private lastHeard = this.createdAt;
  private lastBeat = 0;
  private lastPing = 0;
  private timers: NodeJS.Timeout[] = [];
  private dialing = false;
  private redialTimer: NodeJS.Timeout | null = null;
  private backoff: number;
  private ackQueued = new Set<LinkStream>();
  private ackScheduled = false;
  private kicked = false;
  private byeReceived = false;
  private lastError: string | null = null;
  /** null while the link runs; else how it ended. */
  state: 'running' | 'finished' | 'failed' = 'running';
  failure: LinkError | null = null;
  private keptFiles: string[] = [];
  /** Resolves once the last network carrier closed (or was given up on) after the link ended. */
  private carrierClosed: Promise<void> = Promise.resolve();
  private counters = { reconnects: 0, spilled: 0, resentGone: 0, dupGone: 0, fileGone: 0 };

  constructor(opts: LinkOptions) {
    super();
    if (!ID_RE.test(opts.link) || !ID_RE.test(opts.migration)) throw new LinkError('MISMATCH', `link: ids must match ${ID_RE} (got link "${opts.link}", migration "${opts.migration}")`);
    if (opts.role === 'a' && !opts.dial) throw new Error('link: side a needs dial()');
    this.opts = {
      holdMs: 60_000, firstContactMs: 30_000, pingMs: 1000, deadAfterMs: 5000, maxResident: 32 * 1024 * 1024, windowFloor: 2 * 1024 * 1024, spillAfterMs: 1000, filePollMs: 20, closeWaitMs: 2000,
      // An option given as undefined keeps its default (a spread would put undefined over
      // it: `holdMs: undefined` was a link that never gave up).
      backoffMs: { first: 100, max: 2000 }, ...Object.fromEntries(Object.entries(opts).filter(([, v]) => v !== undefined)),
    } as Required<LinkOptions>;
    this.maxResident = this.opts.maxResident;
    this.windowFloor = Math.min(this.opts.windowFloor, this.opts.maxResident);
    this.backoff = this.opts.backoffMs.first;
    this.nextId = opts.role === 'a' ? 0 : 1;
    if (opts.sharedDir) {
      this.file = new SharedDir({ dir: opts.sharedDir, link: opts.link, migration: opts.migration, role: opts.role }, (m) => this.warn(m));
      // Not in the constructor itself: a directory that cannot be written warns, and whoever
      // constructs the link attaches its 'warning' listener only after this returns.
      queueMicrotask(() => { if (this.state === 'running') this.file?.open(); });
    }
    this.timers.push(setInterval(() => this.tick(), Math.min(this.opts.pingMs, this.opts.deadAfterMs / 3, 100)));
    if (this.file) this.timers.push(setInterval(() => this.fileTick(), this.opts.filePollMs));
    // The timers keep the process alive while the link runs, as an open socket would: the
    // hold-time check must fire even when no carrier is up.
    if (opts.role === 'a') this.redial(0);
  }

  /** Every stream of the link, ours and the peer's. */
  get allStreams(): LinkStream[] {
    return [...this.streams.values()];
  }

  /** Open a stream we name; the peer gets a 'stream' event with the same name. */
  stream(name: string): LinkStream {
    if (this.state !== 'running') throw this.failure ?? new LinkError('ABORTED', 'link: finished');
    for (const s of this.streams.values()) if (s.streamName === name && s.id % 2 === this.nextId % 2) throw new Error(`link: stream ${name} is already open`);
    const s = this.addStream(this.nextId, name);
    this.nextId += 2;
    if (this.conn?.ready) this.send(encodeFrame(Frame.OPEN, s.id, 0, Buffer.from(name)));
    return s;
  }

  private addStream(id: number, name: string): LinkStream {
    const s = new LinkStream(id, name, this);
    this.streams.set(id, s);
    return s;
  }

  /** A stream the peer opened (learned from OPEN, HELLO or its file). */
  private peerStream(id: number, name: string): LinkStream {
    let s = this.streams.get(id);
    if (!s) {
      if (id % 2 === this.nextId % 2) throw new LinkError('PROTOCOL', `link: peer ${this.opts.peer} names stream ${id}, one of ours we never opened`);
      s = this.addStream(id, name);
      this.emit('stream', s);
    }
    return s;
  }

  // ---- network carrier ----

  /** Side 'b': a new connection from the peer (the newest replaces any older one). */
  attach(sock: Duplex): void {
    if (this.state !== 'running') { sock.destroy(); return; }
    if (this.conn) this.dropConn(this.conn, 'replaced by a new connection');
    const conn: Conn = {
      sock, ready: false, blocked: false, lastHeard: performance.now(), closed: false,
      gathers: typeof (sock as Duplex & { _writev?: unknown })._writev === 'function',
      reader: new FrameReader(this.opts.peer, (f) => this.onFrame(conn, f)),
    };
    this.conn = conn;
    sock.on('data', (b: Buffer) => {
      if (conn.closed) return;
      try {
        conn.reader.push(b);
      } catch (e) {
        this.onConnError(conn, e as Error);
        return;
      }
      // Acknowledged once per turn of the event loop, after every socket read that was ready:
      // an ACK per read (32-64 KiB) was an SSH packet, or a syscall, per read each way.
      this.scheduleAcks();
      this.pump(); // acknowledgements open the window
    });
    sock.on('error', (e) => this.onConnError(conn, e));
    sock.on('close', () => this.dropConn(conn, 'closed'));
    sock.on('end', () => this.dropConn(conn, 'ended by the peer'));
    sock.on('drain', () => { conn.blocked = false; this.pump(); });
    const hello: Hello = {
      v: 1, link: this.opts.link, migration: this.opts.migration, role: this.opts.role,
      send: [...this.streams.values()].filter((s) => s.id % 2 === this.nextId % 2).map((s) => ({ id: s.id, name: s.streamName })),
      recv: [...this.streams.values()].map((s) => ({ id: s.id, offset: s.recvNext, fin: s.ended })),
    };
    this.write(conn, encodeHello(hello));
  }

  private onConnError(conn: Conn, raw: Error): void {
    const e = meaning(raw);
    if (isFatal(e)) { this.fail(e as LinkError); return; }
    this.lastError = e.message;
    this.dropConn(conn, e.message);
  }

  private dropConn(conn: Conn, why: string): void {
    if (conn.closed) return;
    conn.closed = true;
    conn.sock.destroy();
    if (this.conn === conn) {
      this.conn = null;
      if (conn.ready) this.emit('carrier', 'down', why);
      if (this.opts.role === 'a' && this.state === 'running') this.redial(this.backoff);
    }
  }

  private redial(delay: number): void {
    if (this.redialTimer || this.dialing || this.state !== 'running') return;
    this.redialTimer = setTimeout(() => {
      this.redialTimer = null;
      this.dialing = true;
      this.opts.dial!().then((sock) => {
        this.dialing = false;
        if (this.state !== 'running') { sock.destroy(); return; }
        this.attach(sock);
      }, (e: Error) => {
        this.dialing = false;
        if (isFatal(e)) { this.fail(e as LinkError); return; }
        this.lastError = e.message;
        this.emit('carrier', 'retry', e.message);
        this.backoff = Math.min(this.backoff * 2, this.opts.backoffMs.max);
        this.redial(this.backoff);
      });
    }, delay);
  }

  private onFrame(conn: Conn, f: FrameIn): void {
    const now = performance.now();
    conn.lastHeard = now;
    this.lastHeard = now;
    switch (f.type) {
      case Frame.HELLO: return this.onHello(conn, parseHello(f.payload, this.opts, this.opts.peer));
      case Frame.OPEN: this.peerStream(f.stream, f.payload.toString('utf8')); return;
      case Frame.DATA: {
        const s = this.known(f.stream, 'DATA');
        const length = f.parts.reduce((n, p) => n + p.length, 0);
        if (s.recvFin !== null && f.offset + length > s.recvFin) throw new LinkError('PROTOCOL', `link: DATA beyond the end of stream ${s.streamName} (peer ${this.opts.peer})`);
        let at = f.offset;
        for (const part of f.parts) {
          if (!s.deliver(at, part, false)) throw new LinkError('PROTOCOL', `link: DATA for stream ${s.streamName} at ${f.offset} leaves a gap after ${s.recvNext} (peer ${this.opts.peer})`);
          at += part.length;
        }
        this.ackQueued.add(s);
        return;
      }
      case Frame.FIN: {
        const s = this.known(f.stream, 'FIN');
        s.onFin(f.offset);
        this.ackQueued.add(s);
        return;
      }
      case Frame.ACK: return this.onAck(this.known(f.stream, 'ACK'), f.offset, (f.flags & FLAG_FIN) !== 0);
      case Frame.PING: return;
      case Frame.BYE:
        this.byeReceived = true;
        this.emit('bye');
        return;
      case Frame.ABORT:
        this.fail(new LinkError('ABORTED', `link: peer ${this.opts.peer} aborted: ${f.payload.toString('utf8')}`), false);
        return;
    }
  }

  private known(id: number, what: string): LinkStream {
    const s = this.streams.get(id);
    if (!s) throw new LinkError('PROTOCOL', `link: ${what} for unknown stream ${id} in state READY (peer ${this.opts.peer})`);
    return s;
  }

  private onAck(s: LinkStream, offset: number, fin: boolean): void {
    if (offset > s.sendNext) throw new LinkError('PROTOCOL', `link: ACK of stream ${s.streamName} at ${offset}, beyond the ${s.sendNext} bytes sent (peer ${this.opts.peer})`);
    s.onAck(offset, fin);
    this.checkDone();
  }

  private onHello(conn: Conn, h: Hello): void {
    for (const o of h.send) this.peerStream(o.id, o.name);
    const resume = new Map(h.recv.map((r) => [r.id, r]));
    for (const s of this.streams.values()) {
      const r = resume.get(s.id);
      const at = r?.offset ?? 0;
      if (at < s.acked) throw new LinkError('PROTOCOL', `link: peer ${this.opts.peer} resumes stream ${s.streamName} at ${at}, before ${s.acked} it acknowledged`);
      if (at > s.sendNext) throw new LinkError('PROTOCOL', `link: peer ${this.opts.peer} resumes stream ${s.streamName} at ${at}, beyond the ${s.sendNext} bytes sent`);
      s.onAck(at, r?.fin ?? false);
      s.window.restart();
      s.netNext = at;
      s.finSentNet = false;
      if (!r && s.id % 2 === this.nextId % 2) this.write(conn, encodeFrame(Frame.OPEN, s.id, 0, Buffer.from(s.streamName)));
    }
    conn.ready = true;
    if (this.counters.reconnects++ > 0) this.emit('carrier', 'up', 'reconnected');
    else this.emit('carrier', 'up', 'connected');
    this.backoff = this.opts.backoffMs.first;
    this.lastError = null;
    this.checkDone();
    this.pump();
  }

  private write(conn: Conn, bufs: Buffer[]): boolean {
    let ok: boolean;
    if (bufs.length === 1) ok = conn.sock.write(bufs[0]);
    else if (conn.gathers) {
      // A socket (TLS, unix) gathers corked writes into one writev: header and payload go
      // as they are, no copy.
      conn.sock.cork();
      for (const b of bufs) conn.sock.write(b);
      conn.sock.uncork();
      ok = conn.sock.writableLength < conn.sock.writableHighWaterMark;
    } else {
      // An SSH channel makes a packet (with its MAC) of every write: one write per frame.
      ok = conn.sock.write(Buffer.concat(bufs));
    }
    if (!ok) conn.blocked = true;
    return ok;
  }

  private send(bufs: Buffer[]): void {
    if (this.conn?.ready) this.write(this.conn, bufs);
  }

  kick(): void {
    if (this.kicked) return;
    this.kicked = true;
    queueMicrotask(() => {
      this.kicked = false;
      this.pump();
      if (this.file && !this.conn?.ready) this.spill(true);
    });
  }

  /** Send what each stream has not yet sent on this carrier, round-robin, until the socket is full. */
  private pump(): void {
    const conn = this.conn;
    if (!conn?.ready || conn.blocked || this.state !== 'running') return;
    conn.sock.cork();
    try {
      let progress = true;
      while (progress && !conn.blocked) {
        progress = false;
        for (const s of this.streams.values()) {
          if (conn.blocked) break;
          if (s.netNext < s.sendNext && s.netNext - s.acked < s.window.bytes) {
            // One frame of up to MAX_DATA from as many queued chunks as it takes (the relay
            // writes QEMU's stream in 64 KiB socket reads): a quarter of the frames to
            // encode, parse and hand on.
            const parts: Buffer[] = [];
            let at = s.netNext, n = 0;
            while (at < s.sendNext && n < MAX_DATA && at - s.acked < s.window.bytes) {
              const c = s.chunkAt(at);
              if (!c) break;
              const data = c.data ?? this.readBack(s, c);
              const part = data.subarray(at - c.offset, at - c.offset + MAX_DATA - n);
              parts.push(part);
              n += part.length;
              at += part.length;
              if (!c.data) break; // read back from the shared file: one chunk at a time
            }
            if (!n) continue;
            if (s.netNext < s.netHigh) s.resentBytes += Math.min(n, s.netHigh - s.netNext);
            this.write(conn, encodeData(s.id, s.netNext, parts));
            const before = s.netNext - s.acked;
            s.netNext = at;
            if (s.netNext > s.netHigh) {
              s.netHigh = s.netNext;
              s.window.onSend(s.netNext, performance.now(), before);
            }
            progress = true;
          } else if (s.finOffset !== null && !s.finSentNet && s.netNext === s.finOffset) {
            s.finSentNet = true;
            this.write(conn, encodeFrame(Frame.FIN, s.id, s.finOffset));
          }
        }
      }
    } finally {
      conn.sock.uncork();
    }
  }

  private readBack(s: LinkStream, c: { filePos: number; length: number }): Buffer {
    const w = this.file?.existingWriter(s.id);
    if (!w) throw new LinkError('FILE', `link: stream ${s.streamName} lost bytes it had written to the shared file`);
    return w.readPayload(c.filePos, c.length);
  }

  ackSoon(s: LinkStream): void {
    this.ackQueued.add(s);
    this.scheduleAcks();
  }

  private scheduleAcks(): void {
    if (this.ackScheduled || !this.ackQueued.size) return;
    this.ackScheduled = true;
    setImmediate(() => { this.ackScheduled = false; this.flushAcks(); });
  }

  /** Tell the peer what our users have read, on the network (and the file, see fileTick). */
  private flushAcks(): void {
    if (!this.conn?.ready) { this.ackQueued.clear(); return; }
    for (const s of this.ackQueued) {
      const at = s.ackOffset();
      const fin = s.ended && s.recvFin === at;
      if (at > s.ackedNet || (fin && !s.finAckedNet)) {
        s.ackedNet = at;
        s.finAckedNet = fin;
        this.write(this.conn, encodeFrame(Frame.ACK, s.id, at, undefined, fin ? FLAG_FIN : 0));
      }
    }
    this.ackQueued.clear();
  }

  // ---- shared-file carrier ----

  /**
   * Write to our files what stayed unacknowledged past `spillAfterMs` (or everything, `now`,
   * while no network carrier is up), then let go of it in memory when memory is short.
   */
  private spill(now: boolean): void {
    const f = this.file;
    if (!f?.writable || this.state !== 'running') return; // after finish() no file may appear again
    // While the peer answers on the network, nothing goes to the file (the healthy path
    // stays at network speed); once it has been silent for spillAfterMs with bytes
    // unacknowledged, or there is no carrier, every unacknowledged byte goes.
    const c = this.conn;
    const silent = !c?.ready || performance.now() - c.lastHeard > this.opts.spillAfterMs;
    if (!now && !silent) return;
    for (const s of this.streams.values()) {
      const records: Buffer[][] = [];
      const chunks = [];
      for (const c of s.queue) {
        if (c.offset + c.length <= s.fileEnd) continue;
        records.push(encodeRecord(f.seed, Rec.DATA, s.id, c.offset, c.data!));
        chunks.push(c);
      }
      const last = chunks.length ? chunks[chunks.length - 1] : null;
      const coveredTo = last ? last.offset + last.length : s.fileEnd;
      const allCovered = s.queue.length === 0 || s.queue[s.queue.length - 1].offset + s.queue[s.queue.length - 1].length <= coveredTo;
      const fin = s.finOffset !== null && !s.finInFile && !s.finAcked && allCovered;
      if (fin) records.push(encodeRecord(f.seed, Rec.FIN, s.id, s.finOffset!, Buffer.alloc(0)));
      if (!records.length) continue;
      const pos = f.append(s.id, s.streamName, records);
      if (!pos) return;
      chunks.forEach((c, i) => {
        c.filePos = pos[i];
        this.counters.spilled += c.length;
        s.fileEnd = c.offset + c.length;
      });
      if (fin) s.finInFile = true;
      // Memory beyond half the bound goes back: the file has it, readBack resends from there.
      for (const c of chunks) {
        if (s.resident <= this.maxResident / 2) break;
        if (c.data) { c.data = null; s.resident -= c.length; }
      }
      s.release();
    }
  }

  private fileTick(): void {
    const f = this.file;
    if (!f || this.state !== 'running') return;
    try {
      this.spill(!this.conn?.ready);
      const got = f.readPeer((id) => this.streams.get(id)?.recvNext ?? 0);
      const now = performance.now();
      if (got.acks.length || got.data.length) this.lastHeard = now;
      for (const d of got.data) {
        const s = this.peerStreamOrOwn(d.stream, d.name);
        for (const r of d.records) {
          if (r.kind === Rec.FIN) s.onFin(r.offset);
          else s.deliver(r.offset, r.payload, true);
        }
        this.ackQueued.add(s);
      }
      for (const r of got.acks) {
        if (r.kind === Rec.BYE && !this.byeReceived) { this.byeReceived = true; this.emit('bye'); }
        if (r.kind !== Rec.ACK) continue;
        const s = this.streams.get(r.stream);
        if (s && r.offset <= s.sendNext) s.onAck(r.offset, (r.flags & FLAG_FIN) !== 0);
      }
      if (got.acks.length) { this.checkDone(); this.pump(); }
      if (got.data.length) this.flushAcks();
      this.fileAcks(now);
    } catch (e) {
      this.fail(e instanceof LinkError ? e : new LinkError('FILE', `link: shared file: ${(e as Error).message}`));
    }
  }

  private peerStreamOrOwn(id: number, name: string): LinkStream {
    return this.streams.get(id) ?? this.peerStream(id, name);
  }

  /** Acknowledge in the file while no network carrier is up, or for bytes that came from it. */
  private fileAcks(now: number, force = false): void {
    const f = this.file!;
    const down = force || !this.conn?.ready;
    const records: Buffer[][] = [];
    for (const s of this.streams.values()) {
      const at = s.ackOffset();
      const fin = s.ended && s.recvFin === at;
      const ackable = at > s.ackedFile || (fin && !s.finAckedFile);
      if (ackable && (down || now - s.lastFromFile < 1000)) {
        records.push(encodeRecord(f.seed, Rec.ACK, s.id, at, Buffer.alloc(0), fin ? FLAG_FIN : 0));
        s.ackedFile = at;
        s.finAckedFile = fin;
      }
    }
    if (down && now - this.lastBeat >= this.opts.pingMs) {
      records.push(encodeRecord(f.seed, Rec.BEAT, 0, 0, Buffer.alloc(0)));
      this.lastBeat = now;
    }
    f.appendAcks(records);
  }

  // ---- liveness, completion, failure ----

  private tick(): void {
    if (this.state !== 'running') return;
    const now = performance.now();
    const c = this.conn;
    if (c?.ready) {
      if (now - c.lastHeard > this.opts.deadAfterMs) this.dropConn(c, `nothing heard for ${this.opts.deadAfterMs} ms`);
      else if (now - this.lastPing >= Math.min(this.opts.pingMs, this.opts.deadAfterMs / 3)) { this.lastPing = now; this.write(c, encodeFrame(Frame.PING, 0, 0)); }
    }
    const contacted = this.counters.reconnects > 0 || this.lastHeard > this.createdAt;
    const hold = contacted ? this.opts.holdMs : Math.max(this.opts.holdMs, this.opts.firstContactMs);
    if (now - this.lastHeard > hold) {
      const why = this.lastError ? ` (last error: ${this.lastError})` : '';
      this.fail(new LinkError('UNREACHABLE', contacted
        ? `link: nothing heard from ${this.opts.peer} for ${hold / 1000} s over any carrier${why}`
        : `link: ${this.opts.peer} not reached within ${hold / 1000} s${why}`));
    }
  }

  private allDone(): boolean {
    for (const s of this.streams.values()) {
      if (!s.finAcked || !s.ended) return false;
    }
    return true;
  }

  private checkDone(): void {
    if (this.state === 'running' && this.allDone()) this.emit('all-done');
  }

  /**
   * Resolves once every stream was ended by both users and acknowledged both ways (end your
   * streams, and read the peer's to the end, first). Then our files are removed and the
   * carrier closed: the link is over.
   */
  async finish(): Promise<void> {
    if (this.state === 'failed') throw this.failure;
    if (this.state === 'finished') return;
    await new Promise<void>((resolve, reject) => {
      const check = () => {
        if (this.state === 'failed') { cleanup(); reject(this.failure); }
        else if (this.allDone()) { cleanup(); resolve(); }
      };
      const cleanup = () => { this.off('all-done', check); this.off('failed', check); clearInterval(t); };
      this.on('all-done', check);
      this.on('failed', check);
      const t = setInterval(check, 50);
      check();
    });
    // BYE by both carriers: the peer may be reachable by either. The final acks go first.
    this.flushAcks();
    this.send(encodeFrame(Frame.BYE, 0, 0));
    if (this.file) {
      this.fileAcks(performance.now(), true);
      this.file.appendAcks([encodeRecord(this.file.seed, Rec.BYE, 0, 0, Buffer.alloc(0))]);
      this.file.removeOwn(false); // the peer has every byte of our data files
    }
    // Our ack file goes once the peer no longer needs it: when it said BYE too.
    const deadline = performance.now() + this.opts.holdMs;
    while (!this.byeReceived && !this.file?.peerFinished() && performance.now() < deadline && this.state === 'running') {
      await new Promise((r) => setTimeout(r, this.opts.filePollMs));
    }
    this.file?.removeOwn(true);
    this.state = 'finished';
    this.stop();
  }

  /**
   * After a failure whose outcome the user has settled (a rollback, say), the files kept
   * renamed `.failed` help no one: remove them. Without it they stay for a person to look at.
   */
  discardFiles(): void {
    for (const p of this.keptFiles) rmSync(p, { force: true });
    this.keptFiles = [];
  }

  /**
   * Give the link up on purpose; the peer's streams fail with ABORTED and this reason. The
   * promise resolves once the peer has closed its end of the carrier (it does on reading the
   * ABORT) or after `closeWaitMs`: a process that exits right after aborting (a refused
   * `vmshift migrate`) had its ABORT lost in the SSH client's buffers, and the peer then
   * waited out its hold time.
   */
  abort(reason: string): Promise<void> {
    if (this.state !== 'running') return this.carrierClosed;
    if (this.conn?.ready) this.send(encodeFrame(Frame.ABORT, 0, 0, Buffer.from(reason.slice(0, 1000))));
    this.fail(new LinkError('ABORTED', `link: aborted: ${reason}`), false);
    return this.carrierClosed;
  }

  private fail(err: LinkError, tell = true): void {
    if (this.state !== 'running') return;
    if (tell && this.conn?.ready && err.code !== 'UNREACHABLE') this.send(encodeFrame(Frame.ABORT, 0, 0, Buffer.from(err.message.slice(0, 1000))));
    this.state = 'failed';
    this.failure = err;
    const kept = this.file?.keepFailed() ?? [];
    this.keptFiles = kept;
    if (kept.length) this.warn(`link: kept ${kept.join(', ')} after the failure`);
    this.stop();
    for (const s of this.streams.values()) s.destroy(err);
    this.emit('failed', err);
  }

  private stop(): void {
    for (const t of this.timers) clearInterval(t);
    this.timers = [];
    if (this.redialTimer) clearTimeout(this.redialTimer);
    this.redialTimer = null;
    if (this.conn) {
      // Ended, not destroyed: what we wrote last (an ABORT, a BYE) must still reach the peer.
      // Closed once the peer closed its end too, or after closeWaitMs.
      const c = this.conn;
      this.conn = null;
      c.closed = true;
      this.carrierClosed = new Promise((resolve) => {
        const t = setTimeout(() => { c.sock.destroy(); resolve(); }, this.opts.closeWaitMs);
        t.unref();
        c.sock.once('close', () => { clearTimeout(t); resolve(); });
        c.sock.end();
      });
    }
  }

  onStreamDestroyed(_s: LinkStream, _err: Error | null): void {
    // A user destroying one stream does not end the link; finish() will wait for it, abort() ends it.
  }

  private warn(msg: string): void {
    this.emit('warning', msg);
  }

  stats(): LinkStats {
    let resent = 0, dup = 0, fromFile = 0;
    let busiest: LinkStream | null = null;
    for (const s of this.streams.values()) {
      resent += s.resentBytes; dup += s.duplicateBytes; fromFile += s.fromFileBytes;
      if (s.sendNext > (busiest?.sendNext ?? 0)) busiest = s;
    }
    return {
      carrier: this.conn?.ready ? 'up' : 'down',
      reconnects: Math.max(0, this.counters.reconnects - 1),
      resentBytes: resent,
      duplicateBytes: dup,
      fromFileBytes: fromFile,
      spilledBytes: this.counters.spilled,
      sharedDir: !this.file ? 'off' : this.file.writable ? 'ok' : 'write-off',
      window: busiest ? busiest.window.stats() : null,
    };
  }
}
