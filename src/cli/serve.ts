// `vmshift serve FILE|URI --socket PATH`: run one shim in the foreground until SIGTERM/SIGINT.
//
// serve is the long-lived process (one per disk), so main.ts runs it without loading yargs:
// yargs's help formatting (cliui -> string-width, wrap-ansi: Intl.Segmenter, emoji-regex)
// costs ~12 MiB of RSS at load. runServe() parses with node:util's parseArgs from the same
// option table that builds the yargs command (used for `serve --help` and the full CLI).
import type { Argv } from 'yargs';
import { readFileSync } from 'node:fs';
import { parseArgs } from 'node:util';
import { Shim, controlSocketFor, type TrackKind } from '../shim/shim.ts';
import { noteShimRestart, registerMigrationMethods } from '../migrate/control.ts';
import { parseSize } from '../util/size.ts';
import { printJson, UsageError } from './output.ts';
import { DEFAULT_MAX_BYTES, DEFAULT_MAX_CONNECTIONS } from '../nbd/server.ts';
import { DEFAULT_LIMITS } from '../nbd/server-transmission.ts';

/** 64 MiB -> "64M" (defaults shown in --help as an operator would type them). */
function sizeText(bytes: number): string {
  return bytes % 2 ** 20 === 0 ? `${bytes / 2 ** 20}M` : String(bytes);
}

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
  tlsNoClientAuth: boolean;
  state?: string;
  socketMode: string;
  maxConnections: string;
  maxInflight: string;
  maxInflightPerConnection: string;
  json: boolean;
}

interface OptionSpec {
  type: 'string' | 'boolean';
  describe?: string;
  default?: string | boolean;
  demandOption?: boolean;
  choices?: readonly string[];
}

/** serve's options (kebab-case; the handler reads them camelCased). */
const OPTIONS: Record<string, OptionSpec> = {
  socket: { type: 'string', demandOption: true, describe: 'unix socket to serve NBD on (the control socket is PATH.ctl)' },
  export: { type: 'string', default: 'disk', describe: 'NBD export name' },
  'read-only': { type: 'boolean', default: false },
  track: { type: 'string', choices: ['bitmap', 'bloom', 'none'], default: 'bitmap', describe: 'dirty tracking' },
  granularity: { type: 'string', default: '64K', describe: 'dirty-tracking block size' },
  tcp: { type: 'string', describe: 'also listen on HOST:PORT (requires --tls-cert/--tls-key, and --tls-ca or --tls-no-client-auth)' },
  'tls-cert': { type: 'string', describe: 'PEM certificate (chain) of this server' },
  'tls-key': { type: 'string', describe: 'PEM private key of --tls-cert' },
  'tls-ca': { type: 'string', describe: 'PEM CA bundle: clients must present a certificate it signed' },
  'tls-no-client-auth': { type: 'boolean', default: false, describe: 'serve TLS clients without a certificate: anyone who reaches the port may read and write the disk' },
  state: { type: 'string', describe: 'state file (default PATH.state.json)' },
  'socket-mode': { type: 'string', default: '0600', describe: 'octal mode of the NBD socket' },
  // Memory bounds whatever clients do (src/nbd/server-budget.ts): what the shim holds for
  // requests is at most min(--max-inflight, connections x --max-inflight-per-connection).
  'max-connections': { type: 'string', default: String(DEFAULT_MAX_CONNECTIONS), describe: 'NBD connections served at once; more are closed as they arrive' },
  'max-inflight': { type: 'string', default: sizeText(DEFAULT_MAX_BYTES), describe: 'request payload bytes held across all connections (a connection holding nothing may still take one request)' },
  'max-inflight-per-connection': { type: 'string', default: sizeText(DEFAULT_LIMITS.maxInFlightBytes), describe: 'request payload bytes one connection may hold' },
};

const camel = (name: string) => name.replace(/-([a-z])/g, (_, c: string) => c.toUpperCase());

/**
 * `serve`'s arguments (after the verb) without yargs, with yargs's rules for this command:
 * one positional, required and defaulted options, choices, unknown options refused. Usage
 * errors are UsageErrors (exit 2).
 */
export function parseServeArgs(args: string[]): ServeArgs {
  let parsed;
  try {
    parsed = parseArgs({
      args,
      options: { ...Object.fromEntries(Object.entries(OPTIONS).map(([k, o]) => [k, { type: o.type }])), json: { type: 'boolean' } },
      allowPositionals: true,
      allowNegative: true,
      strict: true,
    });
  } catch (err) {
    throw new UsageError((err as Error).message);
  }
  const { positionals } = parsed;
  const values = parsed.values as Record<string, string | boolean | undefined>;
  if (positionals.length === 0) throw new UsageError('Not enough non-option arguments: got 0, need at least 1 (the source)');
  if (positionals.length > 1) throw new UsageError(`Unknown argument: ${positionals[1]}`);
  const out: Record<string, unknown> = { source: positionals[0], json: values.json ?? false };
  for (const [name, o] of Object.entries(OPTIONS)) {
    const v = values[name] ?? o.default;
    if (v === undefined && o.demandOption) throw new UsageError(`Missing required argument: ${name}`);
    if (o.choices && !o.choices.includes(v as string)) throw new UsageError(`Invalid values:\n  Argument: ${name}, Given: "${v}", Choices: ${o.choices.map((c) => `"${c}"`).join(', ')}`);
    if (v !== undefined) out[camel(name)] = v;
  }
  return out as unknown as ServeArgs;
}

