// vmshift's storage migration as the bench drives it: `vmshift serve SRC --socket S` in front
// of the disk (fio writes through it), then `vmshift migrate-storage --socket S --to DEST
// --mode M --json`, whose last line is the job's result.
import { join } from 'node:path';
import { startDaemon, waitForSocket, runStatus } from '../test/helpers/proc.ts';
import type { JobResult } from '../src/migrate/job.ts';
import type { JobFigures } from '../src/migrate/context.ts';
import { sleep } from './lib.ts';
import type { JobOutcome, JobSpec, MigrateSystem } from './migrate-system.ts';

const VMSHIFT = new URL('../bin/vmshift', import.meta.url).pathname;
/** Longest wait for the CLI's first event (its start-up under tsx) before the cap starts anyway. */
const CLI_STARTUP_MS = 30_000;

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
  // The cap counts from the job's first event, not from the CLI's start-up (tsx loading
  // the sources takes seconds on a busy machine): the same budget QEMU's job gets.
  const spawned = Date.now();
  while (!cli.output().includes('{"event"') && cli.proc.exitCode === null && Date.now() - spawned < CLI_STARTUP_MS) await sleep(50);
  const firstEventMs = Date.now();
  let capped = false;
  const cap = setTimeout(() => {
    capped = true;
    void runStatus(VMSHIFT, ['abort', '--socket', socket]);
  }, spec.capMs);
  await cli.exited;
  clearTimeout(cap);
  // --json prints one JSON object a line: events ({"event":"progress","data":figures}),
  // then {"result": ...} when the job ended, or {"error": ...} when it was aborted or failed.
  let result: JobResult | undefined;
  let error: { message: string } | undefined;
  let last: JobFigures | undefined;
  for (const line of cli.output().split('\n')) {
    if (!line.startsWith('{')) continue;
    const msg = JSON.parse(line) as { result?: JobResult; error?: { message: string }; event?: string; data?: JobFigures };
    result = msg.result ?? result;
    error = msg.error ?? error;
    if (msg.event === 'progress' && msg.data) last = msg.data;
  }
  if (!result && capped) {
    // Aborted at the cap: the job's figures are those of its last progress event.
    return {
      converged: false, startMs: firstEventMs, endMs: Date.now(),
      bytesToDest: last ? last.bytesCopied + last.mirroredBytes : NaN,
      passes: last ? String(last.pass) : '-', switchMs: NaN,
      error: `did not converge within ${Math.round(spec.capMs / 1000)} s`,
    };
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
