// `vmshift enable DOMAIN [--disk vda ...]` and `vmshift disable DOMAIN`: put a libvirt
// domain's disks behind vmshift shims (from its next start) or take them out again; and
// `migrateStorageByDomain`, the `vmshift migrate-storage DOMAIN --disk vda --to PATH` form.
import type { Argv, ArgumentsCamelCase } from 'yargs';
import { Virsh } from '../libvirt/virsh.ts';
import { MigrationInterrupted, disableDomain, enableDomain, migrateDomainStorage } from '../libvirt/enable.ts';
import { runDir } from '../libvirt/shim-plan.ts';
import { daemonSocket, daemonSocketOption } from './daemon-client.ts';
import { EXIT_INTERRUPTED, printJson } from './output.ts';
import { jobView } from './progress.ts';
import { reconnectDelayArg, reconnectDelayOption } from './reconnect-option.ts';

interface DomainArgs {
  domain: string;
  connect?: string;
  json: boolean;
}

const connectOption = { alias: 'c', type: 'string', describe: 'libvirt URI (default qemu:///system)' } as const;

export const enableCommand = {
  command: 'enable <domain>',
  describe: "Route a libvirt domain's disks through vmshift shims (persistent XML; applies at its next start)",
  builder: (y: Argv) =>
    y
      .positional('domain', { type: 'string', demandOption: true, describe: 'libvirt domain name or UUID' })
      .option('disk', { type: 'string', array: true, describe: 'disk target (vda...); default: every file and block disk' })
      .option('connect', connectOption)
      .option('run-dir', { type: 'string', describe: "vmshiftd's --run-dir (default $VMSHIFT_RUN_DIR or /run/vmshift)" })
      .option('daemon-socket', daemonSocketOption)
      .option('reconnect-delay', reconnectDelayOption),
  handler: async (argv: ArgumentsCamelCase<DomainArgs & { disk?: string[]; runDir?: string; daemonSocket?: string; reconnectDelay: number }>) => {
    const r = await enableDomain(new Virsh({ uri: argv.connect }), argv.domain, { disks: argv.disk, runDir: runDir(argv.runDir), daemonSocket: daemonSocket(argv.daemonSocket), reconnectDelay: reconnectDelayArg(argv.reconnectDelay) });
    if (!r.reconnect.kept && r.reconnect.delay > 0) {
      process.stderr.write(`vmshift: note: libvirt dropped <reconnect delay='${r.reconnect.delay}'/> from ${r.domain}'s disks (libvirt 9.0 does not know it): vmshiftd gives QEMU the delay through libvirt's monitor after each start instead (libvirt marks the domain tainted "custom-monitor"; docs/libvirt.md)\n`);
    }
    if (argv.json) return printJson(r);
    for (const d of r.disks) process.stdout.write(`${r.domain} ${d.dev}: through shim '${d.shim}' on ${d.socket}\n`);
    if (r.running) process.stdout.write(`${r.domain} is running: the shims take over at its next start\n`);
  },
};

export const disableCommand = {
  command: 'disable <domain>',
  describe: "Give a libvirt domain its disks back without vmshift (at their current paths; applies at its next start)",
  builder: (y: Argv) =>
    y
      .positional('domain', { type: 'string', demandOption: true, describe: 'libvirt domain name or UUID' })
      .option('connect', connectOption)
      .option('daemon-socket', daemonSocketOption),
  handler: async (argv: ArgumentsCamelCase<DomainArgs & { daemonSocket?: string }>) => {
    const r = await disableDomain(new Virsh({ uri: argv.connect }), argv.domain, { daemonSocket: daemonSocket(argv.daemonSocket) });
    if (argv.json) return printJson(r);
    for (const d of r.disks) process.stdout.write(`${r.domain} ${d.dev}: back on ${d.source}${d.source !== d.wasRecorded ? ` (the XML still recorded ${d.wasRecorded})` : ''}\n`);
    if (r.running) process.stdout.write(`${r.domain} is running: its shims stop when it stops\n`);
  },
};

export interface DomainMigrateArgs {
  domain: string;
  disk?: string;
  to: string;
  connect?: string;
  daemonSocket?: string;
  json: boolean;
  /** migrate.start parameters already parsed by the migrate-storage verb. */
  params: Record<string, unknown>;
}

/**
 * `vmshift migrate-storage DOMAIN [--disk vda] --to PATH`: for src/cli/migrate-storage.ts to
 * call when its DOMAIN positional is given. A progress bar on a terminal, JSON lines with
 * --json (or without a terminal). Exit codes: 0 the disk moved (recorded in the domain's XML
 * by vmshiftd, or still being recorded: the start uses the new path either way), 1 failed or
 * aborted because vmshiftd went away (the disk stays on its source), 130 Ctrl-C before the
 * switch-over (aborted; the disk stays on its source).
 */
export async function migrateStorageByDomain(a: DomainMigrateArgs): Promise<void> {
  const view = jobView({ json: a.json, label: `${a.domain}${a.disk ? ` ${a.disk}` : ''}` });
  const interrupt = new AbortController();
  let sigints = 0;
  const onSigint = () => {
    // A second Ctrl-C leaves at once: the shim still aborts (this caller went away).
    if (++sigints > 1) process.exit(EXIT_INTERRUPTED);
    interrupt.abort();
  };
  process.on('SIGINT', onSigint);
  try {
    const r = await migrateDomainStorage(new Virsh({ uri: a.connect }), a.domain, {
      disk: a.disk, to: a.to, daemonSocket: daemonSocket(a.daemonSocket), params: a.params,
      onEvent: view.onEvent, onNote: view.note, interrupt: interrupt.signal,
    });
    view.stop();
    if (a.json) return printJson(r);
    const recorded = r.recorded
      ? "recorded in the domain's definition"
      : "vmshiftd has not recorded it in the domain's definition yet and keeps trying (the domain starts on the new path anyway; 'vmshift list' shows where each disk lives)";
    process.stdout.write(`${r.domain} ${r.disk}: moved ${r.from} -> ${r.to}; ${recorded}\n`);
  } catch (e) {
    view.stop();
    if (e instanceof MigrationInterrupted) {
      if (a.json) printJson({ error: { code: 'interrupted', message: e.message } });
      else process.stderr.write(`vmshift: ${e.message}\n`);
      process.exit(EXIT_INTERRUPTED);
    }
    throw e;
  } finally {
    process.off('SIGINT', onSigint);
  }
}
