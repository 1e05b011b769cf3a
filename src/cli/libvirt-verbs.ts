// `vmshift enable DOMAIN [--disk vda ...]` and `vmshift disable DOMAIN`: put a libvirt
// domain's disks behind vmshift shims (from its next start) or take them out again; and
// `migrateStorageByDomain`, the `vmshift migrate-storage DOMAIN --disk vda --to PATH` form.
import type { Argv, ArgumentsCamelCase } from 'yargs';
import { Virsh } from '../libvirt/virsh.ts';
import { disableDomain, enableDomain, migrateDomainStorage } from '../libvirt/enable.ts';
import { runDir } from '../libvirt/shim-plan.ts';
import { daemonSocket } from './daemon-client.ts';
import { printJson } from './output.ts';
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
      .option('reconnect-delay', reconnectDelayOption),
  handler: async (argv: ArgumentsCamelCase<DomainArgs & { disk?: string[]; runDir?: string; reconnectDelay: number }>) => {
    const r = await enableDomain(new Virsh({ uri: argv.connect }), argv.domain, { disks: argv.disk, runDir: runDir(argv.runDir), reconnectDelay: reconnectDelayArg(argv.reconnectDelay) });
    if (!r.reconnect.kept && r.reconnect.delay > 0) {
      process.stderr.write(`vmshift: warning: libvirt dropped <reconnect delay='${r.reconnect.delay}'/> from ${r.domain}'s disks (libvirt 9.0 does not know it): QEMU will fail the guest's I/O at once whenever a shim restarts. Use a libvirt that keeps it, or leave the domain disabled and run 'vmshift attach ${r.domain}' once it runs (docs/libvirt.md)\n`);
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
    y.positional('domain', { type: 'string', demandOption: true, describe: 'libvirt domain name or UUID' }).option('connect', connectOption),
  handler: async (argv: ArgumentsCamelCase<DomainArgs>) => {
    const r = await disableDomain(new Virsh({ uri: argv.connect }), argv.domain);
    if (argv.json) return printJson(r);
    for (const d of r.disks) process.stdout.write(`${r.domain} ${d.dev}: back on ${d.source}\n`);
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
 * `vmshift migrate-storage DOMAIN --disk vda --to PATH`: for src/cli/migrate-storage.ts to
 * call when its DOMAIN positional is given. Events go out as JSON lines with --json, else a
 * line per phase on stderr.
 */
export async function migrateStorageByDomain(a: DomainMigrateArgs): Promise<void> {
  if (!a.disk) throw new Error(`migrate-storage ${a.domain}: name the disk with --disk (e.g. --disk vda)`);
  const onEvent = (event: string, data: unknown) => {
    if (a.json) return printJson({ event, data });
    if (event === 'phase') process.stderr.write(`vmshift: ${a.domain} ${a.disk}: ${JSON.stringify(data)}\n`);
  };
  const r = await migrateDomainStorage(new Virsh({ uri: a.connect }), a.domain, {
    disk: a.disk, to: a.to, daemonSocket: daemonSocket(a.daemonSocket), params: a.params, onEvent,
  });
  if (a.json) return printJson(r);
  process.stdout.write(`${a.domain} ${a.disk}: moved ${r.from} -> ${r.to}; recorded in the domain's metadata\n`);
}

