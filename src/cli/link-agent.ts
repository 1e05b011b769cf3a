// `vmshift link-agent`: the peer end of a host-to-host link (src/link/agent.ts). Started over
// SSH by the dialing host with `--start` (idempotent); runs until the link ends. Parsed
// without yargs, like `serve`: it is started on every first dial and should start fast.
// `vmshift link-agent --listen HOST:PORT --tls-dir DIR ...` instead runs until stopped and
// takes TLS links (src/link/listener.ts): what `vmshift migrate --peer tls://HOST:PORT` dials.
import { join, resolve } from 'node:path';
import { parseArgs } from 'node:util';
import { parseAgentArgs, startAgent } from '../link/agent-start.ts';

const log = (m: string) => process.stderr.write(`${new Date().toISOString()} ${m}\n`);

async function listen(args: string[]): Promise<void> {
  const { values: v } = parseArgs({
    args, strict: true, options: {
      listen: { type: 'string' }, 'tls-dir': { type: 'string' }, 'tls-ca': { type: 'string' }, 'tls-cert': { type: 'string' }, 'tls-key': { type: 'string' },
      'socket-dir': { type: 'string', default: '/run/vmshift/links' }, 'shared-dir': { type: 'string' }, 'hold-ms': { type: 'string' }, echo: { type: 'boolean', default: false },
    },
  });
  const m = /^(.+):(\d{1,5})$/.exec(v.listen ?? '');
  if (!m) throw new Error(`link-agent: --listen ${v.listen}: expected HOST:PORT`);
  const inDir = (f: string) => (v['tls-dir'] ? join(resolve(v['tls-dir']), f) : undefined);
  const ca = v['tls-ca'] ?? inDir('ca-cert.pem'), cert = v['tls-cert'] ?? inDir('server-cert.pem'), key = v['tls-key'] ?? inDir('server-key.pem');
  if (!ca || !cert || !key) throw new Error('link-agent: --listen needs --tls-dir DIR (ca-cert.pem, server-cert.pem, server-key.pem) or --tls-ca, --tls-cert and --tls-key');
  const holdMs = v['hold-ms'] ? Number(v['hold-ms']) : undefined;
  if (holdMs !== undefined && !(holdMs > 0)) throw new Error(`link-agent: --hold-ms ${v['hold-ms']}: expected milliseconds`);
  const { runListener } = await import('../link/listener.ts');
  const l = await runListener({
    host: m[1].replace(/^\[|\]$/g, ''), port: Number(m[2]), ca, cert, key, socketDir: resolve(v['socket-dir']!),
    sharedDir: v['shared-dir'] ? resolve(v['shared-dir']) : undefined, holdMs, echo: v.echo,
  }, log);
  await new Promise<void>((r) => { process.once('SIGTERM', r); process.once('SIGINT', r); });
  l.close();
  log('stopped');
}

export async function runLinkAgent(args: string[]): Promise<void> {
  if (args.some((a) => a === '--listen' || a.startsWith('--listen='))) return listen(args);
  const o = parseAgentArgs(args);
  if (o.start) {
    // Re-run this very command (same node, same entry point, same loader flags) detached.
    await startAgent(['link-agent', ...args], o, [process.execPath, ...process.execArgv, process.argv[1]]);
    process.stdout.write(`ready ${o.socket}\n`);
    return;
  }
  // `--start` above loads none of this: it only spawns the agent (this code path) and waits.
  const { runAgent } = await import('../link/agent.ts');
  process.exitCode = await runAgent(o, log);
}
