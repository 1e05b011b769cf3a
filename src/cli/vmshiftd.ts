// `vmshift daemon` (what bin/vmshiftd and the systemd unit run): vmshiftd in the foreground,
// JSON logs on stderr, until SIGTERM/SIGINT. Shims keep running when it stops.
import type { Argv, ArgumentsCamelCase } from 'yargs';
import { resolve } from 'node:path';
import { DEFAULT_RUN_DIR, DEFAULT_STATE_DIR } from '../daemon/defaults.ts';
import { DEFAULT_DAEMON_CONFIG } from '../daemon/config.ts';
import { daemonSocket } from './daemon-client.ts';

interface DaemonArgs {
  socket?: string;
  stateDir: string;
  runDir: string;
  config: string;
  datastore?: string[];
  allowNbdSources: boolean;
}

export const daemonCommand = {
  command: 'daemon',
  describe: 'Run vmshiftd, the per-host daemon that owns the shims, in the foreground',
  builder: (y: Argv) =>
    y
      .option('socket', { type: 'string', describe: 'API socket (default $VMSHIFT_SOCKET or /run/vmshift/vmshiftd.sock)' })
      .option('state-dir', { type: 'string', default: DEFAULT_STATE_DIR, describe: 'registry, shim state files and shim logs' })
      .option('run-dir', { type: 'string', default: DEFAULT_RUN_DIR, describe: 'per-shim socket directories' })
      .option('config', { type: 'string', default: DEFAULT_DAEMON_CONFIG, describe: 'config file (datastores, allowNbdSources); absent: defaults' })
      .option('datastore', { type: 'string', array: true, describe: 'also allow shims to serve disks under DIR (repeatable)' })
      .option('allow-nbd-sources', { type: 'boolean', default: false, describe: 'allow NBD URIs as shim sources' }),
  handler: async (argv: ArgumentsCamelCase<DaemonArgs>) => {
    // Loaded here so that other verbs do not pay for the daemon's modules.
    const { Daemon, defaultLogger } = await import('../daemon/daemon.ts');
    const { loadSourcePolicy } = await import('../daemon/config.ts');
    const log = defaultLogger();
    const policy = await loadSourcePolicy(argv.config, { datastores: argv.datastore?.map((d) => resolve(d)), allowNbd: argv.allowNbdSources });
    const daemon = await Daemon.start({ socket: resolve(daemonSocket(argv.socket)), stateDir: resolve(argv.stateDir), runDir: resolve(argv.runDir), log, policy });
    await new Promise<void>((done) => {
      let stopping = false;
      const stop = (signal: string) => {
        if (stopping) return;
        stopping = true;
        log.info({ signal }, 'vmshiftd stopping');
        daemon.stop().then(done, (e) => {
          log.error({ err: (e as Error).message }, 'vmshiftd stop failed');
          process.exitCode = 1;
          done();
        });
      };
      process.on('SIGTERM', () => stop('SIGTERM'));
      process.on('SIGINT', () => stop('SIGINT'));
    });
  },
};