/** `vmshift serve ARGS...` without yargs (see the top of this file). */
export async function runServe(args: string[]): Promise<void> {
  await serve(parseServeArgs(args));
}

function readPem(flag: string, path: string): string {
  try {
    return readFileSync(path, 'utf8');
  } catch (e) {
    throw new UsageError(`${flag}: cannot read ${path}: ${(e as NodeJS.ErrnoException).code ?? (e as Error).message}`);
  }
}

export const serveCommand = {
  command: 'serve <source>',
  describe: 'Serve a disk (raw file, block device or NBD URI) through a shim in the foreground',
  builder: (y: Argv) => {
    let out = y.positional('source', { type: 'string', demandOption: true, describe: 'raw file, block device, or nbd+unix:///NAME?socket=PATH / nbd://HOST:PORT/NAME' });
    for (const [name, o] of Object.entries(OPTIONS)) out = out.option(name, { ...o, choices: o.choices ? [...o.choices] : undefined });
    return out;
  },
  handler: (argv: ServeArgs) => serve(argv),
};

async function serve(argv: ServeArgs): Promise<void> {
  const granularity = parseSize(argv.granularity, '--granularity');
  if (granularity < 512 || (granularity & (granularity - 1)) !== 0) throw new UsageError('--granularity must be a power of two of at least 512 bytes');
  if (!/^0?[0-7]{3}$/.test(argv.socketMode)) throw new UsageError(`--socket-mode: "${argv.socketMode}" is not an octal mode like 0600`);
  const maxConnections = Number(argv.maxConnections);
  if (!/^\d+$/.test(argv.maxConnections) || maxConnections < 1 || maxConnections > 100_000) throw new UsageError(`--max-connections: "${argv.maxConnections}" is not a number of connections from 1 to 100000`);
  const maxBytes = parseSize(argv.maxInflight, '--max-inflight');
  const maxConnectionBytes = parseSize(argv.maxInflightPerConnection, '--max-inflight-per-connection');
  if (maxBytes < 1 || maxConnectionBytes < 1) throw new UsageError('--max-inflight and --max-inflight-per-connection must be at least 1 byte');
  if (maxConnectionBytes > maxBytes) throw new UsageError(`--max-inflight-per-connection (${argv.maxInflightPerConnection}) is larger than --max-inflight (${argv.maxInflight})`);
  let tcp: { host: string; port: number } | undefined;
  let tls: { cert: string; key: string; ca?: string; verifyClient: boolean } | undefined;
  if (argv.tcp) {
    const m = /^(.+):(\d+)$/.exec(argv.tcp);
    if (!m || Number(m[2]) > 65535) throw new UsageError(`--tcp: "${argv.tcp}" is not HOST:PORT`);
    if (!argv.tlsCert || !argv.tlsKey) throw new UsageError('--tcp needs --tls-cert and --tls-key: nothing listens on TCP without TLS');
    tcp = { host: m[1]!.replace(/^\[|\]$/g, ''), port: Number(m[2]) };
  }
  if (argv.tlsCert && !argv.tlsCa && !argv.tlsNoClientAuth) {
    throw new UsageError(`${argv.tcp ? '--tcp' : '--tls-cert'} needs --tls-ca (the CA that signs client certificates); --tls-no-client-auth serves any client that reaches the port instead`);
  }
  if (argv.tlsCa && argv.tlsNoClientAuth) throw new UsageError('--tls-ca and --tls-no-client-auth contradict each other: give one');
  if (!argv.tlsCert !== !argv.tlsKey) throw new UsageError('--tls-cert and --tls-key go together');
  if ((argv.tlsCa || argv.tlsNoClientAuth) && !argv.tlsCert) throw new UsageError(`${argv.tlsCa ? '--tls-ca' : '--tls-no-client-auth'} needs --tls-cert and --tls-key`);
  if (argv.tlsCert && argv.tlsKey) {
    tls = { cert: readPem('--tls-cert', argv.tlsCert), key: readPem('--tls-key', argv.tlsKey), ca: argv.tlsCa ? readPem('--tls-ca', argv.tlsCa) : undefined, verifyClient: !argv.tlsNoClientAuth };
    if (argv.tlsNoClientAuth) process.stderr.write('vmshift: warning: --tls-no-client-auth: clients are not authenticated; anyone who reaches the port can read and write this disk\n');
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
    nbdLimits: { maxConnections, maxBytes, maxConnectionBytes },
    beforeServe: (statePath) => noteShimRestart(statePath),
    extend: (s) => registerMigrationMethods(s, s.control),
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
}
