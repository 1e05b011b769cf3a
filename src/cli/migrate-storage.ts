// `vmshift migrate-storage --socket SHIM_SOCKET --to DEST [...]`: move a running shim's disk
// to DEST while the guest keeps writing. The job runs inside the shim; this command starts
// it and follows it (a progress bar on a terminal, JSON lines otherwise or with --json).
// Ctrl-C asks the shim to abort the job (the disk stays on its source); --detach starts it
// and returns at once. Exit 0 when the disk moved, 1 when the job failed.
import type { Argv, ArgumentsCamelCase } from 'yargs';
import { resolve } from 'node:path';
import { controlCall } from '../control/client.ts';
import { controlSocketFor } from '../shim/shim.ts';
import { isNbdUri } from '../block/open.ts';
import { formatBytes, parseDuration, parseSize } from '../util/size.ts';
import { printJson, UsageError } from './output.ts';
import { migrateStorageByDomain } from './libvirt-verbs.ts';
import type { JobResult } from '../migrate/job.ts';
import { jobView } from './progress.ts';

interface MigrateArgs {
  domain?: string;
  disk?: string;
  connect?: string;
  daemonSocket?: string;
  socket?: string;
  to: string;
  mode: 'auto' | 'precopy' | 'mirror';
  maxDowntime: string;
  bandwidth?: string;
  tracker: 'bitmap' | 'incremental' | 'bloom';
  heat: boolean;
  maxPasses: number;
  deleteSource: boolean;
  qmp?: string;
  suspend: boolean;
  detach: boolean;
  overwrite: boolean;
  json: boolean;
}

export const migrateStorageCommand = {
  command: 'migrate-storage [domain]',
  describe: "Move a running shim's disk to another file or NBD export while the guest writes",
  builder: (y: Argv) =>
    y
      .positional('domain', { type: 'string', describe: 'a libvirt domain enabled with `vmshift enable` (with --disk); or name the shim with --socket' })
      .option('disk', { type: 'string', describe: 'with DOMAIN: the disk target (vda...); optional when one disk goes through a shim' })
      .option('connect', { alias: 'c', type: 'string', describe: 'with DOMAIN: libvirt URI (default qemu:///system)' })
      .option('daemon-socket', { type: 'string', describe: "with DOMAIN: vmshiftd's API socket" })
      .option('socket', { type: 'string', describe: 'the NBD socket the shim serves (its control socket is beside it)' })
      .option('to', { type: 'string', demandOption: true, describe: 'destination: a raw file (created if missing) or nbd+unix:// / nbd:// URI' })
      .option('mode', { choices: ['auto', 'precopy', 'mirror'] as const, default: 'auto' as const, describe: 'auto: pre-copy, mirror when it does not converge' })
      .option('max-downtime', { type: 'string', default: '50ms', describe: 'I/O stall allowed at the switch-over' })
      .option('bandwidth', { type: 'string', describe: 'copy rate limit per second (e.g. 100M)' })
      .option('tracker', { choices: ['bitmap', 'incremental', 'bloom'] as const, default: 'bitmap' as const, describe: 'dirty tracking during pre-copy' })
      .option('heat', { type: 'boolean', default: false, describe: 'leave often-rewritten regions for the final pass (--no-heat: off)' })
      .option('max-passes', { type: 'number', default: 8, describe: 'pre-copy passes before giving up converging' })
      .option('delete-source', { type: 'boolean', default: false, describe: 'remove the old source file after the switch-over' })
      .option('qmp', { type: 'string', describe: "the guest's QMP socket (for --suspend)" })
      .option('suspend', { type: 'boolean', default: false, describe: 'pause the guest through QMP during the switch-over' })
      .option('detach', { type: 'boolean', default: false, describe: 'start the job and return; follow it with `vmshift status`' })
      .option('overwrite', { type: 'boolean', default: false, describe: 'replace the contents of an existing destination that holds data (never one a process has open)' }),
  handler: async (argv: ArgumentsCamelCase<MigrateArgs>) => {
    if (argv.suspend && !argv.qmp) throw new UsageError('--suspend needs --qmp PATH (the guest QMP socket)');
    const params = {
      // The shim may run in another directory: give it an absolute path.
      to: isNbdUri(argv.to) ? argv.to : resolve(argv.to),
      mode: argv.mode,
      maxDowntimeMs: parseDuration(argv.maxDowntime, '--max-downtime'),
      bandwidth: argv.bandwidth ? parseSize(argv.bandwidth, '--bandwidth') : 0,
      tracker: argv.tracker,
      heat: argv.heat,
      maxPasses: argv.maxPasses,
      deleteSource: argv.deleteSource,
      suspendQmp: argv.suspend ? resolve(argv.qmp!) : undefined,
      follow: !argv.detach,
    };
    if (argv.domain) {
      if (argv.socket) throw new UsageError('give either DOMAIN (with --disk) or --socket, not both');
      const { to, ...rest } = params;
      return migrateStorageByDomain({ domain: argv.domain, disk: argv.disk, to, connect: argv.connect, daemonSocket: argv.daemonSocket, json: argv.json, params: { ...rest, overwrite: argv.overwrite } });
    }
    if (!argv.socket) throw new UsageError('name the disk: --socket SHIM_SOCKET, or DOMAIN --disk vda');
    const socket = argv.socket;
    const ctl = controlSocketFor(socket);
    const view = jobView({ json: argv.json });
    const onEvent = view.onEvent;
    // Ctrl-C is a request to abort: the shim rolls back and this command reports it.
    const onSigint = () => {
      view.note('aborting the migration (the disk stays on its source unless the switch-over already committed)...');
      controlCall(ctl, 'migrate.abort', {}).catch(() => {});
    };
    process.on('SIGINT', onSigint);
    try {
      const result = await controlCall<JobResult>(ctl, 'migrate.start', { ...params, overwrite: argv.overwrite }, { onEvent });
      view.stop();
      if (argv.json || !process.stdout.isTTY) return printJson(argv.detach ? { started: result } : { result });
      if (argv.detach) return void process.stdout.write(`migration of ${result.from} to ${result.to} started; follow it with vmshift status --socket ${socket}\n`);
      process.stdout.write(summary(result));
    } finally {
      view.stop();
      process.off('SIGINT', onSigint);
    }
  },
};

