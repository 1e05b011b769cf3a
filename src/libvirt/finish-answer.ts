// Whether libvirt's client (virsh, on this host) has Finish's success answer: the earliest
// point at which the destination of `vmshift migrate DOMAIN URI` may run (docs/libvirt-migrate.md,
// "Exactly one running copy"). libvirt 9.0's client calls Confirm with cancelled = 1, which
// resumes the source, exactly when Finish returned no domain (virDomainMigrateVersion3Full:
// `cancelled = ddomain == NULL`); a source whose client never comes back after Perform stays
// paused (qemuMigrationAnyConnectionClosed in phase PERFORM3_DONE: no resume). So once Finish's
// OK reply sits whole in virsh's socket, the source copy will never run again, even if vmshift,
// the link or virsh dies next.
//
// The watch reads the byte stream from the peer's libvirtd to virsh (libvirt's RPC framing,
// src/rpc/virnetprotocol.x: be32 length including itself, then be32 program, version,
// procedure, type, serial, status); it never changes a byte.

const REMOTE_PROGRAM = 0x20008086;
/** REMOTE_PROC_DOMAIN_MIGRATE_FINISH3 and ..._FINISH3_PARAMS (src/remote/remote_protocol.x). */
const FINISH_PROCS = new Set([217, 306]);
const VIR_NET_REPLY = 1;
const VIR_NET_OK = 0;
const HEADER = 28;
/** libvirt's own limit on one message (VIR_NET_MESSAGE_MAX is 32 MiB): beyond it the framing was misread. */
const MAX_MESSAGE = 64 * 1024 * 1024;

export class FinishAnswerWatch {
  private head = Buffer.alloc(HEADER);
  private have = 0; // bytes of the current message's header read
  private left = 0; // bytes of the current message's body still to skip
  private broken = false;

  /**
   * Feed the next bytes from the peer's libvirtd; true when they complete a successful reply
   * to Finish (the whole message, so virsh can decode it once these bytes are delivered).
   */
  feed(chunk: Buffer): boolean {
    let found = false;
    let i = 0;
    while (i < chunk.length && !this.broken) {
      if (this.left > 0) {
        const n = Math.min(this.left, chunk.length - i);
        this.left -= n;
        i += n;
        if (this.left === 0 && this.isFinishOk()) found = true;
        continue;
      }
      const n = Math.min(HEADER - this.have, chunk.length - i);
      chunk.copy(this.head, this.have, i, i + n);
      this.have += n;
      i += n;
      if (this.have < HEADER) break;
      const len = this.head.readUInt32BE(0);
      if (len < HEADER || len > MAX_MESSAGE) { this.broken = true; break; }
      this.left = len - HEADER;
      if (this.left === 0 && this.isFinishOk()) found = true;
    }
    return found;
  }

  private isFinishOk(): boolean {
    const h = this.head;
    this.have = 0;
    return h.readUInt32BE(4) === REMOTE_PROGRAM && FINISH_PROCS.has(h.readUInt32BE(12))
      && h.readUInt32BE(16) === VIR_NET_REPLY && h.readUInt32BE(24) === VIR_NET_OK;
  }
}
