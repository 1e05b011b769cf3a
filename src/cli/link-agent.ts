// `vmshift link-agent`: the peer end of a host-to-host link (src/link/agent.ts). Started over
// SSH by the dialing host with `--start` (idempotent); runs until the link ends. Parsed
// without yargs, like `serve`: it is started on every first dial and should start fast.
import { parseAgentArgs, runAgent, startAgent } from '../link/agent.ts';

export async function runLinkAgent(args: string[]): Promise<void> {
  const o = parseAgentArgs(args);
  if (o.start) {
    // Re-run this very command (same node, same entry point, same loader flags) detached.
    await startAgent(['link-agent', ...args], o, [process.execPath, ...process.execArgv, process.argv[1]]);
    process.stdout.write(`ready ${o.socket}\n`);
    return;
  }
  process.exitCode = await runAgent(o);
}
