// Verbs that ask vmshiftd to start, stop and list shims:
//   vmshift shim-start NAME SOURCE [--export disk] [--track bitmap] [--group libvirt-qemu]
//   vmshift shim-stop NAME [--force]
//   vmshift restart NAME | --all [--abort-job]
//   vmshift list
// The daemon runs each shim as its own process and remembers it across its own restarts.
import type { Argv, ArgumentsCamelCase } from 'yargs';
import { callDaemon, daemonSocket, daemonSocketOption } from './daemon-client.ts';
import { printJson } from './output.ts';
import type { ShimRecord } from '../daemon/registry.ts';
import { RECONNECT_WAIT_MS, type RestartResult } from '../daemon/supervisor.ts';
import { ControlError } from '../control/protocol.ts';
import { UsageError } from './output.ts';

interface CommonArgs {
  daemonSocket?: string;
  json: boolean;
}

export const shimStartCommand = {
  command: 'shim-start <name> <source>',
  describe: 'Have vmshiftd start a shim serving SOURCE (absolute path or NBD URI) as NAME',
  builder: (y: Argv) =>
    y
      .positional('name', { type: 'string', demandOption: true, describe: 'shim name (letters, digits, . _ -)' })
      .positional('source', { type: 'string', demandOption: true, describe: 'absolute path of a raw file or block device, or an NBD URI' })
      .option('export', { type: 'string', default: 'disk', describe: 'NBD export name' })
      .option('track', { choices: ['bitmap', 'bloom', 'none'] as const, default: 'bitmap' as const, describe: 'dirty tracking' })
      .option('group', { type: 'string', describe: "group allowed to reach the NBD socket (QEMU's user, e.g. libvirt-qemu)" })
      .option('daemon-socket', daemonSocketOption),
  handler: async (argv: ArgumentsCamelCase<CommonArgs & { name: string; source: string; export: string; track: string; group?: string }>) => {
    const r = await callDaemon<{ shim: ShimRecord; already: boolean }>(daemonSocket(argv.daemonSocket), 'shim.start', {
      name: argv.name,
      source: argv.source,
      export: argv.export,
      track: argv.track,
      group: argv.group,
    });
    if (argv.json) return printJson(r);
    const s = r.shim;
    process.stdout.write(`shim ${s.name} ${r.already ? 'already serves' : 'serves'} ${s.source} as "${s.export}" on ${s.socket} (pid ${s.pid})\n`);
  },
};

export const shimStopCommand = {
  command: 'shim-stop <name>',
  describe: 'Have vmshiftd stop a shim (it flushes and exits) and forget it',
  builder: (y: Argv) =>
    y
      .positional('name', { type: 'string', demandOption: true })
      .option('force', { type: 'boolean', default: false, describe: 'stop even while a migration job runs (the job rolls back)' })
      .option('daemon-socket', daemonSocketOption),
  handler: async (argv: ArgumentsCamelCase<CommonArgs & { name: string; force: boolean }>) => {
    const r = await callDaemon<{ name: string; pid: number | null; backing: string }>(daemonSocket(argv.daemonSocket), 'shim.stop', { name: argv.name, force: argv.force });
    if (argv.json) return printJson(r);
    process.stdout.write(`shim ${r.name} stopped; the disk is at ${r.backing}\n`);
  },
};

export const restartCommand = {
  command: 'restart [name]',
  describe: "Swap a shim's process under its running guest (e.g. after upgrading vmshift): QEMU holds the guest's I/O and reconnects",
  builder: (y: Argv) =>
    y
      .positional('name', { type: 'string', describe: 'the shim to restart' })
      .option('all', { type: 'boolean', default: false, describe: 'every shim vmshiftd runs, one after the other' })
      .option('abort-job', { type: 'boolean', default: false, describe: 'abort a running migration first (it rolls back) instead of refusing' })
      .option('daemon-socket', daemonSocketOption)
      .check((a) => {
        if (!a.name === !a.all) throw new UsageError('name one shim, or give --all');
        return true;
      }),
  handler: async (argv: ArgumentsCamelCase<CommonArgs & { name?: string; all: boolean; abortJob: boolean }>) => {
    const socket = daemonSocket(argv.daemonSocket);
    const names = argv.all
      ? (await callDaemon<{ shims: ShimRecord[] }>(socket, 'shim.list')).shims.filter((s) => s.desired === 'running').map((s) => s.name)
      : [argv.name!];
    const results: Array<RestartResult | { name: string; error: { code: string; message: string } }> = [];
    // One at a time: each restart is a stall of its own guest; a refusal does not stop the rest.
    for (const name of names) {
      try {
        const r = await callDaemon<RestartResult>(socket, 'shim.restart', { name, abortJob: argv.abortJob }, { timeoutMs: 0 });
        results.push(r);
        if (!argv.json) process.stdout.write(`${describeRestart(r)}\n`);
      } catch (e) {
        if (!(e instanceof ControlError) || names.length === 1) throw e;
        results.push({ name, error: { code: e.code, message: e.message } });
        if (!argv.json) process.stderr.write(`vmshift: ${name}: ${e.message}\n`);
      }
    }
    if (argv.json) printJson(argv.all ? { shims: results } : results[0]);
    if (results.some((r) => 'error' in r || !r.clean)) process.exitCode = 1;
  },
};

function describeRestart(r: RestartResult): string {
  const stall = r.clientsBefore === 0
    ? 'no NBD client was connected'
    : r.stallMs === null
      ? `only ${r.clientsAfter} of ${r.clientsBefore} NBD clients came back within ${RECONNECT_WAIT_MS / 1000} s`
      : `the guest's I/O stalled ${r.stallMs} ms (${r.clientsAfter} client${r.clientsAfter === 1 ? '' : 's'} reconnected)`;
  const old = r.clean ? 'stopped cleanly' : `did not stop cleanly (${r.stopFailure ?? 'killed after the stop timeout'})`;
  const job = r.abortedJob ? `; its ${r.abortedJob} job was aborted first` : '';
  return `shim ${r.name} restarted: pid ${r.oldPid ?? '-'} ${old} in ${r.stopMs} ms, pid ${r.pid} serving after ${r.downMs} ms; ${stall}${job}`;
}

export const listCommand = {
  command: 'list',
  describe: 'List the shims vmshiftd owns',
  builder: (y: Argv) => y.option('daemon-socket', daemonSocketOption),
  handler: async (argv: ArgumentsCamelCase<CommonArgs>) => {
    const { shims } = await callDaemon<{ shims: ShimRecord[] }>(daemonSocket(argv.daemonSocket), 'shim.list');
    if (argv.json) return printJson({ shims });
    if (!shims.length) return void process.stdout.write('no shims\n');
    const rows = [['NAME', 'PID', 'SOURCE', 'SOCKET'], ...shims.map((s) => [s.name, String(s.pid ?? '-'), s.source, s.socket])];
    const widths = rows[0]!.map((_, i) => Math.max(...rows.map((r) => r[i]!.length)));
    process.stdout.write(rows.map((r) => r.map((c, i) => (i < r.length - 1 ? c.padEnd(widths[i]!) : c)).join('  ')).join('\n') + '\n');
  },
};
