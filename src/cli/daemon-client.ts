// How the CLI (and the hooks) reach vmshiftd: --daemon-socket, else $VMSHIFT_SOCKET, else
// /run/vmshift/vmshiftd.sock. A daemon that is not there is one clear error, not ENOENT.
import { controlCall, type CallOptions } from '../control/client.ts';
import { ControlError } from '../control/protocol.ts';
import { DEFAULT_SOCKET } from '../daemon/defaults.ts';

export function daemonSocket(flag?: string): string {
  return flag || process.env.VMSHIFT_SOCKET || DEFAULT_SOCKET;
}

/** yargs option shared by every verb that talks to the daemon. */
export const daemonSocketOption = {
  type: 'string',
  describe: 'vmshiftd API socket (default $VMSHIFT_SOCKET or /run/vmshift/vmshiftd.sock)',
} as const;

export async function callDaemon<T = unknown>(socket: string, method: string, params: Record<string, unknown> = {}, opts: CallOptions = {}): Promise<T> {
  try {
    return await controlCall<T>(socket, method, params, { timeoutMs: 120_000, ...opts });
  } catch (e) {
    // Only "nobody listens" means the daemon is down; EACCES and the like keep their own message.
    if (e instanceof ControlError && e.code === 'unreachable' && /nothing is listening/.test(e.message)) {
      throw new ControlError('daemon-down', `vmshiftd is not running (socket ${socket})`);
    }
    throw e;
  }
}
