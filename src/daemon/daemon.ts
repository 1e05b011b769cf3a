// vmshiftd, the per-host daemon: loads its registry, brings the shims back in line with it
// (adopt, restart, finish stops), then answers the API on a root-only unix socket until
// SIGTERM/SIGINT. Stopping the daemon never stops shims: they are separate processes (and the
// systemd unit uses KillMode=process), so guests keep their disks while vmshiftd restarts.
import { unlink } from 'node:fs/promises';
import { ensureDir } from '../util/trusted-fs.ts';
import { DEFAULT_POLICY, type SourcePolicy } from './datastores.ts';
import { vmshiftBin } from '../util/paths.ts';
import pino, { type Logger } from 'pino';
import { ControlServer } from '../control/server.ts';
import { controlCall } from '../control/client.ts';
import { Registry } from './registry.ts';
import { Supervisor } from './supervisor.ts';
import { registerApi } from './api.ts';
import { XmlRecorder } from './xml-recorder.ts';
import { ReconnectGiver } from './reconnect-giver.ts';

export { DEFAULT_SOCKET, DEFAULT_STATE_DIR, DEFAULT_RUN_DIR } from './defaults.ts';

export interface DaemonOptions {
  socket: string;
  stateDir: string;
  runDir: string;
  log?: Logger;
  /** argv that runs the vmshift CLI; default: this checkout's bin/vmshift. */
  vmshiftCommand?: string[];
  /** What shims may serve (src/daemon/config.ts loads it; default DEFAULT_POLICY). */
  policy?: SourcePolicy;
}

export function defaultLogger(): Logger {
  // Synchronous writes: the line about a state change must be out before a crash.
  return pino({ name: 'vmshiftd' }, pino.destination({ fd: 2, sync: true }));
}

export class Daemon {
  private constructor(
    readonly opts: DaemonOptions,
    readonly log: Logger,
    private readonly supervisor: Supervisor,
    private readonly server: ControlServer,
    private readonly giver: ReconnectGiver,
  ) {}

  static async start(opts: DaemonOptions): Promise<Daemon> {
    const log = opts.log ?? defaultLogger();
    // Another daemon on this socket would fight over the same shims.
    const running = await controlCall<{ pid: number }>(opts.socket, 'ping', {}, { timeoutMs: 2000 }).catch(() => undefined);
    if (running) throw new Error(`another vmshiftd (pid ${running.pid}) already answers on ${opts.socket}`);

    // Both are refused when someone else owns them or could write them (or a parent of them):
    // whoever could plant a file or symlink there could steer root.
    await ensureDir(opts.stateDir, { mode: 0o700 }, "vmshiftd's state");
    await ensureDir(opts.runDir, { mode: 0o755 }, 'shim sockets');
    const registry = await Registry.load(opts.stateDir);
    const vmshiftCommand = opts.vmshiftCommand ?? [vmshiftBin];
    const policy = opts.policy ?? DEFAULT_POLICY;
    const recorder = new XmlRecorder(registry, log);
    const supervisor = new Supervisor(registry, log, { stateDir: opts.stateDir, runDir: opts.runDir, vmshiftCommand, policy, onLocation: (name) => recorder.poke(name) });
    log.info({ socket: opts.socket, stateDir: opts.stateDir, runDir: opts.runDir, shims: registry.list().length, datastores: policy.datastores, allowNbdSources: policy.allowNbd }, 'vmshiftd starting');
    await supervisor.adoptAll();

    const server = new ControlServer();
    const giver = new ReconnectGiver(registry, log);
    registerApi(server, supervisor, log, giver);
    await server.listen(opts.socket, 0o600);
    supervisor.watch();
    // In the background: asks libvirt, which may itself be starting.
    void supervisor.reapOrphans((rec) => recorder.ownerStopped(rec));
    log.info({ socket: opts.socket }, 'vmshiftd ready');
    return new Daemon(opts, log, supervisor, server, giver);
  }

  /** Stop answering and watching; the API socket is removed, the shims keep running. */
  async stop(): Promise<void> {
    this.supervisor.close();
    this.giver.close();
    await this.server.close();
    await unlink(this.opts.socket).catch(() => {});
    this.log.info({ socket: this.opts.socket }, 'vmshiftd stopped; shims left running');
  }
}
