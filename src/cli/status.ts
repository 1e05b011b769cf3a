// `vmshift status --socket PATH`: what a running shim is doing, from its control socket.
import type { Argv, ArgumentsCamelCase } from 'yargs';
import { controlCall } from '../control/client.ts';
import { controlSocketFor } from '../shim/shim.ts';
import { formatBytes } from '../util/size.ts';
import { printJson } from './output.ts';

interface StatusArgs {
  socket: string;
  json: boolean;
}

export const statusCommand = {
  command: 'status',
  describe: 'Show a running shim: backing, clients, bytes, dirty bytes, hot regions, job',
  builder: (y: Argv) => y.option('socket', { type: 'string', demandOption: true, describe: 'the NBD socket the shim serves' }),
  handler: async (argv: ArgumentsCamelCase<StatusArgs>) => {
    const s = await controlCall<ShimStatus>(controlSocketFor(argv.socket), 'status', {}, { timeoutMs: 5000 });
    if (argv.json) return printJson(s);
    const lines = [
      `socket:   ${s.socket} (export "${s.export}")`,
      `backing:  ${s.backing}${s.backing !== s.origin ? ` (moved from ${s.origin})` : ''}`,
      `size:     ${formatBytes(s.size)}${s.readOnly ? ', read-only' : ''}`,
      `clients:  ${s.nbd.clients} now, ${s.nbd.connectionsTotal} since start`,
      `traffic:  ${formatBytes(s.nbd.bytesRead)} read, ${formatBytes(s.nbd.bytesWritten)} written, ${s.nbd.requests} requests, ${s.nbd.errors} errors`,
    ];
    if (s.tracking) {
      lines.push(`dirty:    ${formatBytes(s.tracking.dirtyBytes)} (${s.tracking.writes} writes tracked)`);
      for (const h of s.tracking.hot ?? []) lines.push(`  hot:    ${formatBytes(h.offset)} +${formatBytes(h.length)}  ${Math.round(h.writes)} writes`);
    }
    lines.push(`job:      ${s.job ?? 'none'}`);
    process.stdout.write(lines.join('\n') + '\n');
  },
};

interface ShimStatus {
  socket: string;
  export: string;
  origin: string;
  backing: string;
  size: number;
  readOnly: boolean;
  job: string | null;
  nbd: { clients: number; connectionsTotal: number; bytesRead: number; bytesWritten: number; requests: number; errors: number };
  tracking: { dirtyBytes: number; writes: number; hot?: Array<{ offset: number; length: number; writes: number }> } | null;
}
