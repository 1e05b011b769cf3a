// `vmshift abort --socket SHIM_SOCKET`: stop the running migration on a shim. The job rolls
// back (the disk stays on its source, files the job created are removed) unless its
// switch-over had already committed. Exit 0 when a job was stopped, 1 otherwise.
// `vmshift abort --qmp SRC_QMP`: roll back the memory migration (`vmshift migrate`) of that
// guest, through the migration's own control socket (src/relay/migration-socket.ts): exactly
// as a failure before the commit (the guest runs on here, the destination QEMU is quit).
import type { Argv, ArgumentsCamelCase } from 'yargs';
import { resolve } from 'node:path';
import { controlCall } from '../control/client.ts';
import { controlSocketFor } from '../shim/shim.ts';
import { printJson, UsageError } from './output.ts';
import type { JobResult } from '../migrate/job.ts';
import { abortMigration } from '../relay/migration-socket.ts';
import { runDir } from '../daemon/defaults.ts';

interface Args { socket?: string; qmp?: string; runDir?: string; json: boolean }

export const abortCommand = {
  command: 'abort',
  describe: 'Abort the migration running on a shim (the disk stays on its source), or the memory migration of a guest (--qmp)',
  builder: (y: Argv) => y
    .option('socket', { type: 'string', describe: 'the NBD socket the shim serves' })
    .option('qmp', { type: 'string', describe: "the source guest's QMP socket, as given to vmshift migrate" })
    .option('run-dir', { type: 'string', describe: 'as given to vmshift migrate (default $VMSHIFT_RUN_DIR or /run/vmshift)' }),
  handler: async (argv: ArgumentsCamelCase<Args>) => {
    if (!argv.socket === !argv.qmp) throw new UsageError('give --socket SHIM_SOCKET (a disk migration) or --qmp SRC_QMP (a memory migration)');
    if (argv.qmp) {
      const r = await abortMigration(runDir(argv.runDir), resolve(argv.qmp));
      if (argv.json) printJson({ result: r });
      else process.stdout.write(`${r.aborted ? 'aborted' : 'not aborted'}: ${r.message}\n`);
      if (!r.aborted) process.exitCode = 1;
      return;
    }
    const r = await controlCall<JobResult>(controlSocketFor(argv.socket!), 'migrate.abort', {}, { timeoutMs: 120_000 });
    if (argv.json) return printJson({ result: r });
    if (r.ok) process.stdout.write(`the migration to ${r.to} had already switched over; the disk is on ${r.to}\n`);
    else process.stdout.write(`aborted: ${r.error?.message ?? r.phase}\n`);
  },
};