function stallParts(r: JobResult): string {
  const p = r.stallParts;
  return p ? ` (drain ${p.drainMs.toFixed(1)}, final copy ${p.copyMs.toFixed(1)}, flush ${p.flushMs.toFixed(1)}, commit ${p.commitMs.toFixed(1)})` : '';
}

function summary(r: JobResult): string {
  const s = r.savings;
  const lines = [
    `moved ${r.from} -> ${r.to} (${r.mode}${r.switchedToMirror ? ', switched to mirroring' : ''}) in ${(r.durationMs / 1000).toFixed(1)} s`,
    `  passes ${r.pass}, copied ${formatBytes(r.bytesCopied)} (${formatBytes(r.dataBytes)} data, ${formatBytes(r.zeroBytes)} zeroes, ${formatBytes(r.skippedBytes)} holes skipped), mirrored ${formatBytes(r.mirroredBytes)}`,
    `  switch-over stall ${r.stallMs?.toFixed(1)} ms${stallParts(r)}`,
  ];
  if (r.tracker === 'incremental' || r.mode === 'auto') lines.push(`  incremental tracking ignored ${s.incrementalSkippedWrites} writes (${formatBytes(s.incrementalSkippedBytes)}) ahead of the first pass`);
  if (s.heatDeferredBytes) lines.push(`  heat deferred ${formatBytes(s.heatDeferredBytes)}, of which ${formatBytes(s.heatSavedBytes)} would have been recopied`);
  if (s.bloomBytes !== null) lines.push(`  Bloom set ${formatBytes(s.bloomBytes)} vs bitmap ${formatBytes(s.bitmapBytes ?? 0)}, false-positive rate ${(100 * (s.bloomFalsePositiveRate ?? 0)).toFixed(2)}%`);
  return lines.join('\n') + '\n';
}
