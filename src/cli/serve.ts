// `vmshift serve FILE|URI --socket PATH`: run one shim in the foreground until SIGTERM/SIGINT.
import type { Argv, ArgumentsCamelCase } from 'yargs';
import { readFileSync } from 'node:fs';
import { Shim, controlSocketFor, type TrackKind } from '../shim/shim.ts';
import { parseSize } from '../util/size.ts';
import { printJson, UsageError } from './output.ts';

interface ServeArgs {
  source: string;
  socket: string;
  export: string;
  readOnly: boolean;
  track: TrackKind;
  granularity: string;
  tcp?: string;
  tlsCert?: string;
  tlsKey?: string;
  tlsCa?: string;
  state?: string;
  socketMode: string;
  json: boolean;
}

export const serveCommand = {
  command: 'serve <source>',
  describe: 'Serve a disk (raw file, block device or NBD URI) through a shim in the foreground',
  builder: (y: Argv) =>
    y
      .positional('source', { type: 'string', demandOption: true, describe: 'raw file, block device, or nbd+unix:///NAME?socket=PATH / nbd://HOST:PORT/NAME' })
      .option('socket', { type: 'string', demandOption: true, describe: 'unix socket to serve NBD on (the control socket is PATH.ctl)' })
      .option('export', { type: 'string', default: 'disk', describe: 'NBD export name' })
      .option('read-only', { type: 'boolean', default: false })
      .option('track', { choices: ['bitmap', 'bloom', 'none'] as const, default: 'bitmap' as const, describe: 'dirty tracking' })
      .option('granularity', { type: 'string', default: '64K', describe: 'dirty-tracking block size' })
      .option('tcp', { type: 'string', describe: 'also listen on HOST:PORT (requires --tls-cert/--tls-key)' })
      .option('tls-cert', { type: 'string' })
      .option('tls-key', { type: 'string' })
      .option('tls-ca', { type: 'string' })
      .option('state', { type: 'string', describe: 'state file (default PATH.state.json)' })
      .option('socket-mode', { type: 'string', default: '0600', describe: 'octal mode of the NBD socket' }),
  handler: async (argv: ArgumentsCamelCase<ServeArgs>) => {
    const granularity = parseSize(argv.granularity, '--granularity');
    if (granularity < 512 || (granularity & (granularity - 1)) !== 0) throw new UsageError('--granularity must be a power of two of at least 512 bytes');
    if (!/^0?[0-7]{3}$/.test(argv.socketMode)) throw new UsageError(`--socket-mode: "${argv.socketMode}" is not an octal mode like 0600`);
    let tcp: { host: string; port: number } | undefined;
    let tls: { cert: string; key: string; ca?: string } | undefined;
    if (argv.tcp) {
      const m = /^(.+):(\d+)$/.exec(argv.tcp);
      if (!m || Number(m[2]) > 65535) throw new UsageError(`--tcp: "${argv.tcp}" is not HOST:PORT`);
      if (!argv.tlsCert || !argv.tlsKey) throw new UsageError('--tcp needs --tls-cert and --tls-key: nothing listens on TCP without TLS');
      tcp = { host: m[1]!.replace(/^\[|\]$/g, ''), port: Number(m[2]) };
    }
    if (argv.tlsCert && argv.tlsKey) {
      tls = { cert: readFileSync(argv.tlsCert, 'utf8'), key: readFileSync(argv.tlsKey, 'utf8'), ca: argv.tlsCa ? readFileSync(argv.tlsCa, 'utf8') : undefined };
    }
    // Sockets and state files are born private: no window between listen() and chmod().
    process.umask(0o077);
    const shim = await Shim.start({
      source: argv.source,
      socket: argv.socket,
      exportName: argv.export,
      readOnly: argv.readOnly,
      track: argv.track,
      granularity,
      tcp,
      tls,
      statePath: argv.state,
      socketMode: parseInt(argv.socketMode, 8),
    });
    const info = { serving: shim.backing, origin: shim.origin, socket: argv.socket, control: controlSocketFor(argv.socket), export: argv.export, size: shim.gate.size, pid: process.pid };
    if (argv.json) printJson({ event: 'serving', data: info });
    else process.stderr.write(`vmshift: serving ${info.serving} (${info.size} bytes) as "${info.export}" on ${info.socket}; control ${info.control}\n`);
    await new Promise<void>((resolve) => {
      let stopping = false;
      const stop = (sig: string) => {
        if (stopping) return;
        stopping = true;
        if (!argv.json) process.stderr.write(`vmshift: ${sig}: flushing and stopping\n`);
        shim.stop().then(resolve, (e) => {
          process.stderr.write(`vmshift: stop failed: ${(e as Error).message}\n`);
          process.exitCode = 1;
          resolve();
        });
      };
      process.on('SIGTERM', () => stop('SIGTERM'));
      process.on('SIGINT', () => stop('SIGINT'));
    });
    if (argv.json) printJson({ event: 'stopped', data: { socket: argv.socket } });
  },
};
