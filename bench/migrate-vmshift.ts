// vmshift's storage migration as the bench drives it: `vmshift serve SRC --socket S` in front
// of the disk (fio writes through it), then `vmshift migrate-storage --socket S --to DEST
// --mode M --json`, whose last line is the job's result.
import { join } from 'node:path';
import { startDaemon, waitForSocket, runStatus } from '../test/helpers/proc.ts';
import type { JobResult } from '../src/migrate/job.ts';
import type { JobOutcome, JobSpec, MigrateSystem } from './migrate-system.ts';

const VMSHIFT = new URL('../bin/vmshift', import.meta.url).pathname;
/** The CLI's own start-up (tsx loading the sources) is not the job's time: allow it on top of the cap. */
const CLI_STARTUP_MS = 10_000;

export function vmshiftMode(mode: 'auto' | 'precopy' | 'mirror'): MigrateSystem {
  return {
    system: 'vmshift',
    mode,
    async start(dir, source) {
      const socket = join(dir, 'nbd');
      const daemon = startDaemon(VMSHIFT, ['serve', source, '--socket', socket]);
      await waitForSocket(`${socket}.ctl`, daemon, 30_000);
      return {
        uri: `nbd+unix:///disk?socket=${socket}`,
        pid: daemon.pid,
        migrate: (spec) => migrate(socket, mode, spec),
        stop: () => daemon.stop(),
      };
    },
  };
}

async function migrate(socket: string, mode: string, spec: JobSpec): Promise<JobOutcome> {
  const args = ['migrate-storage', '--socket', socket, '--to', spec.dest, '--mode', mode, '--json'];
  if (spec.bandwidth > 0) args.push('--bandwidth', String(spec.bandwidth));
  const cli = startDaemon(VMSHIFT, args);
  let capped = false;
  const cap = setTimeout(() => {
    capped = true;
    void runStatus(VMSHIFT, ['abort', '--socket', socket]);
  }, spec.capMs + CLI_STARTUP_MS);
  await cli.exited;
  clearTimeout(cap);
  // --json prints one JSON object a line: progress events, then {"result": ...} or {"error": ...}.
  let result: JobResult | undefined;
  let error: { message: string } | undefined;
  for (const line of cli.output().split('\n')) {
    if (!line.startsWith('{"result"') && !line.startsWith('{"error"')) continue;
    const msg = JSON.parse(line) as { result?: JobResult; error?: { message: string } };
    result = msg.result ?? result;
    error = msg.error ?? error;
  }
  if (!result) throw new Error(`vmshift ${args.join(' ')}: exit ${cli.proc.exitCode}, no result: ${error?.message ?? cli.output().slice(-2000)}`);
  const startMs = Date.parse(result.startedAt);
  return {
    converged: result.ok && !capped,
    startMs,
    endMs: startMs + result.durationMs,
    bytesToDest: result.bytesCopied + result.mirroredBytes,
    passes: `${result.pass}${result.switchedToMirror ? '+mirror' : ''}`,
    switchMs: result.stallMs ?? NaN,
    ...(capped ? { error: `did not converge within ${Math.round(spec.capMs / 1000)} s` } : result.error ? { error: result.error.message } : {}),
  };
}
