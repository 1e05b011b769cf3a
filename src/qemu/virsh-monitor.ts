// A QmpTransport for guests whose monitor libvirt owns: each command goes through
// `virsh qemu-monitor-command DOMAIN --pretty --cmd '{json}'`. No events (libvirt keeps
// them); use QmpClient where vmshift owns the monitor socket.
import { Virsh } from '../libvirt/virsh.ts';
import { QmpConnectionError, replyValue, type ExecuteOpts, type QmpTransport } from './transport.ts';

export class VirshMonitor implements QmpTransport {
  readonly peer: string;

  constructor(readonly domain: string, private readonly virsh: Virsh = new Virsh()) {
    this.peer = `virsh:${virsh.uri}/${domain}`;
  }

  async execute<T = unknown>(command: string, args?: Record<string, unknown>, opts: ExecuteOpts = {}): Promise<T> {
    const msg: Record<string, unknown> = { execute: command };
    if (args !== undefined) msg.arguments = args;
    const out = await this.virsh.qemuMonitorCommand(this.domain, JSON.stringify(msg), { timeoutMs: opts.timeoutMs });
    let reply: unknown;
    try {
      reply = JSON.parse(out);
    } catch {
      throw new QmpConnectionError('protocol', this.peer, `${command}: virsh printed something that is not JSON: ${JSON.stringify(out.slice(0, 80))}`);
    }
    if (reply === null || typeof reply !== 'object' || Array.isArray(reply)) {
      throw new QmpConnectionError('protocol', this.peer, `${command}: reply is not a JSON object: ${out.slice(0, 80)}`);
    }
    return replyValue<T>(reply as Record<string, unknown>, command, this.peer);
  }

  /** Nothing to close: every command is its own virsh process. */
  async close(): Promise<void> {}
}
