// The conversation between the two hosts of a memory migration: JSON lines on the link's
// `control` stream (so it survives a cut like the memory stream does). Source to destination:
// `prepare`, `commit` (the source QEMU reached postmigrate: the destination may run), `abort`,
// `libvirt-prepare`, `libvirt-resume`. Destination to source: `ready`, `running`, `refused`, `aborted`, `error`,
// `libvirt-ready`, `libvirt-resumed`.
import type { Duplex } from 'node:stream';

export const CONTROL_STREAM = 'control';
const MAX_LINE = 1024 * 1024;

export type ControlMsg =
  // balloon.restore: after `cont`, set the guest's balloon back to this size (the source shrank it).
  // cache: the source runs the memory cache; the memory stream carries its frames.
  // destQmp: the destination QMP socket (a TLS listener serves many; an SSH agent checks it is its own).
  // capabilities: those the stream needs on the incoming side too (xbzrle, return-path); QEMU's
  // parameters are the source's alone (pacing, downtime, XBZRLE's cache size), so none are sent.
  | { op: 'prepare'; capabilities: Record<string, boolean>; destQmp?: string; balloon?: { restore: number }; cache?: boolean }
  // stream: what the source QEMU wrote (bytes, CRC-32): the destination runs the guest only
  // if it gave its QEMU the same, else it answers `refused` and quits its QEMU.
  // paused: the destination does not `cont` (the operator resumes it; virsh migrate --suspend).
  | { op: 'commit'; stream?: { bytes: number; crc: number }; paused?: boolean }
  | { op: 'abort'; reason: string }
  | { op: 'ready'; sharedDir?: string | null }
  | { op: 'running'; balloon?: { target: number } | { error: string } }
  | { op: 'aborted' }
  | { op: 'refused'; message: string }
  | { op: 'error'; message: string }
  // `vmshift migrate DOMAIN URI` (libvirt drives the QEMUs; src/libvirt/migrate-domain.ts):
  // the destination makes the directory of the migration socket and reads the probe files
  // the source wrote beside its disks (shared storage proven by seeing the same bytes).
  | { op: 'libvirt-prepare'; migrateSocket: string; probes: string[] }
  | { op: 'libvirt-ready'; probes: Array<string | null> }
  // The commit: the destination resumes the paused domain through its own libvirtd (no link
  // round trips inside the guest's pause), answering `libvirt-resumed` or `error`.
  | { op: 'libvirt-resume'; domain: string }
  | { op: 'libvirt-resumed'; ms: number };

/** JSON lines of messages `M` on a stream (the memory migration's by default; src/hostmove has its own). */
export class Control<M extends { op: string } = ControlMsg> {
  private buf = '';
  private waiters: Array<(m: M) => void> = [];
  private queue: M[] = [];
  private closedWith: Error | null = null;
  private closeWaiters: Array<(e: Error) => void> = [];

  constructor(readonly stream: Duplex, private readonly peer: string) {
    stream.setEncoding('utf8');
    stream.on('data', (s: string) => this.onData(s));
    stream.on('end', () => this.close(new Error(`control: ${peer} ended the conversation`)));
    stream.on('error', (e) => this.close(e));
  }

  private onData(s: string): void {
    this.buf += s;
    if (this.buf.length > MAX_LINE) { this.stream.destroy(new Error(`control: a line from ${this.peer} exceeds ${MAX_LINE} bytes`)); return; }
    let i;
    while ((i = this.buf.indexOf('\n')) >= 0) {
      const line = this.buf.slice(0, i);
      this.buf = this.buf.slice(i + 1);
      let m: M;
      try {
        m = JSON.parse(line) as M;
        if (typeof m?.op !== 'string') throw new Error('no op');
      } catch {
        this.stream.destroy(new Error(`control: ${this.peer} sent a line that is not a message: ${line.slice(0, 200)}`));
        return;
      }
      const w = this.waiters.shift();
      if (w) w(m); else this.queue.push(m);
    }
  }

  private close(e: Error): void {
    if (this.closedWith) return;
    this.closedWith = e;
    for (const w of this.closeWaiters) w(e);
  }

  send(m: M): void {
    if (!this.stream.writableEnded && !this.stream.destroyed) this.stream.write(`${JSON.stringify(m)}\n`);
  }

  /** The next message; rejects when the conversation ends first (or after `timeoutMs`). */
  next(timeoutMs = 0): Promise<M> {
    const q = this.queue.shift();
    if (q) return Promise.resolve(q);
    if (this.closedWith) return Promise.reject(this.closedWith);
    return new Promise((resolve, reject) => {
      const t = timeoutMs ? setTimeout(() => reject(new Error(`control: no answer from ${this.peer} within ${timeoutMs} ms`)), timeoutMs) : null;
      this.waiters.push((m) => { if (t) clearTimeout(t); resolve(m); });
      this.closeWaiters.push((e) => { if (t) clearTimeout(t); reject(e); });
    });
  }

  end(): void {
    if (!this.stream.writableEnded) this.stream.end();
  }
}
