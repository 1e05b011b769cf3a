// `vmshift abort --socket SHIM_SOCKET`: stop the running migration on a shim. The job rolls
// back (the disk stays on its source, files the job created are removed) unless its
// switch-over had already committed. Exit 0 when a job was stopped, 1 otherwise.
import type { Argv, ArgumentsCamelCase } from 'yargs';
import { controlCall } from '../control/client.ts';
import { controlSocketFor } from '../shim/shim.ts';
import { printJson } from './output.ts';
import type { JobResult } from '../migrate/job.ts';

export const abortCommand = {
  command: 'abort',
  describe: 'Abort the migration running on a shim (the disk stays on its source)',
  builder: (y: Argv) => y.option('socket', { type: 'string', demandOption: true, describe: 'the NBD socket the shim serves' }),
  handler: async (argv: ArgumentsCamelCase<{ socket: string; json: boolean }>) => {
    const r = await controlCall<JobResult>(controlSocketFor(argv.socket), 'migrate.abort', {}, { timeoutMs: 120_000 });
    if (argv.json) return printJson({ result: r });
    if (r.ok) process.stdout.write(`the migration to ${r.to} had already switched over; the disk is on ${r.to}\n`);
    else process.stdout.write(`aborted: ${r.error?.message ?? r.phase}\n`);
  },
};
