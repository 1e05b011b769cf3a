// A ShimStarter backed by vmshiftd (`shim.start` / `shim.stop` over its API socket): the
// daemon owns the shim process, restarts it and re-adopts it across its own restarts.
import { callDaemon } from '../cli/daemon-client.ts';
import { controlCall } from '../control/client.ts';
import { ControlError } from '../control/protocol.ts';
import { controlSocketFor } from '../shim/shim.ts';
import type { ShimStarter, StartedShim } from './shim-starter.ts';

interface DaemonShim { name: string; source: string; export: string; socket: string }

export class DaemonShims implements ShimStarter {
  constructor(readonly socket: string) {}

  async start(name: string, source: string): Promise<StartedShim> {
    const { shim, already } = await callDaemon<{ shim: DaemonShim; already: boolean }>(this.socket, 'shim.start', { name, source });
    if (already && shim.source !== source) {
      throw new Error(`vmshiftd already runs a shim named ${name}, for ${shim.source} (not ${source})`);
    }
    return { socket: shim.socket, exportName: shim.export, backing: source };
  }

  async backing(name: string): Promise<string> {
    const { shims } = await callDaemon<{ shims: DaemonShim[] }>(this.socket, 'shim.list');
    const shim = shims.find((s) => s.name === name);
    if (!shim) throw new Error(`vmshiftd has no shim named ${name}`);
    const st = await controlCall<{ backing: string }>(controlSocketFor(shim.socket), 'status', {}, { timeoutMs: 10_000 });
    return st.backing;
  }

  async stop(name: string): Promise<void> {
    try {
      await callDaemon(this.socket, 'shim.stop', { name });
    } catch (e) {
      if (e instanceof ControlError && e.code === 'unknown-shim') return;
      throw e;
    }
  }
}
